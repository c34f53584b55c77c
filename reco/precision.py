"""Numerics guard: similarities, sigmoids and argmax always run in float32.

The encoders may run under bf16 autocast (CUDA, or CPU for tests); inside autocast every einsum
or matmul is silently done in bf16, whose 8-bit mantissa flips the argmax between concepts whose
cosines differ in the third decimal (measured: ~4% of pixels). :func:`full_precision` switches
autocast off for the block it guards, whatever device type enabled it, and :func:`fp32` does the
same for a whole function. Inputs are still cast with ``.float()`` by the functions themselves.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_AUTOCAST_DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable every active autocast inside the block (a no-op when none is active)."""
    with contextlib.ExitStack() as stack:
        for dev in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def fp32(fn: F) -> F:
    """Decorator: run ``fn`` with autocast disabled (see :func:`full_precision`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_precision():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
