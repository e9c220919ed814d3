"""Open models pickled under e3nn 0.4.x (what mace-torch pins) with the installed e3nn (>= 0.5), predictions unchanged.

Why this is needed: e3nn modules with generated code (``CodeGenMixin``: ``o3.TensorProduct`` and subclasses,
``o3.Linear``) pickle that code as TorchScript. e3nn 0.4 stored ``{name: bytes}``, e3nn >= 0.5 expects
``{name: (kind, bytes)}``, so a plain ``torch.load`` fails inside ``__setstate__``. ``o3.SphericalHarmonics``
(``sph_func``) and ``nn.Activation`` (``paths``) gained attributes, set in ``__init__``, that old pickles lack.

How: :func:`load` runs ``torch.load`` with an unpickler whose ``find_class`` hands out, for those e3nn classes, a
throw-away subclass whose ``__setstate__`` recognises the old state, rebuilds the generated code with the installed
e3nn and then re-installs the ORIGINAL coupling constants (the ``_w3j_*`` buffers read from the saved TorchScript):
e3nn's ``wigner_3j`` changed sign for some odd l1+l2+l3 after 0.4.4, and a trained model's weights only make sense
with the constants it was trained with. The object's class is set back to the real e3nn class afterwards, so the
loaded model is an ordinary e3nn/MACE model. Pickles written by e3nn >= 0.5 pass through untouched.

Loading a pickle executes code from it: open only model files you trust (the same holds for mace-torch itself).
"""
from __future__ import annotations

import functools
import io
import pickle
import types
from math import prod

import torch


class E3nnCompatError(RuntimeError):
    """An old e3nn module whose state cannot be carried over without changing what it computes."""


def _is_placeholder(script_module) -> bool:
    """e3nn compiles a stub that only raises for a method built with compile_*=False."""
    try:
        code = script_module.code
    except (AttributeError, RuntimeError):
        return False
    return "is not compiled" in code


def _old_codegen(state) -> dict | None:
    """The e3nn-0.4 codegen state ``{name: TorchScript bytes}``, or None when ``state`` is not in that format."""
    codegen = state.get("__codegen__") if isinstance(state, dict) else None
    if isinstance(codegen, dict) and codegen and all(isinstance(v, (bytes, bytearray)) for v in codegen.values()):
        return codegen
    return None


def _transplant_constants(name: str, new_module: torch.nn.Module, old_module) -> None:
    """Overwrite the regenerated module's constant buffers with the saved ones (same names and shapes)."""
    new = dict(new_module.named_buffers())
    old = {k: v for k, v in old_module.named_buffers()}
    if set(new) != set(old):
        raise E3nnCompatError(
            f"{name}: the installed e3nn generates code with constants {sorted(new)}, the saved code used "
            f"{sorted(old)}; cannot guarantee unchanged predictions")
    for key, value in old.items():
        if tuple(new[key].shape) != tuple(value.shape):
            raise E3nnCompatError(f"{name}.{key}: saved shape {tuple(value.shape)} != regenerated "
                                  f"{tuple(new[key].shape)}")
        new_module.register_buffer(key, value.detach().clone())


def _register(module, generated: dict, kept: dict) -> None:
    """Install regenerated fx code the way the installed e3nn does, plus saved stubs kept as TorchScript."""
    module.__dict__.pop("__codegen__", None)
    if generated:
        module._codegen_register(generated)
    names = list(getattr(module, "__codegen__", []))
    for fname, script_module in kept.items():
        module.add_module(fname, script_module)
        names.append(fname)
    module.__codegen__ = names


def _load_old_code(codegen: dict) -> dict:
    return {fname: torch.jit.load(io.BytesIO(bytes(buf)), map_location="cpu") for fname, buf in codegen.items()}


def _upgrade_tensor_product(tp, codegen: dict) -> None:
    from e3nn.o3._tensor_product._codegen import codegen_tensor_product_left_right, codegen_tensor_product_right

    old = _load_old_code(codegen)
    tp.__dict__.setdefault("_in1_dim", tp.irreps_in1.dim)
    tp.__dict__.setdefault("_in2_dim", tp.irreps_in2.dim)
    tp.__dict__.setdefault("_specialized_code", True)
    tp.__dict__.setdefault("_optimize_einsums", True)
    providers = {"_compiled_main_left_right": codegen_tensor_product_left_right,
                 "_compiled_main_right": codegen_tensor_product_right}
    unknown = sorted(set(old) - set(providers))
    if unknown:
        raise E3nnCompatError(f"{type(tp).__name__}: unknown generated functions {unknown}")
    generated, kept = {}, {}
    for fname, old_module in old.items():
        if _is_placeholder(old_module):
            kept[fname] = old_module
            continue
        graphmod = providers[fname](tp.irreps_in1, tp.irreps_in2, tp.irreps_out, tp.instructions, tp.shared_weights,
                                    tp._specialized_code, tp._optimize_einsums)
        _transplant_constants(f"{type(tp).__name__}.{fname}", graphmod, old_module)
        generated[fname] = graphmod
    tp.__dict__.setdefault("_did_compile_right", "_compiled_main_right" in generated)
    _register(tp, generated, kept)
    weight_numel = sum(prod(ins.path_shape) for ins in tp.instructions if ins.has_weight)
    if weight_numel != tp.weight_numel:
        raise E3nnCompatError(f"{type(tp).__name__}: instructions need {weight_numel} weights, state has "
                              f"{tp.weight_numel}")


