"""Problem descriptors: parsing, immutability, stable keys, and agreement with the modules they describe."""
import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from e3nn import o3

from fastmlip.descriptors import (Activation, CGBlock, Envelope, GatedRun, GateProblem, MulIrrep, ScalarRun,
                                  channelwise_instructions, irreps_dim, irreps_str, make_tensor_product_problem,
                                  parse_irreps, radial_basis_problem, sparsity, spherical_harmonics_problem,
                                  tensor_product_problem, with_key)


def test_parse_irreps_forms_agree():
    expected = (MulIrrep(128, 0, 1), MulIrrep(64, 1, -1), MulIrrep(1, 2, 1))
    assert parse_irreps("128x0e+64x1o+2e") == expected
    assert parse_irreps(o3.Irreps("128x0e+64x1o+1x2e")) == expected
    assert parse_irreps([(128, (0, 1)), (64, (1, -1)), (1, (2, 1))]) == expected
    assert irreps_dim(expected) == 128 + 192 + 5
    assert irreps_str(expected) == "128x0e+64x1o+1x2e"
    with pytest.raises(ValueError, match="cannot parse irrep"):
        parse_irreps("3x1q")


def test_cg_block_round_trip_and_sparsity():
    w3j = o3.wigner_3j(1, 2, 3).numpy()
    block = CGBlock.from_dense(w3j)
    assert np.array_equal(block.dense(), np.where(np.abs(w3j) > 1e-12, w3j, 0.0))
    assert len(block.nonzeros) == int((np.abs(w3j) > 1e-12).sum())


def test_problem_is_frozen_and_keyed_by_content():
    a = make_tensor_product_problem("4x0e+4x1o", "0e+1o", "4x0e+4x1o", [(0, 0, 0, "uvu", True), (1, 1, 0, "uvu", True)])
    b = make_tensor_product_problem("4x0e+4x1o", "0e+1o", "4x0e+4x1o", [(0, 0, 0, "uvu", True), (1, 1, 0, "uvu", True)])
    c = make_tensor_product_problem("4x0e+4x1o", "0e+1o", "4x0e+4x1o", [(0, 0, 0, "uvu", True), (1, 1, 0, "uvu", True)],
                                    irrep_normalization="norm")
    assert a.key == b.key and a.key != c.key
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.weight_numel = 3
    assert a.weight_numel == 8 and sparsity(a) == 1 + 3


def test_path_weights_and_offsets_follow_e3nn():
    tp = o3.TensorProduct("8x0e+4x1o", "0e+1o+2e", "8x0e+4x0e+4x2o+8x1o",
                          [(0, 0, 0, "uvu", True), (1, 1, 1, "uvu", True), (1, 2, 2, "uvu", True),
                           (0, 1, 3, "uvu", True)], path_normalization="path", shared_weights=False,
                          internal_weights=False)
    problem = tensor_product_problem(tp)
    assert [p.path_weight for p in problem.paths] == [ins.path_weight for ins in tp.instructions]
    assert [p.weight_offset for p in problem.paths] == [0, 8, 12, 16]
    assert problem.weight_numel == tp.weight_numel


def test_channelwise_instructions_match_mace():
    blocks = pytest.importorskip("mace.modules.irreps_tools")
    for hidden in ("128x0e+128x1o", "64x0e+64x1o+64x2e"):
        sh = o3.Irreps.spherical_harmonics(3)
        mace_irreps, mace_instr = blocks.tp_out_irreps_with_instructions(o3.Irreps(hidden), sh, o3.Irreps(hidden))
        irreps, instr = channelwise_instructions(hidden, sh, hidden)
        assert irreps == parse_irreps(mace_irreps)
        assert [tuple(i) for i in instr] == [tuple(i) for i in mace_instr]


