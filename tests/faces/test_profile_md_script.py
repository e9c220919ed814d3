"""scripts/profile_md.py: each top kernel is traced to the operators that launched it (shapes, fastmlip's line)."""
import os
import sys

import pytest
from torch.autograd.profiler_util import FunctionEvent

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts"))
import profile_md  # noqa: E402


def operator(name, shapes, stack, kernels):
    event = FunctionEvent(id=0, name=name, thread=0, start_us=0, end_us=1, input_shapes=shapes, stack=stack)
    for kernel, us in kernels:
        event.append_kernel(kernel, 0, us)
    return event


def test_kernels_are_traced_to_their_operators_and_lines():
    gather = "vectorized_gather_kernel<16, long>"
    events = [
        operator("aten::index_select", [[344000, 16], [], [344000]],
                 ["/site-packages/torch/functional.py(10): f", "/tmp/pkg/fastmlip/patches/mace_modules.py(45): g",
                  "/tmp/pkg/fastmlip/calculator.py(99): h"], [(gather, 300.0), ("other", 5.0)]),
        operator("aten::index_select", [[4000, 3], [], [344000]], ["/work/main/fastmlip/graph.py(64): edge_vectors"],
                 [(gather, 100.0)]),
        operator("aten::index_select", [[344000, 16], [], [344000]],
                 ["/tmp/pkg/fastmlip/patches/mace_modules.py(45): g"], [(gather, 100.0)]),
        operator("aten::mm", [], [], []),
    ]
    sites = profile_md.launch_sites(events, [gather, "absent"], steps=2)
    assert sites["absent"] == []
    first, second = sites[gather]
    assert (first["op"], first["input_shapes"]) == ("aten::index_select", "[344000, 16]x[344000]")
    assert first["line"] == "/tmp/pkg/fastmlip/patches/mace_modules.py(45): g"  # the innermost line of fastmlip's
    assert first["gpu_ms_per_step"] == pytest.approx(0.2)  # 400 us over 2 steps
    assert second["line"].endswith("graph.py(64): edge_vectors") and second["gpu_ms_per_step"] == pytest.approx(0.05)
