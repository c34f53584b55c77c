"""The errors of `reco train` (all :class:`reco.errors.ReCoError`: one line and exit 2 at the CLI)."""

from __future__ import annotations

from reco.errors import ConfigError, ReCoError


class TrainingFailed(ReCoError, RuntimeError):
    """The Ray Train run failed beyond ``max_failures``; rerunning the same command resumes it."""


class TrainingDiverged(ReCoError, RuntimeError):
    """The loss became NaN or infinite: nothing is exported; a rerun would diverge again."""


class CheckpointDamaged(ReCoError, ValueError):
    """A checkpoint folder is incomplete, altered since it was written, or holds non-finite tensors."""


class NoIntactCheckpoint(ConfigError):
    """A run has checkpoints but none of them is intact: it cannot be resumed."""
