"""Static shapes for jit: a length is padded up to a bucket, so a few shapes compile instead of one per length."""

from __future__ import annotations


def bucket_for(n: int, buckets, what: str = "", error: type[Exception] = ValueError) -> int:
    """The smallest of `buckets` that holds `n`; `error` (naming `what` when given) when none does."""
    for b in sorted(buckets):
        if n <= b:
            return b
    if what:
        raise error(f"{what} of {n} tokens exceeds the largest bucket {max(buckets)}")
    raise error(f"{n} tokens exceed the largest bucket {max(buckets)}")


def power_of_two(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): buckets for lengths with no configured list."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple` (at least one multiple)."""
    return max(multiple, -(-int(n) // multiple) * multiple)
