"""Fault-injection points for tests: named places in the jobs' workers where a test can act.

Production code only *fires* points; the registry is empty unless a test fills it, so a point
costs one dictionary lookup and does nothing::

    faults.fire("bank.concept", name)          # cluster/bank.py, after each concept's work
    faults.fire("embed.batch", n)              # cluster/embed.py, after each embedded batch
    faults.fire("segment.batch", n)            # cluster/segment.py, after each segmented batch
    faults.fire("train.step", step, rank)      # cluster/train/loop.py, after each step (and its checkpoint)
    faults.fire("index.part", name)            # cluster/index_build.py, before each index part is filled
    faults.fire("exact.block", n)              # cluster/retrieval.py, before each block of shards is scored

A test in the same process registers a hook (``faults.register("bank.concept", fn)``, removed by
:func:`clear`). Jobs under test often run in other processes (a job started as a subprocess, its
Ray workers, the nodes of a multi-node test): there a test sets ``RECO_FAULT_HOOKS`` to the path
of a hook module **inside this repository's tests/ folder** (e.g. ``tests/fault_hooks.py``), which
each process imports once, at its first fired point, and which registers its hooks. Any other
path is refused (a :class:`~reco.errors.ConfigError` in the worker), so the variable can never
load code from elsewhere, and an installed package (no tests/ folder) has no hook to load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

from reco.errors import ConfigError

logger = logging.getLogger(__name__)

#: environment variable naming a test-only hook module (a file under the repository's tests/)
HOOKS_ENV = "RECO_FAULT_HOOKS"
#: the only folder hook modules may come from
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"

_hooks: Dict[str, List[Callable[..., Any]]] = {}
_env_loaded = False


def register(point: str, hook: Callable[..., Any]) -> None:
    """Call ``hook(*args)`` whenever ``point`` is fired in this process."""
    _hooks.setdefault(point, []).append(hook)


def clear() -> None:
    """Remove every hook of this process."""
    _hooks.clear()


def fire(point: str, *args: Any) -> None:
    """Run the hooks registered for ``point`` (none in production)."""
    if not _env_loaded:
        _load_env_hooks()
    for hook in _hooks.get(point, ()):
        hook(*args)


def _load_env_hooks() -> None:
    global _env_loaded
    _env_loaded = True
    value = os.environ.get(HOOKS_ENV)
    if not value:
        return
    path = Path(value).resolve()
    if TESTS_DIR not in path.parents or path.suffix != ".py" or not path.is_file():
        raise ConfigError(
            f"{HOOKS_ENV}={value}: fault hooks are loaded only from a .py file under {TESTS_DIR} (test-only); unset it"
        )
    spec = importlib.util.spec_from_file_location(f"reco_fault_hooks_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logger.warning("fault hooks loaded from %s (a test is running)", path)
