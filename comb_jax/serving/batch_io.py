"""The batch JSONL mode's files: reading the input, naming lines without an id, and the output's partial file.

- The input is read as bytes, line by line (one bad byte costs only its line); a UTF-8 byte order mark at the
  start of the file is not part of line 1.
- A line without an `id` is reported as `line-N`, unless some line's own id is `line-N`: then `line-N~2`, ... so
  an automatic id can never make another line a duplicate.
- Results go to `OUTPUT.partial`, held under an exclusive `flock` for the whole run, then renamed to OUTPUT: a
  second run with the same --output stops before the model loads instead of writing into the first run's file,
  and an --output that is the input (or the input's partial file) is refused.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from comb_jax.errors import UsageError

BOM = b"\xef\xbb\xbf"
PARTIAL_SUFFIX = ".partial"


# ---------------------------------------------------------------------------------------------------------
# Input


def split_lines(data: bytes) -> list[bytes]:
    """The file's lines as bytes, without a leading byte order mark (editors on Windows write one)."""
    if data.startswith(BOM):
        data = data[len(BOM):]
    return data.split(b"\n")


def read_input_lines(path) -> list[bytes]:
    try:
        return split_lines(Path(path).read_bytes())
    except OSError as e:
        raise UsageError(f"--input {path} cannot be read: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------------------
# Ids


def id_key(rid) -> str:
    """Two ids are the same request when they print the same (7 and "7" too: both come back as id 7)."""
    return str(rid)


class AutoIds:
    """`line-N` for a line without an id, or `line-N~K` (the first K from 2 free) when an explicit id in the file
    is `line-N` already: explicit ids are the user's, so the automatic ones make way."""

    def __init__(self, explicit_ids):
        self.taken = {id_key(i) for i in explicit_ids}

    def __call__(self, line_no: int) -> str:
        rid, k = f"line-{line_no}", 2
        while rid in self.taken:
            rid, k = f"line-{line_no}~{k}", k + 1
        return rid


# ---------------------------------------------------------------------------------------------------------
# Output


def partial_path(output) -> Path:
    output = Path(output)
    return output.with_name(output.name + PARTIAL_SUFFIX)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_is_not_input(input_path, output_path):
    """UsageError when writing the results would replace or delete the input: --output is --input (or a link
    to it), or --input is the output's partial file."""
    if input_path is None:
        return
    src, out = Path(input_path), Path(output_path)
    if _same_file(src, out):
        raise UsageError(f"--output {out} is the input file: the results would replace the requests")
    if _same_file(src, partial_path(out)):
        raise UsageError(f"--input {src} is the partial file of --output {out}, which the run overwrites")


def open_locked_partial(output) -> tuple[Path, object]:
    """Open `OUTPUT.partial` for writing under an exclusive lock held until the file is closed.

    The lock is taken before truncating, so a concurrent run's rows are never clobbered; after locking, the
    path must still name the file we hold (the other run may have renamed it to OUTPUT in between)."""
    tmp = partial_path(output)
    for _ in range(3):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"--output {output} cannot be written: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"--output {output} is being written by another run (it holds {tmp}); "
                             "wait for it or choose another --output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(tmp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            return tmp, os.fdopen(fd, "w")
        os.close(fd)  # renamed away under us: open the new one
    raise UsageError(f"--output {output}: {tmp} keeps changing; is another run using it?")

