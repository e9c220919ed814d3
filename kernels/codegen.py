"""Shared helpers for generating Triton kernel source per problem: emit text, bake constants, cache, import.

Kernels are written out as Python source with every problem constant (offsets, multiplicities, CG values)
baked in as literals, so the compiler sees a fixed, fully unrolled body. Source files live in the cache folder
(:func:`cache_root`), named by their content; :mod:`fastmlip.kernels.precompile` keeps the compiled binaries
beside them.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import os
import py_compile
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

_IMPORT_LOCK = threading.Lock()
_MODULES: dict = {}


def cache_root() -> Path:
    """Where fastmlip keeps generated kernel sources and compiled kernels: ``$FASTMLIP_CACHE``, else
    ``$XDG_CACHE_HOME/fastmlip``, else ``~/.cache/fastmlip``."""
    root = os.environ.get("FASTMLIP_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "fastmlip")
    return Path(root)


def cache_dir() -> Path:
    """The folder of generated kernel sources."""
    path = cache_root() / "generated"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Source:
    """Indented source text, built line by line."""

    def __init__(self):
        self.lines: list = []
        self.depth = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append("    " * self.depth + line if line else "")

    def comment(self, text: str) -> None:
        """``# text`` at the current depth, wrapped to fit 110 columns: generated kernels explain their steps."""
        for line in textwrap.wrap(text, 108 - 4 * self.depth):
            self(f"# {line}")

    def indent(self):
        source = self

        class _Block:
            def __enter__(self):
                source.depth += 1

            def __exit__(self, *exc):
                source.depth -= 1

        return _Block()

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class Constants:
    """Typed scalar constants hoisted to the top of a kernel.

    A bare float literal becomes a float32 constant in Triton, which would cost float64 kernels ~8 digits; a
    ``tl.full([], value, DT)`` keeps the value exact in the kernel's own dtype.
    """

    def __init__(self):
        self.names: dict = {}

    def __call__(self, value: float) -> str:
        value = float(value)
        if value not in self.names:
            self.names[value] = f"c{len(self.names)}"
        return self.names[value]

    def emit(self, src: Source) -> None:
        if self.names:
            src.comment("The problem's constants, exact in the kernel's dtype (a bare literal would be float32).")
        for value, name in self.names.items():
            src(f"{name} = tl.full([], {value!r}, DT)")


def jit_header(src: "Source", name: str, args, flags=(), about: str = "", imports=()) -> None:
    """The imports and ``@triton.jit`` signature every generated kernel module starts with; ``about`` (what the
    kernel computes, for a reader of the generated file) goes above it as a comment; ``imports`` are lines that
    bring in the ``@triton.jit`` helpers it calls.

    Arguments named ``num_*`` are sizes (edges, rows, nodes): Triton would otherwise compile one variant per
    size that is, or is not, a multiple of 16 (or is 1), and an MD run whose edge count changes would compile
    again mid-run. They only bound loops and masks, so the specialisation buys nothing. ``flags`` are integer
    switches read at run time (0 or 1), likewise one variant for both values.
    """
    sizes = [a for a in args if a.startswith("num_")] + list(flags)
    src("import triton")
    src("import triton.language as tl")
    for line in imports:
        src(line)
    src("")
    src("")
    if about:
        src.comment(about)
    src(f"@triton.jit(do_not_specialize={sizes!r})" if sizes else "@triton.jit")
    src(f"def {name}({', '.join(args)}):")


def linear_combination(terms) -> str:
    """``a*b + c*d ...`` from (coefficient_name, operand) pairs; '0' never occurs (callers skip empty sums)."""
    return " + ".join(f"{c} * {x}" for c, x in terms)


def load_module(name: str, build):
    """Import the generated module ``name`` once per process; ``build()`` makes its source only the first time.

    ``name`` must determine the source (problem key, variant and every knob), because launches are hot paths:
    regenerating the text per call cost more than the kernels themselves. The text is written to the cache
    under a name that includes its hash (processes of other fastmlip versions never overwrite each other's
    files), atomically, so Triton, the compile workers and a reader can see it.
    """
    with _IMPORT_LOCK:
        cached = _MODULES.get(name)
        if cached is not None:
            return cached[1]
        text = build()
        path = cache_dir() / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.py"
        if not path.exists() or path.read_text() != text:
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
            with contextlib.suppress(OSError):
                os.remove(importlib.util.cache_from_source(str(path)))  # bytecode of what was there before
        module = _import(f"fastmlip_generated_{name.replace('-', '_')}", path)
        _MODULES[name] = (text, module)
        return module


