"""``fastmlip info``: what this installation can use."""
from __future__ import annotations

import importlib
import platform


def _version(name: str) -> str:
    try:
        return getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # an optional package that fails to import is reported, not raised
        return f"not available ({type(exc).__name__})"


def collect() -> dict:
    import torch

    from . import __version__
    from .ops.dispatch import available_backends

    return {
        "fastmlip": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _version(name) for name in ("e3nn", "triton", "ase", "sevenn", "mace")},
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "backends": available_backends(),
        "cache": _kernel_cache(),
        "settings": _settings(),
    }


def _kernel_cache() -> dict:
    try:
        from .kernels.precompile import cache_summary
    except ImportError as exc:  # the kernels need triton
        return {"unavailable": str(exc)}
    summary = cache_summary()
    entries = ", ".join(f"{n} for {t}" for t, n in summary["compiled"].items()) or "none"
    from .program_cache import count

    return {"location": summary["location"], "size_MB": round(summary["bytes"] / 2**20, 1),
            "compiled_kernels": entries, "generated_sources": summary["generated_sources"],
            "launch_stubs": summary["launch_stubs"], "exported_copies": count()}


def _settings() -> dict:
    """The tuning variables (the kernels', and the pair list's in captured steps): value in force, with the
    default and what each tunes."""
    from .kernels.launch import describe_settings

    from . import graph_pairs

    try:
        described = describe_settings()
        described.append((graph_pairs.MAX_ATOMS_VARIABLE, graph_pairs.max_atoms(), None,
                          f"most atoms whose pairs a captured MD step rebuilds itself (default: no limit with the "
                          f"kernels, above {graph_pairs.MAX_ATOMS} through a cell list; {graph_pairs.MAX_ATOMS} "
                          "with the torch reference)"))
    except ValueError as exc:  # a variable set to something unusable: say which, as a run would
        return {"invalid": str(exc)}
    return {name: {"value": value, "default": default, "tunes": tunes} for name, value, default, tunes in described}


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print as JSON")


def run(args) -> int:
    info = collect()
    if args.json:
        import json

        print(json.dumps(info, indent=1))
        return 0
    settings = info.pop("settings")
    for key, value in info.items():
        print(f"{key:10s} {value}")
    if "invalid" in settings:
        print(f"settings   invalid: {settings['invalid']}")
        return 0
    print("settings   (environment variables, read once per process)")
    for name, setting in settings.items():
        value = "unset" if setting["value"] is None else setting["value"]
        default = "" if setting["value"] == setting["default"] else f" (default {setting['default']})"
        print(f"  {name}={value}{default}: {setting['tunes']}")
    return 0