def test_problem_from_sevenn_checkpoint_module():
    sevenn_util = pytest.importorskip("sevenn.util")
    model = sevenn_util.load_checkpoint("7net-0").build_model()
    tp = dict(model.named_modules())["1_convolution"].convolution
    problem = tensor_product_problem(tp)
    assert irreps_str(problem.irreps_in1) == "128x0e+64x1e+32x2e" and len(problem.paths) == 15
    assert problem.weight_numel == tp.weight_numel == 960
    assert all(p.mode == "uvu" for p in problem.paths)
    dense = {(a.l, b.l, c.l): p.cg.dense() for p, _, _, _, (a, b, c) in
             __import__("fastmlip.descriptors", fromlist=["iter_paths"]).iter_paths(problem)}
    stored = {name: buf for name, buf in tp._compiled_main_left_right.named_buffers()}
    for (l1, l2, l3), block in dense.items():
        name = f"_w3j_{l1}_{l2}_{l3}"
        if name in stored:
            assert np.allclose(block, stored[name].double().numpy(), atol=1e-7)
    assert torch.is_tensor(next(iter(stored.values())))


def test_descriptors_import_without_torch():
    """Kernels learn what to compute from the descriptors alone, so these must not need torch to import."""
    code = "import sys, fastmlip.descriptors; assert 'torch' not in sys.modules and 'e3nn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_kind_of_problem_has_a_stable_content_key():
    """Keys name generated kernel files and compiled-kernel cache entries: the same content gives the same key,
    across processes and versions (these pinned values change only when a problem's content does)."""
    envelope = Envelope("polynomial", 5.0, p=6)
    assert radial_basis_problem(8, 0.5, envelope).key == "RadialBasisProblem-153357969aa36dad"
    assert radial_basis_problem(8, 0.5, Envelope("polynomial", 5.0, p=5)).key != radial_basis_problem(
        8, 0.5, envelope).key
    gate = GateProblem(12, 10, (ScalarRun(0, 0, 4, Activation("silu", 1.5)),),
                       (GatedRun(4, 6, 4, 2, 3, 1 / math.sqrt(3), Activation("sigmoid", 2.0)),))
    assert with_key(gate).key == "GateProblem-0f442f6327b6a48b"
    sh = spherical_harmonics_problem(o3.SphericalHarmonics([0, 1, 2], True, "component"))
    assert sh.key.startswith("SphericalHarmonicsProblem-")
    assert sh.key == spherical_harmonics_problem(o3.SphericalHarmonics([0, 1, 2], True, "component")).key
    assert sh.key != spherical_harmonics_problem(o3.SphericalHarmonics([0, 1, 2], False, "component")).key


def test_kernels_learn_what_to_compute_from_the_descriptors_alone():
    """The kernels import the descriptors and their shared launch module, never the plain-torch reference."""
    import ast
    from pathlib import Path

    import fastmlip.kernels

    for path in Path(fastmlip.kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "reference" not in (node.module or ""), f"{path.name} imports {node.module}"


def test_linear_merges_neighbouring_inputs_of_one_kind():
    """MACE's interaction linear reads its tensor product's repeated blocks (``2x0e+2x0e+1x1o+1x1o+1x1o``): each run
    becomes one input irrep and one path, with the module's own weight layout; inputs of one kind that are not
    neighbours, or that feed several outputs, stay apart."""
    from fastmlip.descriptors import linear_problem

    stacked = linear_problem(o3.Linear("2x0e+2x0e+1x1o+1x1o+1x1o+3x2e", "4x0e+2x1o+1x2e"))
    assert irreps_str(stacked.irreps_in) == "4x0e+3x1o+3x2e"
    assert [(p.i_in, p.i_out, p.mul_in, p.mul_out, p.weight_offset) for p in stacked.paths] == [
        (0, 0, 4, 4, 0), (1, 1, 3, 2, 16), (2, 2, 3, 1, 22)]
    apart = linear_problem(o3.Linear("3x0e+2x1o+3x0e", "2x0e+4x1o"))
    assert irreps_str(apart.irreps_in) == "3x0e+2x1o+3x0e" and len(apart.paths) == 3
    two_outputs = linear_problem(o3.Linear("2x0e+2x0e", "1x0e+1x0e"))
    assert len(two_outputs.irreps_in) == 2 and len(two_outputs.paths) == 4
