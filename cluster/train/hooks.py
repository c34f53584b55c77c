"""Observation points of the training loop, for tests: the registry is empty unless a test fills it.

Production code never adds a hook. A test that runs the loop in its own process adds one with
:func:`add`; for Ray Train workers (other processes) it passes a ``worker_setup`` callable to
:func:`cluster.train.execute_training`, which every worker calls before its loop starts, and
that callable adds the hook there. Events:

``step_end(step, rank)``: after a step and its checkpoint (if one was due) were committed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

_HOOKS: Dict[str, List[Callable[..., None]]] = {}
EVENTS = ("step_end",)


def add(event: str, fn: Callable[..., None]) -> None:
    if event not in EVENTS:
        raise ValueError(f"unknown training-loop event {event!r}; known: {EVENTS}")
    _HOOKS.setdefault(event, []).append(fn)


def clear() -> None:
    _HOOKS.clear()


def fire(event: str, **info: Any) -> None:
    for fn in _HOOKS.get(event, ()):
        fn(**info)
