"""``jaxhet <command>``: every command lives in its own module ``jaxhet/cli/_<name>.py``
which defines ``register(subparsers)``; the parser it adds sets ``func=run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxhet._errors import JaxhetInputError

# command modules, in the order ``jaxhet --help`` lists them
COMMANDS = ["_demo", "_simulate", "_info", "_reconstruct", "_refine", "_abinitio", "_classify", "_multibody",
            "_train", "_covariance", "_evalvol", "_analyze"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxhet",
        description="Continuous conformational heterogeneity in cryo-EM, in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"jaxhet.cli.{name}")
        except ModuleNotFoundError as e:  # a command module not present in this build
            if e.name == f"jaxhet.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except JaxhetInputError as e:
        print(f"jaxhet: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"jaxhet: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jaxhet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
