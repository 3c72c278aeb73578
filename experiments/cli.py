"""`lens-steer`: one subcommand per study. Each study module exposes `register(subparsers)`,
which adds its parser and sets `func(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import sys

from experiments.common import config_defaults_from_file

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
    "experiments.transfer",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-steer",
        description="Thought-level interpretability and steering of reasoning models "
                    "(SEAL, ASC, Coconut).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args = config_defaults_from_file(parser, argv, args)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
