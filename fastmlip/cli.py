"""The ``fastmlip`` command: each subcommand lives in its own module with ``add_arguments`` and ``run``."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": ("fastmlip.info", "versions, devices and backends available here"),
    "convert": ("fastmlip.convert", "convert a MACE/SevenNet checkpoint to fastmlip (or back to e3nn)"),
    "md": ("fastmlip.md", "molecular dynamics with a model, on GPU if present"),
    "warmup": ("fastmlip.warmup", "compile a model's GPU kernels into the cache ahead of a run"),
    "lammps": ("fastmlip.lammps", "write a model as a LAMMPS potential (pair_style mliap unified)"),
    "kernels": ("fastmlip.kernels_cli", "list the Triton kernels a model launches (--show: their source)"),
}


def add_trust_arguments(parser) -> None:
    """--trust / --sha256, for model files that load only by running code they hold (MACE .model files)."""
    parser.add_argument("--trust", action="store_true",
                        help="load a model file that is a whole pickle (MACE .model): it can run code, so only "
                        "for files whose source you trust")
    parser.add_argument("--sha256", default=None, metavar="HEX",
                        help="trust the model file only if its SHA-256 is this (pin a file you checked once)")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2 (argparse prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    parser = _Parser(prog="fastmlip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
