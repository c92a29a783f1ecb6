"""User-facing errors and the command-line error contract.

Every problem caused by user input (a config key, a file, a checkpoint) is raised as a
:class:`UserError` whose message is one line naming the key or file. Entry points wrap
their ``main`` with :func:`run_cli`, which prints ``error: <message>`` to stderr and
exits with status 2 (no traceback unless ``--debug`` is given or ``PRIMAPS_DEBUG=1``).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
    """An error caused by user input; its message is a single line naming the culprit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split("\n")))


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message starts with the dotted key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(f"config key '{key}': {problem}")


EXIT_USER_ERROR = 2


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("PRIMAPS_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; turn :class:`UserError` (and common I/O errors) into one line + exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        code = main(argv)
        return int(code or 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
        if debug:
            raise
        name = getattr(err, "filename", None)
        reason = err.strerror or type(err).__name__
        print(f"error: {name}: {reason}" if name else f"error: {reason}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
