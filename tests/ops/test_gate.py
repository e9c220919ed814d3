"""The gate op against e3nn's ``nn.Gate``: SevenNet-0's own gate modules and synthetic gates (odd scalars, odd
gates, split multiplicities, an unknown activation), reference and Triton kernels (interpreted without CUDA,
outputs poisoned with NaN), values and first and second derivatives, and the swap inside SevenNet-0.
About 20 s on 2 cores, most of it building SevenNet-0 and torch.library.opcheck."""
import os
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from e3nn import nn as e3nn_nn  # noqa: E402

from fastmlip.descriptors import gate_problem  # noqa: E402
from fastmlip.kernels import launch  # noqa: E402
from fastmlip.ops import gate as gate_ops  # noqa: E402
from fastmlip.ops import registry  # noqa: E402
from fastmlip.reference import gate as ref  # noqa: E402
from helpers.derivatives import assert_close, assert_matches_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def softplus_shifted(x):
    return F.softplus(x) - 0.6931471805599453


SYNTHETIC = {
    "odd-scalars": ("2x0e+3x0o+2x0e", [F.silu, torch.tanh, None], "3x0e+2x0o", [torch.sigmoid, torch.abs],
                    "2x1o+1x2e+2x1e"),
    "odd-gates": ("4x0o", [torch.abs], "2x0o+1x0e", [torch.tanh, F.silu], "2x1e+1x3o"),
    "scalars-only": ("5x0e", [F.silu], "", [], ""),
    "unknown-activation": ("3x0e", [softplus_shifted], "2x0e", [torch.sigmoid], "2x1o"),
}


def synthetic_gate(case, dtype=torch.float64):
    return e3nn_nn.Gate(*SYNTHETIC[case]).to(device=DEVICE, dtype=dtype)


@pytest.fixture(scope="module")
def sevennet0():
    pytest.importorskip("sevenn")
    import fastmlip
    from fastmlip.patches import sevenn as patch

    if "7net-0" not in patch.pretrained_checkpoints():
        pytest.skip("7net-0 is not installed with sevenn")
    return fastmlip.load("7net-0", device=DEVICE, dtype=torch.float64)


def sevennet_gates(model):
    from sevenn.nn.equivariant_gate import EquivariantGate

    return {name: m.gate for name, m in model.named_modules() if isinstance(m, EquivariantGate)}


def inputs(dim, dtype, n=21, seed=0):
    return (torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2).to(DEVICE)


# --- reference -------------------------------------------------------------------------------------------------

def check_reference(gate, dtype):
    problem = gate_problem(gate)
    x = inputs(problem.dim_in, dtype).requires_grad_(True)
    expected = gate(x)
    assert_close(ref.gate(problem, x), expected, TOL[dtype], "value")
    if problem.has_kernel:
        probe = torch.randn_like(expected)
        (grad,) = torch.autograd.grad(expected, x, probe)
        assert_close(ref.gate_backward(problem, probe, x.detach()), grad, TOL[dtype], "gradient")


def test_reference_matches_sevennet0_gates(sevennet0):
    gates = sevennet_gates(sevennet0)
    assert len(gates) == 5
    for name, gate in gates.items():
        check_reference(gate, torch.float64)
        problem = gate_problem(gate)
        assert {act.name for act in problem.activations} == {"silu"}
        assert all(act.scale == gate.act_scalars.acts[0].cst for act in problem.activations)
    gate = gates["0_equivariant_gate"]
    assert len(gate_problem(gate).gated_runs) == 2  # 64x1e and 32x2e, each one run
    check_reference(gate.float(), torch.float32)
    gate.double()


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_reference_matches_synthetic_gates(case):
    check_reference(synthetic_gate(case), torch.float64)
    check_reference(synthetic_gate(case, torch.float32), torch.float32)


def test_problem_reads_layout_and_constants_from_the_module():
    gate = synthetic_gate("odd-scalars")
    problem = gate_problem(gate)
    assert problem.dim_in == gate.irreps_in.dim == 29 and problem.dim_out == gate.irreps_out.dim == 24
    assert [r.src for r in problem.scalar_runs] == [5, 0, 7]  # e3nn sorted the input: 0o before 0e
    assert [(r.act.name, r.act.function) for r in problem.scalar_runs][1:] == [
        ("tanh", gate.act_scalars.acts[1]), ("identity", None)]
    assert not gate_problem(synthetic_gate("unknown-activation")).has_kernel
    gate.mul._specialized_code = False
    with pytest.raises(ValueError, match="specialised code"):
        gate_problem(gate)


