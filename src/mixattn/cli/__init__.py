"""The ``mixattn`` command. Each subcommand is a thin call into a library function; errors are
printed as one line (no traceback) and exit with status 2."""

from __future__ import annotations

import sys

from ..argtypes import UsageError
from .parser import build_parser

__all__ = ["build_parser", "main"]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status. Every error is one line on stderr, no traceback
    (set MIXATTN_DEBUG=1 to see one): 2 for bad input, 1 for an internal error, 130 for Ctrl-C and
    143 for SIGTERM (both after the training loop has saved a checkpoint)."""
    import os

    from ..train.loop import Terminated

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"mixattn: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    debug = os.environ.get("MIXATTN_DEBUG") == "1"
    try:
        return args.fn(args)
    except (ValueError, OSError) as e:  # bad input: the message names the file, key or argument
        if debug:
            raise
        print(f"mixattn {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixattn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"mixattn {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as e:
        if debug:
            raise
        print(f"mixattn {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(MIXATTN_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
