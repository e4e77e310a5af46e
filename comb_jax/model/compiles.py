"""Counting XLA compilations: jax records one backend-compile event per compilation (cache hits record none).

One listener for the whole process, registered once here, so serving's "nothing compiles after warm-up" and the
eval's "leave out requests that compiled" read the same count.
"""

from __future__ import annotations

import collections

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles: collections.Counter = collections.Counter()


def _on_duration_event(event: str, duration: float, **kwargs):
    if event == _BACKEND_COMPILE_EVENT:
        _compiles[str(kwargs.get("fun_name", "?"))] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)


def compile_count() -> int:
    """XLA compilations in this process so far."""
    return sum(_compiles.values())


def compiled_functions() -> dict[str, int]:
    return dict(_compiles)
