"""fastmlip.Calculator against each framework's own ASE calculator (CPU, ~1-2 min: SevenNet-0 loads dominate).

References: ``sevenn.calculator.SevenNetCalculator`` (float64 through a subclass that only casts its input
graph, since sevenn builds float32 inputs) and ``mace.calculators.MACECalculator`` on a small random MACE.
"""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import CalculatorError, PropertyNotImplementedError, all_changes

from fastmlip import api
from fastmlip.calculator import Calculator, StructureError
from fastmlip.neighbors import VerletList

sevenn_calculator = pytest.importorskip("sevenn.calculator")

# (energy per atom eV, forces eV/A, stress eV/A^3, per-atom energies eV)
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-5, 1e-4), "float64": (1e-9, 1e-8, 1e-9, 1e-8)}


class SevenNetFloat64(sevenn_calculator.SevenNetCalculator):
    """SevenNetCalculator with its graph kept in float64 (sevenn's from_numpy_dict casts it to float32)."""

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        from ase.calculators.calculator import Calculator as AseCalculator
        from sevenn.atom_graph_data import AtomGraphData
        from sevenn.train.dataload import unlabeled_atoms_to_graph

        AseCalculator.calculate(self, atoms, properties, system_changes)
        graph = unlabeled_atoms_to_graph(atoms, self.cutoff)
        data = AtomGraphData(**{key: torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value
                                for key, value in graph.items()})
        self.results = self.output_to_results(self.model(data.to(self.device)))


def si_crystal():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def structures():
    triclinic = bulk("Si", "diamond", a=5.43)
    triclinic.set_cell(triclinic.cell.array + [[0, 0, 0], [0.3, 0, 0], [0.4, 0.2, 0]], scale_atoms=True)
    triclinic = triclinic.repeat((2, 1, 1))
    triclinic.rattle(0.05, seed=2)
    one_atom = bulk("Cu", "fcc", a=3.6)  # 1 atom, cell far smaller than the 5 A cutoff: many self-images
    one_atom.rattle(0.01, seed=3)
    water = molecule("H2O")  # no cell, pbc False
    water.rattle(0.02, seed=4)
    return {"si8": si_crystal(), "water": water, "cu1": one_atom,
            "isolated": Atoms("Si", positions=[[0.1, 0.2, 0.3]]), "triclinic": triclinic}


@pytest.fixture(scope="module")
def sevenn_pair():
    """{dtype: (fastmlip calculator, reference calculator)} for SevenNet-0."""
    pairs = {"float32": (Calculator("7net-0", device="cpu", dtype="float32"),
                         sevenn_calculator.SevenNetCalculator("7net-0", device="cpu"))}
    # float64: a loaded model (accelerated in place by the calculator) and an unaccelerated one as reference
    original = api.load("7net-0", device="cpu", dtype=torch.float64)
    reference = SevenNetFloat64(original, file_type="model_instance", device="cpu")
    fast = Calculator(api.load("7net-0", device="cpu", dtype=torch.float64), device="cpu")
    pairs["float64"] = (fast, reference)
    return pairs


def compare(fast, reference, atoms, dtype):
    energy_tol, force_tol, stress_tol, energies_tol = TOLERANCES[dtype]
    ours, theirs = atoms.copy(), atoms.copy()
    ours.calc, theirs.calc = fast, reference
    n = len(atoms)
    assert abs(ours.get_potential_energy() - theirs.get_potential_energy()) / n <= energy_tol
    assert ours.get_potential_energy() == ours.get_potential_energy(force_consistent=True)
    assert np.abs(ours.get_forces() - theirs.get_forces()).max() <= force_tol
    assert np.abs(ours.get_potential_energies() - theirs.get_potential_energies()).max() <= energies_tol
    assert abs(ours.get_potential_energies().sum() - ours.get_potential_energy()) / n <= energy_tol
    if atoms.pbc.any():
        assert ours.get_stress().shape == (6,)
        assert np.abs(ours.get_stress() - theirs.get_stress()).max() <= stress_tol
    else:
        with pytest.raises(PropertyNotImplementedError, match="stress needs a periodic structure"):
            ours.get_stress()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(structures()))
