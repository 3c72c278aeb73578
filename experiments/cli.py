"""`lens-steer`: one subcommand per study. Each study module exposes `register(subparsers)`,
which adds its parser (usually through `experiments.config.register_command`) and sets
`func(args) -> int | None`.

User errors (`LensSteerError`, and a missing file or a refused value named by the command) print
as one line, `lens-steer: error: ...`, with exit status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lens_steer.errors import LensSteerError

# Modules that register subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "experiments.demo",
    "experiments.toy",
    "experiments.coconut_cmd",
    "experiments.cache_cmd",
    "experiments.plan_cmd",
    "experiments.probe_cmd",
    "experiments.seal",
    "experiments.asc",
    "experiments.probe_layers",
    "experiments.layer_sweep",
    "experiments.alpha_sweep",
    "experiments.ablation",
    "experiments.ablate",
    "experiments.patch",
    "experiments.transfer",
    "experiments.compare",
)

USER_ERRORS = (LensSteerError, FileNotFoundError, NotADirectoryError, PermissionError,
               ConnectionError)
"""Printed as one line. Other ValueErrors may be bugs: they keep their traceback unless they
are `ConfigError`/`DataError` (both `LensSteerError`)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-steer",
        description="Thought-level interpretability and steering of reasoning models "
                    "(SEAL, ASC, Coconut).")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err) if isinstance(err, LensSteerError) else f"{err}"
        print(f"lens-steer: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
