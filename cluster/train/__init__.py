"""ReCo+ training: DeepLabV3+ on ReCo's pseudo-labels with Ray Train V2 (``TorchTrainer``).

Modules: :mod:`.config` (TrainConfig, LoopConfig, config hash), :mod:`.data` (pseudo-label rows,
hold-out split, augmentation, step-indexed sampler), :mod:`.checkpoint` (safetensors + JSON,
digests, verification), :mod:`.session` (Ray Train worker or this process), :mod:`.loop` (the
per-worker loop), :mod:`.backend` (the torch process group, on loopback when Ray is),
:mod:`.driver` (plan, run, select, export, report), :mod:`.plot` (the curve). The loop fires
the test-only fault point ``train.step`` (:mod:`cluster.faults`).
"""

from .checkpoint import (
    checkpoint_segmodel,
    read_checkpoint_state,
    restore_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from .config import IGNORE, OPERATIONAL, LoopConfig, TrainConfig, config_hash, load_train_config
from .data import (
    PseudoLabelDataset,
    PseudoLabels,
    Sample,
    StepSampler,
    augment,
    load_sample,
    read_pseudo_labels,
    split_holdout,
    target_ids,
)
from .driver import TrainPlan, TrainResult, execute_training, plan_training, run_training, select_checkpoint
from .errors import CheckpointDamaged, NoIntactCheckpoint, TrainingDiverged, TrainingFailed
from .loop import run_local, train_loop_per_worker
from .plot import render_curve

__all__ = [
    "IGNORE",
    "OPERATIONAL",
    "CheckpointDamaged",
    "LoopConfig",
    "NoIntactCheckpoint",
    "PseudoLabelDataset",
    "PseudoLabels",
    "Sample",
    "StepSampler",
    "TrainConfig",
    "TrainPlan",
    "TrainResult",
    "TrainingDiverged",
    "TrainingFailed",
    "augment",
    "checkpoint_segmodel",
    "config_hash",
    "execute_training",
    "load_sample",
    "load_train_config",
    "plan_training",
    "read_checkpoint_state",
    "read_pseudo_labels",
    "render_curve",
    "restore_checkpoint",
    "run_local",
    "run_training",
    "select_checkpoint",
    "split_holdout",
    "target_ids",
    "train_loop_per_worker",
    "verify_checkpoint",
    "write_checkpoint",
]
