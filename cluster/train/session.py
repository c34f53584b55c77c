"""Where a training loop runs: a Ray Train worker (:class:`RaySession`) or this process
(:class:`LocalSession`, no Ray and no DDP: benchmarks and tools)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Dict

import torch

from .config import CKPT_PREFIX, TrainConfig


class RaySession:
    """Ray Train V2 worker context."""

    def __init__(self, cfg: TrainConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if isinstance(self.device, list):
            self.device = self.device[0]

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader):
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: Dict[str, Any], folder: str, name: str) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        # Wait until the controller has committed it: a worker dying right after report() would
        # otherwise lose the report (it sits in the workers' result queues until the next poll).
        wait = getattr(ray.train, "get_all_reported_checkpoints", None)
        if wait is not None:
            wait(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            for b in module.buffers():
                dist.broadcast(b, 0)


class LocalCheckpoint:
    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class LocalSession:
    """The same loop in one plain process (no Ray, no DDP): benchmarks and tools."""

    def __init__(self, cfg: TrainConfig, run_dir: str):
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.run_dir = run_dir

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def get_checkpoint(self):
        names = (
            sorted(
                n
                for n in os.listdir(self.run_dir)
                if n.startswith(CKPT_PREFIX) and os.path.isdir(os.path.join(self.run_dir, n))
            )
            if os.path.isdir(self.run_dir)
            else []
        )
        return LocalCheckpoint(os.path.join(self.run_dir, names[-1])) if names else None

    def report(self, metrics: Dict[str, Any], folder: str, name: str) -> None:
        dest = os.path.join(self.run_dir, name)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest)
        with open(os.path.join(dest, "metrics.json"), "w") as f:
            json.dump(metrics, f)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        pass
