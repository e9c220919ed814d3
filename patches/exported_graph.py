"""An exported program's graph and tensors as JSON, rebuilt as a ``torch.fx.GraphModule`` in a fraction of a second.

Why: ``torch.export.load`` imports torch._dynamo and rebuilds symbolic shapes with sympy: 5.3-5.6 s of a 7-11 s
warm start on the lent H200s (SevenNet-0, 2026-12-03), more than everything else before the first step. The
programs fastmlip exports are small flat graphs of ATen and ``fastmlip::`` operators; written beside the archive's
own copy (an extra file of the same ``.pt2``), they load by resolving each operator by name and wiring an FX graph.

Nothing is unpickled and no code from the file runs: targets resolve only to ``torch.ops.aten``/``torch.ops.fastmlip``
overloads and a fixed set of Python operators (the graph's size arithmetic); tensors are raw bytes. Runtime asserts
of the export (tensor metadata naming the export's device, scalar guards) are left out, and every device the graph
names becomes the one it is loaded on, as ``move_to_device_pass`` does.
"""
from __future__ import annotations

import base64
import json
import operator
from typing import Optional

import torch
import torch.fx

FORMAT = "fastmlip-graph"
VERSION = 1
NAMESPACES = ("aten", "fastmlip")
PYTHON_OPERATORS = {f"operator.{name}": getattr(operator, name) for name in
                    ("add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "getitem", "eq", "ne", "lt",
                     "le", "gt", "ge")}
SKIPPED = {"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
           "aten.sym_constrain_range_for_size.default", "aten.sym_constrain_range.default"}
DTYPES = {str(dtype).replace("torch.", ""): dtype for dtype in
          (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
           torch.int32, torch.int64, torch.bool)}


class Unsupported(ValueError):
    """The program holds something this format does not describe (the archive's own copy still loads)."""


# --- writing -------------------------------------------------------------------------------------------------------


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
        if name.split(".", 1)[0] in NAMESPACES:
            return name
    elif getattr(target, "__module__", None) in ("_operator", "operator"):
        name = f"operator.{target.__name__}"
        if name in PYTHON_OPERATORS:
            return name
    raise Unsupported(f"node {node.name} calls {target}")


def _encode(value):
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(item) for item in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": None}  # the device it is loaded on
    if isinstance(value, torch.layout):
        if value != torch.strided:
            raise Unsupported(f"layout {value}")
        return {"layout": "strided"}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise Unsupported(f"argument {value!r} of type {type(value).__name__}")


def _tensor_entry(tensor: torch.Tensor) -> dict:
    if str(tensor.dtype).replace("torch.", "") not in DTYPES:
        raise Unsupported(f"tensor of dtype {tensor.dtype}")
    data = tensor.detach().to("cpu").contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return {"dtype": str(data.dtype).replace("torch.", ""), "shape": list(data.shape),
            "data": base64.b64encode(raw).decode("ascii")}


def to_json(program) -> str:
    """The ``torch.export.ExportedProgram``'s graph and tensors; :class:`Unsupported` when it holds more."""
    from torch.export.graph_signature import InputKind, OutputKind

    signature = program.graph_signature
    state = {**program.state_dict, **program.constants}
    kinds = {spec.arg.name: spec for spec in signature.input_specs}
    inputs, tensors = [], {}
    nodes = []
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = kinds[node.name]
            if spec.kind == InputKind.USER_INPUT:
                inputs.append(node.name)
                continue
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR) or \
                    not isinstance(state.get(spec.target), torch.Tensor):
                raise Unsupported(f"input {node.name} of kind {spec.kind.name}")
            tensors[node.name] = _tensor_entry(state[spec.target])
        elif node.op == "call_function":
            target = _target_name(node)
            if target in SKIPPED:
                if node.users:
                    raise Unsupported(f"node {node.name} ({target}) has users")
                continue
            nodes.append({"name": node.name, "target": target, "args": _encode(node.args),
                          "kwargs": {key: _encode(value) for key, value in node.kwargs.items()}})
        elif node.op == "output":
            if any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs):
                raise Unsupported("the program mutates its inputs or buffers")
            outputs = _encode(node.args[0])
        else:
            raise Unsupported(f"node {node.name} of kind {node.op}")
    return json.dumps({"format": FORMAT, "version": VERSION, "inputs": inputs, "tensors": tensors, "nodes": nodes,
                       "outputs": outputs})


# --- reading -------------------------------------------------------------------------------------------------------


def _resolve(name: str):
    if name in PYTHON_OPERATORS:
        return PYTHON_OPERATORS[name]
    namespace, _, rest = name.partition(".")
    packet, _, overload = rest.partition(".")
    if namespace not in NAMESPACES or not packet or not overload:
        raise ValueError(f"unknown operator {name!r}")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except AttributeError:
        raise ValueError(f"operator {name!r} is not registered in this torch / fastmlip") from None


def _decode(value, env: dict, device: torch.device):
    if not isinstance(value, dict):
        return value
    (kind, item), = value.items()
    if kind == "node":
        return env[item]
    if kind in ("list", "tuple"):
        items = [_decode(entry, env, device) for entry in item]
        return items if kind == "list" else tuple(items)
    if kind == "dtype":
        return DTYPES[item]
    if kind == "device":
        return device
    if kind == "layout":
        return torch.strided
    if kind == "memory_format":
        return getattr(torch, item)
    raise ValueError(f"unknown argument kind {kind!r}")


def _tensor(entry: dict, device: torch.device) -> torch.Tensor:
    dtype, shape = DTYPES[entry["dtype"]], [int(size) for size in entry["shape"]]
    raw = bytearray(base64.b64decode(entry["data"]))
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return flat.reshape(shape).to(device)


def from_json(text: str, device: Optional[torch.device] = None) -> torch.fx.GraphModule:
    """The program as a GraphModule on ``device`` (its tensors as buffers), called with the user inputs in order
    and returning the user outputs; ValueError on anything malformed."""
    device = torch.device(device or "cpu")
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION}")
        root = torch.nn.Module()
        graph = torch.fx.Graph()
        env = {}
        for name in data["inputs"]:
            env[name] = graph.placeholder(name)
        for index, (name, entry) in enumerate(data["tensors"].items()):
            attribute = f"tensor_{index}"
            root.register_buffer(attribute, _tensor(entry, device))
            env[name] = graph.get_attr(attribute)
        for node in data["nodes"]:
            args = _decode(node["args"], env, device)
            kwargs = {key: _decode(value, env, device) for key, value in node["kwargs"].items()}
            env[node["name"]] = graph.call_function(_resolve(node["target"]), args, kwargs)
        graph.output(_decode(data["outputs"], env, device))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"unreadable program graph ({type(exc).__name__}: {exc})") from None
    return torch.fx.GraphModule(root, graph)
