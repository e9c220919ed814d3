"""Generated kernel sources, checked in under tests/fixtures/kernels/: a reviewer reads there what the generators
write, and a change to a generator shows up in review as a change to these files.

After an intended change, regenerate them with ``python tests/kernels/test_generated_kernels.py`` and review the diff.
"""
import math
from pathlib import Path
from unittest import mock

import pytest

FIXTURES = Path(__file__).parent.parent / "fixtures" / "kernels"
NAMES = ("gate_backward.py", "gate_forward.py", "spherical_harmonics_backward_l2_unit.py",
         "spherical_harmonics_forward_l2_unit.py")


def small_gate():
    """Four silu scalars and 2x1o gated by two sigmoid gates: both kinds of run. The constants are round numbers,
    not e3nn's (its normalize2mom constants come from a random sample)."""
    from fastmlip.descriptors import Activation, GatedRun, GateProblem, ScalarRun, with_key

    return with_key(GateProblem(12, 10, (ScalarRun(0, 0, 4, Activation("silu", 1.5)),),
                                (GatedRun(4, 6, 4, 2, 3, 1 / math.sqrt(3), Activation("sigmoid", 2.0)),)))


def generated(name: str) -> str:
    """The text the generators write now for the fixture ``name``."""
    from fastmlip.kernels import gate, spherical_harmonics

    sources = {
        "gate_backward.py": lambda: gate.kernel_source(small_gate(), "backward", 16),
        "gate_forward.py": lambda: gate.kernel_source(small_gate(), "forward", 16),
        "spherical_harmonics_backward_l2_unit.py": lambda: spherical_harmonics.backward_source(2, 128, True),
        "spherical_harmonics_forward_l2_unit.py": lambda: spherical_harmonics.forward_source(2, 128, True),
    }
    return sources[name]()


@pytest.mark.parametrize("name", NAMES)
def test_generator_writes_the_checked_in_source(name):
    assert generated(name) == (FIXTURES / name).read_text(), (
        f"the generator's {name} changed: if intended, run `python tests/kernels/test_generated_kernels.py` and review the "
        "diff of tests/fixtures/kernels/")


@pytest.mark.parametrize("name", NAMES + ("two_functions",))
def test_kernel_source_lines_are_what_inspect_finds(name, tmp_path):
    """codegen answers Triton's ``inspect.getsourcelines`` for a generated kernel without tokenising its file (a
    warm start reads ~50 of them): the lines inspect itself finds."""
    import inspect

    from fastmlip.kernels import codegen

    text = generated(name) if name in NAMES else (
        "import triton\n\n\n@triton.jit\ndef first(x):\n    y = x\n\n    return y\n\n\n"
        "@triton.jit(do_not_specialize=['n'])\ndef second(x, n):\n    return x\n")
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    module = codegen._import(f"fastmlip_generated_lines_{path.stem.replace('-', '_')}", path)
    functions = [getattr(value, "fn", value) for value in vars(module).values() if hasattr(value, "fn")]
    assert functions
    for function in functions:
        with codegen._kernel_sources_of(path), mock.patch.object(inspect, "getblock", side_effect=AssertionError):
            answered = inspect.getsourcelines(function)  # inspect's own would tokenise (getblock)
        assert answered == inspect.getsourcelines(function)
        assert answered[0][-1].strip()  # ends on the kernel's last line, not on blank lines


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for fixture in NAMES:
        (FIXTURES / fixture).write_text(generated(fixture))
        print(f"wrote {FIXTURES / fixture}")
