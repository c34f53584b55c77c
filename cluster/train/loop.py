"""The training loop, one per worker (Ray Train) or in this process (:func:`run_local`).

Resume: the loop restores model, optimiser, scheduler, step, per-rank RNG states and the loss
history from the checkpoint Ray Train hands it (after a worker failure, or from its snapshot on
a rerun) or, when Ray has none, from the newest intact checkpoint the driver found
(``LoopConfig.resume_from``). Every checkpoint is verified (:func:`verify_checkpoint`) before
anything is loaded from it. A NaN/Inf loss stops the loop before it writes another checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from cluster import faults
from reco.errors import ConfigError

from .checkpoint import checkpoint_name, fetched_checkpoint, restore_checkpoint, verify_checkpoint, write_checkpoint
from .config import DIVERGED_FILE, IGNORE, LoopConfig, TrainConfig
from .data import PseudoLabelDataset, Sample, StepSampler, load_sample, read_pseudo_labels, split_holdout, target_ids
from .errors import CheckpointDamaged, TrainingDiverged
from .session import LocalSession, RaySession


def train_loop_per_worker(loop_config: Dict[str, Any]) -> None:
    """Ray Train entry point: ``train_loop_config = {"loop": LoopConfig, "worker_setup": callable or None}``."""
    setup: Optional[Callable[[], None]] = loop_config.get("worker_setup")
    if setup is not None:
        setup()
    lc: LoopConfig = loop_config["loop"]
    train_loop(lc, RaySession(lc.train))


def _say(line: str) -> None:
    """Progress on the console: stdout of the worker, which Ray forwards to the driver (plain
    ``sys.stdout.write``: Ray Train patches ``print`` into its logger, which prints it twice)."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _holdout_miou(
    core, holdout: Sequence[Sample], num_classes: int, cfg: TrainConfig, session, mean, std, storage_options, bf16: bool
) -> float:
    """mIoU of the model against the pseudo-labels of its rank's share of the held-out images,
    confusion matrices summed over ranks (same inference as the exported model)."""
    from reco.metrics import ConfusionMatrix
    from reco.segmodel import predict_logits

    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    for s in holdout[session.rank :: session.world_size]:
        img, lab, conf = load_sample(s, storage_options)
        y = target_ids(lab, conf, num_classes, cfg.confidence_threshold)
        pred = predict_logits(core, img, cfg.base_size, mean, std, session.device, bf16).argmax(0)
        cm.update(pred, torch.from_numpy(y))
    m = session.all_reduce(cm.matrix.to(session.device)).cpu()
    cm.matrix = m
    return float(cm.compute().miou)


@dataclass
class _Setup:
    """What one worker trains: data, model (wrapped and unwrapped), optimiser, scheduler."""

    classes: List[str]
    train: List[Sample]
    holdout: List[Sample]
    holdout_info: Dict[str, Any]
    spec: Any
    model: torch.nn.Module
    core: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    bf16: bool


def _setup(lc: LoopConfig, session) -> _Setup:
    from index.storage import fetch_to_cache, file_sha256
    from reco.segmodel import SegModelSpec, build_model, load_encoder_weights, read_state_dict, required_multiple

    cfg, so = lc.train, lc.storage_options
    if session.device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and session.device.type == "cuda")
    data = read_pseudo_labels(lc.labels_uri, so)
    if data.digest != lc.data_digest:
        raise ConfigError(
            f"the pseudo-labels under {lc.labels_uri} changed since the run was configured "
            f"(digest {data.digest[:12]} != {lc.data_digest[:12]})"
        )
    train, holdout = split_holdout(data.samples, cfg)
    held = [s.id for s in holdout]
    info = {
        "count": len(held),
        "ids_sha256": hashlib.sha256("\n".join(held).encode()).hexdigest(),
        "ids": held if len(held) <= 1000 else held[:1000] + ["..."],
    }
    spec = SegModelSpec(cfg.encoder, len(data.classes), cfg.output_stride, cfg.decoder_channels)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(spec)
    if cfg.crop_size % required_multiple(model):
        raise ConfigError(
            f"crop_size {cfg.crop_size} must be a multiple of the encoder's stride {required_multiple(model)}"
        )
    if cfg.encoder_weights:
        path = fetch_to_cache(cfg.encoder_weights, so)
        want = lc.encoder_weights_sha256
        if want and file_sha256(path) != want:
            raise ConfigError(
                f"encoder_weights {cfg.encoder_weights} changed since the run was configured (sha256 {want[:12]}...)"
            )
        load_encoder_weights(model, read_state_dict(path), cfg.encoder_weights)
    model = session.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    enc_ids = {id(p) for p in core.encoder.parameters()}
    head = [p for p in core.parameters() if id(p) not in enc_ids]
    opt = torch.optim.Adam(
        [
            {"params": head, "lr": cfg.lr_head, "name": "head"},
            {"params": list(core.encoder.parameters()), "lr": cfg.lr_encoder, "name": "encoder"},
        ],
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.iterations) ** cfg.poly_power)
    return _Setup(list(data.classes), train, holdout, info, spec, model, core, opt, sched, bf16)


