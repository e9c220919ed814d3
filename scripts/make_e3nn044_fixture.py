"""Build the e3nn-0.4.4 MACE fixture: a small model pickled the way mace-torch (which pins e3nn==0.4.4) saves it.

Run under a separate environment that has e3nn 0.4.4 (NOT the project's venv):

    python3 -m venv /work/venv044
    /work/venv044/bin/pip install torch==2.13.0 e3nn==0.4.4 opt_einsum ase numpy matscipy torch-ema prettytable \
        configargparse pyyaml h5py torchmetrics python-hostlist GitPython lmdb orjson pandas
    /work/venv044/bin/pip install --no-deps mace-torch==0.3.16
    /work/venv044/bin/python scripts/make_e3nn044_fixture.py

Writes tests/fixtures/mace_e3nn044.model (``torch.save(model)``) and tests/fixtures/mace_e3nn044_reference.json
(structures plus energy/forces/stress from ``mace.calculators.MACECalculator`` under e3nn 0.4.4, float64).

The hidden irreps carry an odd-parity scalar (0o), which makes MACE add unnatural-parity irreps (1e, 2o) to the
interaction: the convolution then has paths with l1+l2+l3 odd (1o x 1o -> 1e, 1o x 2e -> 2o), exactly where
e3nn's wigner_3j changed sign after 0.4.4. The symmetric contraction's U matrices carry such couplings too
(first layer: correlation 3 over 0e+1o+2e; later layers: correlation 2 over the six irreps, which keeps the file
small where correlation 3 there would store a 2.8 MB U tensor). Three interactions, because the unnatural-parity
features of one layer enter the energy only squared (2o x 2o -> 0e) when that layer is the last; a middle layer
passes them on linearly (2o x 2e -> 1o). The radial weights of odd paths are boosted, so that the wrong constants
would move forces far beyond rounding. The model is stored in float32 (half the bytes) and evaluated in float64.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# e3nn 0.4.4 loads its own constants with torch.load; torch >= 2.6 defaults to weights_only=True, which refuses them.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import ase  # noqa: E402
import e3nn  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from e3nn import o3  # noqa: E402
from mace.calculators import MACECalculator  # noqa: E402
from mace.modules import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock, ScaleShiftMACE  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
MODEL_PATH = FIXTURES / "mace_e3nn044.model"
REFERENCE_PATH = FIXTURES / "mace_e3nn044_reference.json"
TARGET_MAX_FORCE = 3.0  # eV/A: forces O(1) so that comparisons test real numbers, not rounding noise


def structures() -> list:
    """Three fixed H/O structures: a molecule, a periodic cubic box, a periodic triclinic cell."""
    rng = np.random.default_rng(1234)
    water = ase.Atoms("OH2", positions=[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], pbc=False)
    water.positions += rng.normal(scale=0.05, size=water.positions.shape)

    box = ase.Atoms("OH2OH2", positions=[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0],
                                         [2.2, 2.1, 2.0], [3.1, 2.3, 2.1], [2.0, 2.9, 2.6]],
                    cell=np.diag([4.2, 4.0, 4.4]), pbc=True)
    box.positions += rng.normal(scale=0.1, size=box.positions.shape)

    cell = np.array([[3.6, 0.0, 0.0], [0.9, 3.4, 0.0], [0.5, 0.7, 3.8]])
    tric = ase.Atoms("OHHOH", cell=cell, pbc=True,
                     scaled_positions=[[0.1, 0.1, 0.1], [0.35, 0.15, 0.1], [0.1, 0.4, 0.2], [0.6, 0.6, 0.55],
                                       [0.8, 0.6, 0.6]])
    tric.positions += rng.normal(scale=0.05, size=tric.positions.shape)
    return [("water_molecule", water), ("water_box", box), ("triclinic_OH", tric)]


def build_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return ScaleShiftMACE(
        r_max=4.5, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=RealAgnosticResidualInteractionBlock, interaction_cls_first=RealAgnosticInteractionBlock,
        num_interactions=3, num_elements=2, hidden_irreps=o3.Irreps("8x0e+8x0o+8x1o"),
        MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.array([-13.6, -432.0]), avg_num_neighbors=6.0,
        atomic_numbers=[1, 8], correlation=[3, 2, 2], gate=torch.nn.functional.silu, radial_MLP=[16, 16],
        atomic_inter_scale=1.0, atomic_inter_shift=0.0)


def boost_odd_paths(model, factor: float) -> None:
    """Scale the radial-MLP outputs feeding conv paths with l1+l2+l3 odd (where the sign convention matters)."""
    for block in model.interactions:
        tp, last = block.conv_tp, list(block.conv_tp_weights.children())[-1]
        offset = 0
        with torch.no_grad():
            for ins in tp.instructions:
                size = int(np.prod(ins.path_shape))
                ls = (tp.irreps_in1[ins.i_in1].ir.l, tp.irreps_in2[ins.i_in2].ir.l, tp.irreps_out[ins.i_out].ir.l)
                if sum(ls) % 2 == 1:
                    last.weight[:, offset:offset + size] *= factor
                offset += size


def evaluate(model, structs) -> list:
    calc = MACECalculator(models=model, device="cpu", default_dtype="float64")
    out = []
    for name, atoms in structs:
        atoms = atoms.copy()
        atoms.calc = calc
        periodic = bool(atoms.pbc.any())
        out.append({
            "name": name,
            "numbers": atoms.numbers.tolist(),
            "positions": atoms.positions.tolist(),
            "cell": atoms.cell.array.tolist(),
            "pbc": atoms.pbc.tolist(),
            "energy": float(atoms.get_potential_energy()),
            "forces": atoms.get_forces().tolist(),
            # MACE's stress for a non-periodic structure divides by a made-up cell: not a reference value
            "stress_voigt": atoms.get_stress().tolist() if periodic else None,
        })
    return out


def main() -> int:
    if not e3nn.__version__.startswith("0.4"):
        print(f"run this under e3nn 0.4.x (found {e3nn.__version__}); see the docstring", file=sys.stderr)
        return 1
    torch.set_default_dtype(torch.float64)
    structs = structures()
    model = build_model()
    boost_odd_paths(model, factor=30.0)
    probe = evaluate(model, structs)
    max_force = max(np.abs(np.array(s["forces"])).max() for s in probe)
    model.scale_shift.scale.mul_(TARGET_MAX_FORCE / max_force)

    FIXTURES.mkdir(parents=True, exist_ok=True)
    torch.save(model.float(), MODEL_PATH)
    reloaded = torch.load(MODEL_PATH, weights_only=False)
    reference = {
        "e3nn_version": e3nn.__version__,
        "torch_version": torch.__version__,
        "saved_dtype": "float32",
        "dtype": "float64",
        "note": "energies/forces/stress from mace.calculators.MACECalculator under e3nn 0.4.4; stress in eV/A^3, "
                "ASE Voigt order (xx, yy, zz, yz, xz, xy)",
        "structures": evaluate(reloaded, structs),
    }
    REFERENCE_PATH.write_text(json.dumps(reference, indent=1) + "\n")
    size_kib = MODEL_PATH.stat().st_size / 1024
    print(f"wrote {MODEL_PATH} ({size_kib:.0f} KiB) and {REFERENCE_PATH}; max |F| = "
          f"{max(np.abs(np.array(s['forces'])).max() for s in reference['structures']):.3f} eV/A")
    return 0


if __name__ == "__main__":
    sys.exit(main())
