"""The `vtfuse` command. The subcommands live in this package by group (`data`, `train`,
`compare`, `predict`, `apps`), each registered with `@command`; this module builds the parser
and runs one."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from vtfuse.cli import apps, compare, data, predict, train  # noqa: F401  (they register the subcommands)
from vtfuse.cli.commands import COMMANDS
from vtfuse.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtfuse", description="Vision-text cross-attention fusion."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["vtfuse", *argv])
    from vtfuse.data.images import ImageLoadError
    from vtfuse.data.jsonl import DataError
    from vtfuse.models.base import CheckpointError

    try:
        return args.handler(args)
    except (
        DataError,
        ImageLoadError,
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        ValueError,
    ) as error:
        print(f"vtfuse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