def _restore(lc: LoopConfig, session, s: _Setup) -> Dict[str, Any]:
    """The loop state to start from: Ray Train's checkpoint, else the driver's ``resume_from``,
    else a fresh start. Both are verified first."""
    from index.storage import join

    def load(folder: str, name: str) -> Dict[str, Any]:
        try:
            verify_checkpoint(folder)
        except CheckpointDamaged as exc:
            raise CheckpointDamaged(
                f"checkpoint {name} of {lc.run_uri or 'this run'} is damaged ({exc}): "
                "rerun the same command to fall back to an older intact one"
            ) from None
        return restore_checkpoint(folder, session.rank, s.core, s.opt, s.sched, lc.config_hash)

    ckpt = session.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            return load(d, os.path.basename(str(ckpt.path).rstrip("/")))
    if lc.resume_from:
        with fetched_checkpoint(join(lc.run_uri, lc.resume_from), lc.storage_options) as d:
            return load(d, lc.resume_from)
    torch.manual_seed(lc.train.seed * 1000 + 1 + session.rank)  # dropout streams differ per rank
    return {"step": 0, "history": [], "attempts": [], "train_seconds": 0.0, "checkpoints": []}


def _diverged(lc: LoopConfig, session, first: int, step: int, value: float) -> None:
    """Stop: the loss is not finite. In this process: raise. On Ray Train: rank 0 leaves
    ``RUN/train_diverged.json`` for the driver and every rank returns (an error would only make
    Ray Train restart the group into the same divergence, ``max_failures`` times)."""
    cfg = lc.train
    steps = f"step {step}" if first == step else f"steps {first}-{step}"
    msg = (
        f"training diverged: the loss is {value} over {steps}; nothing was exported and no checkpoint was written "
        f"after it: lower the learning rates (lr_head {cfg.lr_head}, lr_encoder {cfg.lr_encoder}) or check the "
        "pseudo-labels and encoder weights"
    )
    if isinstance(session, LocalSession):
        raise TrainingDiverged(msg)
    if session.rank == 0:
        from index.storage import join, write_bytes

        write_bytes(
            join(lc.run_uri, DIVERGED_FILE),
            json.dumps({"step": step, "loss": str(value), "message": msg}).encode(),
            lc.storage_options,
        )
        _say(f"[reco train] {msg}")