def test_op_falls_back_to_plain_autograd_for_unknown_activations(monkeypatch):
    monkeypatch.setenv("FASTMLIP_BACKEND", "triton")
    gate = synthetic_gate("unknown-activation")
    problem = gate_problem(gate)
    assert_matches_reference(lambda t: gate_ops.gate(problem, t), gate, [inputs(problem.dim_in, torch.float64)],
                             rtol=TOL[torch.float64])


def test_ops_pass_torch_opcheck_and_gradcheck():
    problem = gate_problem(synthetic_gate("odd-scalars"))
    key = registry.register(problem)
    x = inputs(problem.dim_in, torch.float64, n=3).requires_grad_(True)
    grad_out = inputs(problem.dim_out, torch.float64, n=3, seed=1).requires_grad_(True)
    # tracing the forward's autograd (torch.compile's path) covers the backward op's fake kernel too
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args, utils in ((gate_ops.gate_fwd, (x, key), quick + ("test_aot_dispatch_dynamic",)),
                            (gate_ops.gate_bwd, (grad_out, x, key), quick)):
        results = torch.library.opcheck(op.overload, args, test_utils=utils)
        assert all(v == "SUCCESS" for v in results.values()), (op, results)
    assert torch.autograd.gradgradcheck(lambda t: gate_ops.gate(problem, t), (x,))
    batched = gate_ops.gate(problem, x.detach().reshape(3, 1, -1))
    assert batched.shape == (3, 1, problem.dim_out)


# --- Triton kernels ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", ["odd-scalars", "odd-gates", "scalars-only"])
def test_kernels_match_e3nn_synthetic(case, dtype, triton_poisoned):
    gate = synthetic_gate(case, dtype)
    problem = gate_problem(gate)
    assert_matches_reference(lambda t: gate_ops.gate(problem, t), gate, [inputs(problem.dim_in, dtype)],
                             rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernels_match_e3nn_sevennet0(sevennet0, dtype, triton_poisoned):
    gate = sevennet_gates(sevennet0)["1_equivariant_gate"].to(dtype)
    try:
        problem = gate_problem(gate)
        assert_matches_reference(lambda t: gate_ops.gate(problem, t), gate, [inputs(problem.dim_in, dtype, n=19)],
                                 rtol=TOL[dtype])
    finally:
        gate.double()


def test_kernels_without_rows(triton_poisoned):
    problem = gate_problem(synthetic_gate("odd-scalars"))
    assert gate_ops.gate(problem, torch.zeros(0, problem.dim_in, dtype=torch.float64, device=DEVICE)).shape == (
        0, problem.dim_out)


# --- SevenNet-0 with fast gates ---------------------------------------------------------------------------------

def test_sevennet0_swaps_every_gate_and_restores(sevennet0):
    from fastmlip.patches import sevenn as patch

    before = {k: v for k, v in sevennet0.state_dict().items() if "gate" in k}
    gates = sevennet_gates(sevennet0)
    first = sevennet0._modules["1_equivariant_gate"]
    first.gate.mul._specialized_code = False
    try:
        assert "specialised code" in patch.plan(sevennet0)[1]["1_equivariant_gate"]
    finally:
        first.gate.mul._specialized_code = True
    assert patch.accelerate(sevennet0) == []
    try:
        fast = {name: m for name, m in sevennet0.named_modules() if isinstance(m, patch.FastEquivariantGate)}
        assert sorted(fast) == sorted(gates)
        after = {k: v for k, v in sevennet0.state_dict().items() if "gate" in k}
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    finally:
        patch.restore(sevennet0)
    assert sevennet0._modules["1_equivariant_gate"] is first


def test_sevennet0_with_kernel_gates_matches_original(sevennet0, monkeypatch, tmp_path_factory):
    """Only the gates run Triton (interpreted on CPU); energies and forces must match e3nn's model in fp64."""
    from fastmlip.patches import self_check
    from fastmlip.patches import sevenn as patch

    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    monkeypatch.setattr(gate_ops, "dispatch", types.SimpleNamespace(backend_for=lambda tensor: "triton"))
    patch.accelerate(sevennet0)
    try:
        report = self_check.check(sevennet0, patch)
    finally:
        patch.restore(sevennet0)
    assert report["dtype"] == "float64" and report["num_edges"] > 0


# --- GPU sizes --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernels_match_reference_at_md_size(sevennet0, dtype, monkeypatch):
    gate = sevennet_gates(sevennet0)["0_equivariant_gate"]
    problem = gate_problem(gate)
    x = inputs(problem.dim_in, dtype, n=20000)

    def gate_on(backend):
        def run(t):
            monkeypatch.setenv("FASTMLIP_BACKEND", backend)
            monkeypatch.setattr(launch, "POISON_OUTPUTS", backend == "triton")
            return gate_ops.gate(problem, t)
        return run

    assert_matches_reference(gate_on("triton"), gate_on("reference"), [x], rtol=TOL[dtype])
