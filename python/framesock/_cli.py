"""What the two command-line programs share: options, and errors as one line instead of a trace."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from framesock._framesock import __version__


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options both programs take."""
    cli = argparse.ArgumentParser(prog=prog, description=description)
    cli.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    cli.add_argument("--host", default="127.0.0.1", help="address to use (default: %(default)s)")
    cli.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    cli.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="seconds each network step may take (default: %(default)s)",
    )
    return cli


def run(prog: str, body: Callable[[], None]) -> NoReturn:
    """Runs ``body``; exits 0, or non-zero with a one-line message on error or Ctrl-C."""
    try:
        body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, ValueError, TypeError) as err:
        # Every framesock error is one of these builtins too.
        print(f"{prog}: error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
