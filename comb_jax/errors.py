"""The errors every layer raises for bad input, and how a command line reports them.

A usage or input error (bad flag, unknown config or key, a path that is missing or not writable, a corrupt
checkpoint) prints one line, `PROG: error: MESSAGE`, and exits with status 2: no traceback, no usage block. The
types live here, below everything, so that the entry points can name them without importing the layers that
raise them.
"""

from __future__ import annotations

import argparse
import sys

USAGE_EXIT = 2


class UsageError(Exception):
    """A problem with what the user asked for; the CLI prints it as one line and exits with status 2."""


class ConfigError(ValueError):
    """An unknown config, an unknown key or a value of the wrong type or range."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not fit the config."""


class ShippedModelError(RuntimeError):
    """Shipped weights that are damaged, replaced or trained for other shapes."""


class DataError(ValueError):
    """A data set, example or tokenizer setting that cannot be used."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ConfigError, CheckpointError, DataError, FileNotFoundError, FileExistsError, NotADirectoryError,
    IsADirectoryError, PermissionError, ValueError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`PROG: error: ...`, status 2) instead of the usage block."""

    def error(self, message):
        fail(self.prog, message)


def one_line(text: str, limit: int = 300) -> str:
    """The first line of an error message, cut to `limit` characters."""
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def fail(prog: str, message: str):
    print(f"{prog}: error: {one_line(message, 1000)}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def run(main, prog: str, argv=None) -> int:
    """`main(argv)`, with user errors printed as one line and exit status 2 (a bug still shows its traceback)."""
    try:
        return main(argv)
    except Exception as e:
        if not isinstance(e, USER_ERRORS):
            raise
        fail(prog, str(e) or type(e).__name__)
