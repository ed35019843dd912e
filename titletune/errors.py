"""One exception for every problem the user can fix; entry points print it as one line and exit 2."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input or machine. The message says what was wrong and what to do."""


def cli(main):
    """Run `main` so that a UserError prints `error: <message>` and exits 2, and Ctrl-C exits 130, with no
    traceback. (Training catches Ctrl-C itself, to save a checkpoint first.)"""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("\ninterrupted (Ctrl-C)", file=sys.stderr)
            sys.exit(130)

    return wrapper