def test_matches_sevenn_calculator(sevenn_pair, name, dtype):
    fast, reference = sevenn_pair[dtype]
    assert api.framework_of(fast.model).is_accelerated(fast.model)
    compare(fast, reference, structures()[name], dtype)


def test_unaccelerated_model_is_left_as_given(sevenn_pair):
    _, reference = sevenn_pair["float64"]
    plain = Calculator(reference.model, device="cpu", accelerate=False)
    assert plain.model is reference.model
    assert not api.framework_of(plain.model).is_accelerated(plain.model)
    compare(plain, reference, structures()["triclinic"], "float64")


def test_stress_is_strain_derivative_of_energy(sevenn_pair):
    """sigma = (1/V) dE/d(strain), by central differences in float64."""
    fast, _ = sevenn_pair["float64"]
    atoms = structures()["triclinic"]
    atoms.calc = fast
    stress = atoms.get_stress(voigt=False)
    step = 1e-5
    for a, b in [(0, 0), (1, 2)]:  # one normal, one shear component
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * step / 2
            strain[b, a] += sign * step / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            strained.calc = fast
            energies.append(strained.get_potential_energy())
        finite_difference = (energies[0] - energies[1]) / (2 * step) / atoms.get_volume()
        assert abs(finite_difference - stress[a, b]) <= 1e-6, (a, b, finite_difference, stress[a, b])


def test_skin_reuses_neighbor_list(sevenn_pair):
    fast32, reference = sevenn_pair["float32"]
    calc = Calculator(fast32.model, device="cpu", skin=0.5)  # already accelerated: used as is
    assert calc.model is fast32.model
    atoms = si_crystal()
    atoms.calc = calc
    atoms.get_forces()
    rng = np.random.default_rng(0)
    for _ in range(3):
        atoms.positions += rng.uniform(-0.04, 0.04, atoms.positions.shape)  # stays within skin/2 overall
        atoms.get_forces()
    compare(calc, reference, atoms, "float32")
    assert calc.neighbor_list_rebuilds == 1
    atoms.positions[0] += [0.3, 0.0, 0.0]  # beyond skin/2: must rebuild
    compare(calc, reference, atoms, "float32")
    assert calc.neighbor_list_rebuilds == 2


def test_bad_inputs(sevenn_pair):
    fast, _ = sevenn_pair["float32"]
    polonium = si_crystal()
    polonium.numbers[3] = 84  # Po: not among SevenNet-0's 89 elements
    polonium.calc = fast
    with pytest.raises(StructureError, match=r"does not know element\(s\) Po \(Z=84\); it knows H, He, Li") as info:
        polonium.get_potential_energy()
    assert isinstance(info.value, ValueError) and isinstance(info.value, CalculatorError)

    broken = si_crystal()
    broken.positions[5, 1] = np.nan
    broken.positions[6, 0] = np.inf
    broken.calc = fast
    with pytest.raises(StructureError, match=r"NaN or inf at 2 atom\(s\): index 5, 6"):
        broken.get_forces()

    no_cell = Atoms("Si2", positions=[[0, 0, 0], [2.3, 0, 0]], pbc=True)
    no_cell.calc = fast
    with pytest.raises(StructureError, match=r"pbc is \[True, True, True\] but cell vector\(s\) \[0, 1, 2\] are zero"):
        no_cell.get_potential_energy()

    with pytest.raises(ValueError, match="modal/head 'mpa' given, but the model has none"):
        Calculator(fast.model, device="cpu", modal="mpa")
    with pytest.raises(ValueError, match="disagree"):
        Calculator(fast.model, device="cpu", modal="a", head="b")
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        Calculator(fast.model, device="cpu", dtype="float16")

    good = si_crystal()  # the calculator still works after all of the above
    good.calc = fast
    assert np.isfinite(good.get_forces()).all()