def _import(module_name: str, path: Path):
    """Import a generated file from bytecode that fastmlip compiles beside it once, as pip does for installed
    modules: from source, ~50 kernel modules cost 0.29 s of a warm start on the H200, whose Python (like many
    containers') runs under PYTHONDONTWRITEBYTECODE, so imports read bytecode but never write it. The cache folder
    is fastmlip's own; the write is atomic; damaged bytecode is removed and the source imported instead."""
    bytecode = importlib.util.cache_from_source(str(path))
    if not os.path.exists(bytecode):
        with contextlib.suppress(OSError, py_compile.PyCompileError):
            py_compile.compile(str(path), doraise=True)
    for attempt in range(2):
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            with _kernel_sources_of(path):
                spec.loader.exec_module(module)
            return module
        except (ValueError, EOFError):  # "bad marshal data": damaged bytecode, or an error of the module itself
            if attempt or not os.path.exists(bytecode):
                raise
            with contextlib.suppress(OSError):  # another process may have removed it
                os.remove(bytecode)


@contextlib.contextmanager
def _kernel_sources_of(path: Path):
    """While a generated file's ``@triton.jit`` runs, ``inspect.getsourcelines`` finds its functions' lines
    without tokenising the file: Triton reads every kernel's source that way, and the tokeniser walking ~50 long
    kernel files cost 0.3 s of a warm start on the H200 (11 ms a file here). A generated file holds its kernel
    as a top-level function (:func:`jit_header`), so its lines run from its first decorator to the last
    non-blank line before the next line that starts at column 0, or to the file's end: what inspect answers
    (``tests/kernels/test_generated_kernels.py``). Functions of other files get inspect's own answer."""
    lines = path.read_text().splitlines(keepends=True)
    original = inspect.getsourcelines

    def getsourcelines(function):
        code = getattr(function, "__code__", None)
        if code is None or code.co_filename != str(path):
            return original(function)
        start = code.co_firstlineno - 1  # the first decorator's line
        head = next(i for i in range(start, len(lines)) if lines[i].startswith("def "))
        end = next((i for i in range(head + 1, len(lines)) if lines[i][:1] not in ("", " ", "\t", "\n", "#")),
                   len(lines))
        while not lines[end - 1].strip():  # blank lines before the next statement are not the function's
            end -= 1
        return lines[start:end], start + 1

    inspect.getsourcelines = getsourcelines
    try:
        yield
    finally:
        inspect.getsourcelines = original


def activation(body: "Source", act, v: str, consts: Constants, derivative: bool) -> str:
    """Emit what ``act`` (a :class:`fastmlip.descriptors.Activation`) or its derivative needs at ``v``;
    returns the expression, scaled by e3nn's normalisation constant."""
    s, t = f"sig_{v}", f"tanh_{v}"  # temporaries named after v: a Triton loop needs one shape per name
    if act.name in ("silu", "sigmoid"):
        body(f"{s} = 1.0 / (1.0 + tl.exp(-{v}))")
    if act.name == "tanh":
        body(f"{t} = 1.0 - 2.0 / (tl.exp(2.0 * {v}) + 1.0)")
    value, slope = {
        "identity": (v, "1.0"),
        "silu": (f"{v} * {s}", f"{s} * (1.0 + {v} * (1.0 - {s}))"),
        "sigmoid": (s, f"{s} * (1.0 - {s})"),
        "tanh": (t, f"1.0 - {t} * {t}"),
        "abs": (f"tl.abs({v})", f"tl.where({v} > 0, 1.0, tl.where({v} < 0, -1.0, 0.0))"),
    }[act.name]
    return times(slope if derivative else value, act.scale, consts)


def times(expr: str, factor: float, consts: Constants) -> str:
    """``expr`` times a baked constant (nothing when it is 1)."""
    return expr if factor == 1.0 else f"({expr}) * {consts(factor)}"