def _upgrade_linear(linear, codegen: dict) -> None:
    from e3nn.o3 import _linear

    old = _load_old_code(codegen)
    if set(old) != {"_compiled_main"}:
        raise E3nnCompatError(f"{type(linear).__name__}: unknown generated functions {sorted(old)}")
    linear.__dict__.setdefault("_optimize_einsums", True)
    weight = linear.weight
    f_in, f_out = (tuple(weight.shape[:2]) if weight.dim() == 3 else (None, None))
    graphmod, weight_numel, bias_numel = _linear._codegen_linear(
        linear.irreps_in, linear.irreps_out, linear.instructions, f_in, f_out,
        shared_weights=linear.shared_weights, optimize_einsums=linear._optimize_einsums)
    if (weight_numel, bias_numel) != (linear.weight_numel, linear.bias_numel):
        raise E3nnCompatError(f"Linear {linear.irreps_in} -> {linear.irreps_out}: regenerated layout "
                              f"({weight_numel}, {bias_numel}) != saved ({linear.weight_numel}, {linear.bias_numel})")
    _transplant_constants("Linear._compiled_main", graphmod, old["_compiled_main"])
    _register(linear, {"_compiled_main": graphmod}, {})
    if hasattr(_linear, "LinearSlices") and "weight_index_slices" not in linear.__dict__:
        slices, offset = [], 0
        for ins in linear.instructions:
            size = prod(ins.path_shape)
            slices.append(_linear.LinearSlices(slice(offset, offset + size, None), ins.path_shape))
            offset += size
        linear.weight_index_slices = slices


def _keep_old_code(module, codegen: dict) -> None:
    """Other generated-code modules: keep the saved TorchScript itself (it computes exactly as before)."""
    _register(module, {}, _load_old_code(codegen))


def _upgrade_spherical_harmonics(sh) -> None:
    from e3nn import get_optimization_defaults
    from e3nn.o3 import _spherical_harmonics

    mode = get_optimization_defaults().get("jit_mode", "eager")
    func = _spherical_harmonics._spherical_harmonics
    sh.sph_func = torch.jit.script(func) if mode == "script" else func


def _upgrade_activation(act) -> None:
    act.paths = [(mul, (l, p), fn) for (mul, (l, p)), fn in zip(act.irreps_in, act.acts)]


def _setstate_for(cls):
    from e3nn import nn, o3
    from e3nn.util.codegen import CodeGenMixin

    def __setstate__(self, state):
        codegen = _old_codegen(state) if issubclass(cls, CodeGenMixin) else None
        try:
            if codegen is not None:
                rest = {k: v for k, v in state.items() if k != "__codegen__"}
                torch.nn.Module.__setstate__(self, rest)
                if issubclass(cls, o3.TensorProduct):
                    _upgrade_tensor_product(self, codegen)
                elif issubclass(cls, o3.Linear):
                    _upgrade_linear(self, codegen)
                else:
                    _keep_old_code(self, codegen)
            else:
                super(shim, self).__setstate__(state)
            if issubclass(cls, o3.SphericalHarmonics) and "sph_func" not in self.__dict__:
                _upgrade_spherical_harmonics(self)
            if issubclass(cls, nn.Activation) and "paths" not in self.__dict__:
                _upgrade_activation(self)
        finally:
            self.__class__ = cls

    shim = type(cls.__name__, (cls,), {"__setstate__": __setstate__, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})
    return shim


@functools.lru_cache(maxsize=None)
def _shim(cls):
    return _setstate_for(cls)


def _needs_shim(cls) -> bool:
    from e3nn import nn, o3
    from e3nn.util.codegen import CodeGenMixin

    return isinstance(cls, type) and issubclass(cls, (CodeGenMixin, o3.SphericalHarmonics, nn.Activation))


class CompatUnpickler(pickle.Unpickler):
    """Unpickler that upgrades e3nn-0.4 module state on the fly (see the module docstring)."""

    def find_class(self, module, name):
        found = super().find_class(module, name)
        if module.startswith("e3nn.") and _needs_shim(found):
            return _shim(found)
        return found


pickle_module = types.ModuleType("fastmlip_e3nn_compat_pickle")
pickle_module.Unpickler = CompatUnpickler
pickle_module.load = lambda file, **kwargs: CompatUnpickler(file, **kwargs).load()
pickle_module.__doc__ = "pickle stand-in for torch.load(pickle_module=...): upgrades e3nn-0.4 module state"


def load(path, map_location="cpu"):
    """``torch.load`` a whole pickled model (``torch.save(model)``), upgrading e3nn-0.4 state where present."""
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=pickle_module)