def small_mace(path, dtype):
    """A small random MACE (two interactions, l up to 2) with weights scaled so forces are O(1) eV/A."""
    from e3nn import o3
    from mace import modules

    species = [1, 6, 8, 14]
    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=4.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=len(species), hidden_irreps=o3.Irreps("8x0e+8x1o"),
        MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.array([-1.0, -2.0, -3.0, -4.0]), avg_num_neighbors=8.0,
        atomic_numbers=species, correlation=3, gate=torch.nn.functional.silu, radial_MLP=[16, 16],
        atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.3)
    torch.save(model.to(dtype), path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_mace_calculator(tmp_path, dtype):
    pytest.importorskip("fastmlip.patches.mace")
    mace_calculators = pytest.importorskip("mace.calculators")
    path = str(small_mace(tmp_path / "small.model", getattr(torch, dtype)))
    reference = mace_calculators.MACECalculator(model_paths=path, device="cpu", default_dtype=dtype)
    fast = Calculator(path, device="cpu", dtype=dtype, trusted=True)
    assert fast.framework.__name__.endswith("mace")
    cells = structures()
    silicon_carbide = bulk("SiC", "zincblende", a=4.36, cubic=True)
    silicon_carbide.rattle(0.05, seed=5)
    for atoms in (silicon_carbide, cells["water"], cells["isolated"], cells["triclinic"]):
        compare(fast, reference, atoms, dtype)
    probe = silicon_carbide.copy()
    probe.calc = fast
    assert 0.1 < np.abs(probe.get_forces()).max() < 100


@pytest.mark.parametrize("framework", ["sevenn", "mace"])
def test_a_crystal_far_from_the_origin_keeps_float32_forces(framework, tmp_path):
    """Edge vectors come from float64 positions, cast only after the subtraction: translating a crystal by
    5000 A moves float32 forces by < 2e-5 eV/A, in eager steps and in the masked step a CUDA graph records."""
    from fastmlip.cuda_graph import CapturedStep

    if framework == "mace":
        pytest.importorskip("mace.modules")
        calc = Calculator(str(small_mace(tmp_path / "small.model", torch.float32)), device="cpu", dtype="float32",
                          trusted=True)
        atoms = bulk("SiC", "zincblende", a=4.36, cubic=True).repeat((2, 1, 1))
    else:
        calc = Calculator("7net-0", device="cpu", dtype="float32")
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=7)

    def eager_and_masked(structure):
        structure = structure.copy()
        structure.calc = calc
        eager = structure.get_forces()
        positions, cell = torch.as_tensor(structure.positions), torch.as_tensor(structure.cell.array)
        pbc = (True, True, True)
        i, j, shifts, _ = VerletList(calc.cutoff, 0.5).candidates(positions, cell, pbc)
        step = CapturedStep(calc.framework, calc.model, torch.as_tensor(structure.numbers), cell, pbc, calc.cutoff,
                            None, True, i.numel())
        step.load_pairs(i, j, shifts)
        step.positions.copy_(positions)
        masked = step.evaluate()[1 + len(structure):1 + 4 * len(structure)].reshape(-1, 3).numpy()
        return eager, masked

    near = eager_and_masked(atoms)
    far_atoms = atoms.copy()
    far_atoms.positions += [5000.0, -5000.0, 5000.0]
    far = eager_and_masked(far_atoms)
    assert 0.05 < np.abs(near[0]).max()
    for before, after in zip(near, far):
        assert np.abs(after - before).max() < 2e-5


def test_atoms_on_top_of_each_other_and_empty_structures_raise_clearly():
    calc = Calculator("7net-0", device="cpu", accelerate=False)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.positions[3] = atoms.positions[2]
    atoms.calc = calc
    with pytest.raises(StructureError, match=r"NaN or infinite .* atoms too close together: 2 and 3 \(0.000 A apart\)"):
        atoms.get_forces()
    empty = Atoms()
    empty.calc = calc
    with pytest.raises(StructureError, match="the structure has no atoms"):
        empty.get_potential_energy()
