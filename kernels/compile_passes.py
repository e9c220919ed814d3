"""Triton's compile pipeline as fastmlip's compile workers run it: the coalescing pass left out where it cannot
change anything.

Triton's ``TritonGPUCoalesce`` gives each memory access a blocked layout with as many contiguous elements per
thread as the access allows. When every pointer tensor of a kernel is one-dimensional with at most one element per
thread (the convolutions' and symmetric contractions' lane tiles: 32 channels on one warp), the layout it picks is
the default one the kernel has already, so the pass changes nothing: the PTX is the same with and without it
(tested). Yet on the long generated kernels it is the costliest pass, because for each access it walks a slice of
the whole function: SevenNet-0's convolution sender walk spent 4.1 of its 6.0 s compile there (Triton 3.6, sm_90),
the slowest kernel of a cold start. :class:`StagesHook` skips it for such kernels only.
"""
from __future__ import annotations

import contextlib

MEMORY_DESCRIPTOR_PREFIX = "tt.descriptor"  # tensor-descriptor (TMA) accesses: leave their kernels alone


def one_element_per_thread(module, threads: int) -> bool:
    """Whether every pointer tensor in the Triton IR ``module`` is one-dimensional with at most ``threads``
    elements (one per thread or fewer), and no access goes through a tensor descriptor."""
    inert = True

    def visit(op) -> None:
        nonlocal inert
        if op.get_name().startswith(MEMORY_DESCRIPTOR_PREFIX):
            inert = False
        for k in range(op.get_num_operands()):
            text = str(op.get_operand(k).get_type())
            if text.startswith("tensor<") and "!tt.ptr" in text:
                shape = text[len("tensor<"):].split("x!tt.ptr", 1)[0].split("x")
                if len(shape) != 1 or not shape[0].isdigit() or int(shape[0]) > threads:
                    inert = False

    module.walk(visit)
    return inert


@contextlib.contextmanager
def coalescing_off():
    """Triton's pipeline without its coalescing pass, for the compile inside the block."""
    from triton._C.libtriton import passes

    add_coalesce = passes.ttgpuir.add_coalesce
    passes.ttgpuir.add_coalesce = lambda pass_manager: None
    try:
        yield
    finally:
        passes.ttgpuir.add_coalesce = add_coalesce


class StagesHook:
    """Triton's ``add_stages_inspection_hook`` for a compile worker (a process that compiles nothing else): the
    TTGIR stage runs without the coalescing pass for kernels where :func:`one_element_per_thread` holds.
    ``skipped`` counts those compiles."""

    PIPELINE = "fastmlip:coalesce-skipped-where-inert"

    def __init__(self):
        self.skipped = 0

    def __call__(self, *args):
        if not args:  # newer Tritons first ask for a cache key of the changed pipeline
            return self.PIPELINE, self.PIPELINE
        backend, stages, options, _language, _capability = args
        make_ttgir = stages["ttgir"]
        threads = options.num_warps * backend.target.warp_size

        def ttgir(module, metadata):
            if not one_element_per_thread(module, threads):
                return make_ttgir(module, metadata)
            self.skipped += 1
            with coalescing_off():
                return make_ttgir(module, metadata)

        stages["ttgir"] = ttgir
