"""`nemotron-jax` command line: one module per group of subcommands, each with `register(subparsers)`.

Every user-facing error (`ValueError`, which `ConfigError` and `CheckpointError` subclass, and
`OSError`) ends the command with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that each add their subcommands; keep sorted.
COMMAND_MODULES = [
    "nemotron_jax.cli.compile_commands",
    "nemotron_jax.cli.eval_commands",
    "nemotron_jax.cli.generate_commands",
    "nemotron_jax.cli.model_commands",
    "nemotron_jax.cli.pipeline_commands",
    "nemotron_jax.cli.plan_commands",
    "nemotron_jax.cli.puzzle_commands",
    "nemotron_jax.cli.serve_commands",
    "nemotron_jax.cli.train_commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemotron-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        print(f"nemotron-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nemotron-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