def train_loop(lc: LoopConfig, session) -> Dict[str, Any]:
    """Train from the restored step to ``iterations``; returns the final loop state."""
    from reco.segmodel import IMAGENET_MEAN, IMAGENET_STD

    cfg, so = lc.train, lc.storage_options
    rank, world = session.rank, session.world_size
    s = _setup(lc, session)
    state = _restore(lc, session, s)
    start = int(state["step"])
    state["attempts"] = list(state.get("attempts", [])) + [
        {
            "start_step": start,
            "world_size": world,
            "device": str(session.device),
            "bf16": s.bf16,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    ]
    if rank == 0:
        _say(
            f"[reco train] {'resuming at step ' + str(start) if start else 'starting'}: {len(s.train)} training "
            f"images ({len(s.holdout)} held out), {len(s.classes)} classes, {cfg.encoder}, {world} worker(s) on "
            f"{session.device}{' bf16' if s.bf16 else ''}, global batch {cfg.batch_size}"
        )
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    ds = PseudoLabelDataset(s.train, cfg, len(s.classes), so, mean, std)
    sampler = StepSampler(len(s.train), cfg.batch_size, rank, world, start, cfg.iterations, cfg.seed)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.per_worker_batch,
        sampler=sampler,
        num_workers=cfg.loader_workers,
        pin_memory=session.device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # keeps the global RNG untouched
    loader = session.prepare_loader(loader)
    model, step = s.model, start
    win_loss, win_n, win_t = torch.zeros((), dtype=torch.float64, device=session.device), 0, time.perf_counter()
    attempt_t0 = time.perf_counter()
    base_seconds = float(state.get("train_seconds", 0.0))
    model.train()
    for x, y in loader:
        x = x.to(session.device, non_blocking=True)
        y = y.to(session.device, non_blocking=True)
        with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=s.bf16):
            out = model(x)
        valid = (y != IGNORE).sum()
        loss = torch.nn.functional.cross_entropy(
            out.float(), y, ignore_index=IGNORE, reduction="sum"
        ) / valid.clamp_min(1)
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
        s.sched.step()
        step += 1
        win_loss += loss.detach()  # stays on the device: no per-step synchronisation
        win_n += 1
        last = step == cfg.iterations
        log_now, ckpt_now = step % cfg.log_every == 0 or last, step % cfg.checkpoint_every == 0 or last
        if log_now or ckpt_now:  # the window's loss over all ranks: NaN/Inf anywhere in it shows here
            t = session.all_reduce(
                torch.stack([win_loss, torch.tensor(float(win_n), dtype=torch.float64, device=session.device)])
            ).cpu()
            if not math.isfinite(float(t[0])):
                _diverged(lc, session, step - win_n + 1, step, float(t[0] / t[1]))
                return state
        if log_now:
            dt = max(time.perf_counter() - win_t, 1e-9)
            sps = win_n / dt
            lrs = [g["lr"] for g in s.opt.param_groups]
            entry = {
                "step": step,
                "loss": float(t[0] / t[1]),
                "lr_head": lrs[0],
                "lr_encoder": lrs[1],
                "steps_per_s": sps,
                "images_per_s": sps * cfg.batch_size,
                "train_seconds": base_seconds + time.perf_counter() - attempt_t0,
            }
            state["history"].append(entry)
            if rank == 0:
                _say(
                    f"[reco train] step {step}/{cfg.iterations} loss {entry['loss']:.4f} lr {lrs[0]:.2e}/{lrs[1]:.2e} "
                    f"{sps:.2f} steps/s {sps * cfg.batch_size:.1f} img/s ETA {_fmt_eta((cfg.iterations - step) / sps)}"
                )
            win_loss, win_n, win_t = torch.zeros_like(win_loss), 0, time.perf_counter()
        if ckpt_now:
            state["train_seconds"] = base_seconds + time.perf_counter() - attempt_t0
            _checkpoint(lc, session, s, state, step, mean, std)
            model.train()
        faults.fire("train.step", step, rank)  # tests only (the registry is empty in production)
    return state


def _checkpoint(lc: LoopConfig, session, s: _Setup, state: Dict[str, Any], step: int, mean, std) -> None:
    """Evaluate the hold-out slice (if any), then write and report the checkpoint of ``step``."""
    cfg = lc.train
    metrics: Dict[str, Any] = {
        "step": step,
        "config_hash": lc.config_hash,
        "loss": state["history"][-1]["loss"] if state["history"] else float("nan"),
    }
    if s.holdout:
        session.broadcast_buffers(s.core)  # every rank evaluates with rank 0's BN statistics (the saved ones)
        metrics["holdout_miou"] = _holdout_miou(
            s.core, s.holdout, len(s.classes), cfg, session, mean, std, lc.storage_options, s.bf16
        )
    spec = s.spec
    state.update(
        step=step,
        config_hash=lc.config_hash,
        classes=s.classes,
        spec={
            "encoder": spec.encoder,
            "num_classes": spec.num_classes,
            "output_stride": spec.output_stride,
            "decoder_channels": spec.decoder_channels,
        },
        base_size=cfg.base_size,
        mean=list(mean),
        std=list(std),
        world_size=session.world_size,
        holdout=s.holdout_info,
        metrics=metrics,
    )
    name = checkpoint_name(step)
    state["checkpoints"] = list(state.get("checkpoints", [])) + [{"name": name, **metrics}]
    with tempfile.TemporaryDirectory(prefix="reco_ckpt_") as d:
        write_checkpoint(d, session.rank, s.core, s.opt, s.sched, state)
        session.report(metrics, d, name)


def run_local(labels_uri: str, run_dir: str, cfg: TrainConfig, storage_options=None) -> Dict[str, Any]:
    """The same training loop in this process, without Ray or DDP (``num_workers`` must be 1).
    For benchmarks: returns the final loop state (history with steps/s)."""
    from .config import config_hash

    if cfg.num_workers != 1:
        raise ConfigError("run_local runs one worker")
    data = read_pseudo_labels(labels_uri, storage_options)
    chash, _ = config_hash(cfg, data.digest, None)
    os.makedirs(run_dir, exist_ok=True)
    lc = LoopConfig(cfg, labels_uri, data.digest, chash, dict(storage_options or {}), run_uri=run_dir)
    return train_loop(lc, LocalSession(cfg, run_dir))
