"""The driver of `reco train`: ReCo+ (DeepLabV3+) on ReCo's pseudo-labels with Ray Train V2.

Inputs: the output URI of ``reco pseudo-label`` (``OUT/manifest/part-*.parquet`` rows with
status ``ok``, ``OUT/labels/<id>.png``, optional ``OUT/confidence/<id>.png``, the class list in
``OUT/pseudo_label.json``) and a :class:`TrainConfig` (paper recipe by default).

**Run layout** (``RUN = STORAGE/NAME``, a local path or an fsspec URL such as ``s3://``)::

    RUN/train_settings.json        config hash + what it covers; a rerun with another hash is refused
    RUN/train_config.yaml          the resolved TrainConfig
    RUN/checkpoint_00001000/       checkpoints (every ``checkpoint_every`` steps + the last; see .checkpoint)
    RUN/damaged_checkpoints/       damaged checkpoints set aside when a run fell back to an older one
    RUN/checkpoint_manager_snapshot.json ...   Ray Train's own bookkeeping
    RUN/model/model.safetensors + model.json   the exported model (safetensors + JSON, no pickle)
    RUN/train_report.json, RUN/train_curve.png the report: loss + lr over steps, throughput, checkpoints

**Resume.** Ray Train V2 hands the latest reported checkpoint to the workers after a worker
failure (``FailureConfig(max_failures)``) and to a new job started with the same ``name`` and
storage path (its checkpoint-manager snapshot). Before Ray starts, :func:`plan_training` verifies
the run's checkpoints newest first: a damaged one is reported, set aside, and the run resumes
from the newest intact one; none intact is an error. A different configuration under the same
name is refused. A NaN/Inf loss stops the run (:class:`TrainingDiverged`): nothing is exported.

**Checkpoint selection never uses an evaluation split**: ``selection: last`` exports the last
checkpoint; ``selection: holdout`` keeps a hash-chosen slice of the *pseudo-labelled training
images* out of training and exports the checkpoint with the best mIoU against their
pseudo-labels. The report says which.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from index.storage import filesystem
from reco.config import to_dict
from reco.errors import ConfigError, WeightsNotFoundError

from .checkpoint import checkpoint_segmodel, list_checkpoints, read_checkpoint_state, survey, verify_checkpoint
from .config import (
    CONFIG_FILE,
    DIVERGED_FILE,
    MODEL_DIR,
    PLOT_FILE,
    REPORT_FILE,
    SETTINGS_FILE,
    LoopConfig,
    TrainConfig,
    config_hash,
)
from .data import PseudoLabels, read_pseudo_labels, split_holdout
from .errors import CheckpointDamaged, TrainingDiverged, TrainingFailed
from .plot import render_curve

logger = logging.getLogger(__name__)

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's list of the run's checkpoints
DAMAGED_DIR = "damaged_checkpoints"


@dataclass
class TrainResult:
    run_uri: str
    model_uri: str
    report: Dict[str, Any] = field(default_factory=dict)


def _ray_storage(storage_uri: str, storage_options):
    """(storage_path, storage_filesystem) for ``RunConfig``: local paths as they are, fsspec URLs
    through a pyarrow ``PyFileSystem(FSSpecHandler(...))`` carrying the storage options."""
    from index.storage import filesystem, is_url, local_path

    if not is_url(storage_uri):
        p = local_path(storage_uri).resolve()
        p.mkdir(parents=True, exist_ok=True)
        return str(p), None
    import pyarrow.fs as pafs

    fs, path = filesystem(storage_uri, storage_options)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _run_output(run_uri: str, storage_options):
    from index.output import ResumableOutput

    return ResumableOutput(run_uri, "train", SETTINGS_FILE, storage_options=storage_options)


def _settings_diff(have: Dict[str, Any], settings: Dict[str, Any]) -> str:
    """What differs between a run's recorded settings and these (for the refusal message)."""
    diff = sorted(
        k
        for k in set(have.get("train") or {}) | set(settings["train"])
        if (have.get("train") or {}).get(k) != settings["train"].get(k)
    )
    if have.get("data_digest") != settings["data_digest"]:
        diff.append("pseudo-labels (data digest)")
    if have.get("encoder_weights_sha256") != settings["encoder_weights_sha256"]:
        diff.append("encoder weights file")
    return f"differs in: {', '.join(diff) or 'unknown'}"


def _check_settings(run_uri: str, settings: Dict[str, Any], storage_options, overwrite: bool) -> Optional[bool]:
    """None for a new run, True for a run of this configuration, False for another one with
    ``overwrite`` (refused without it, naming what differs). Reads only."""
    have = _run_output(run_uri, storage_options).read_settings()  # ConfigError when damaged
    if have is None:
        return None
    if not isinstance(have.get("train", {}), dict):
        raise ConfigError(
            f"{run_uri}/{SETTINGS_FILE} is corrupt (no train settings): remove it, or use --overwrite / another --name"
        )
    if have.get("config_hash") == settings["config_hash"]:
        return True
    if overwrite:
        return False
    raise ConfigError(
        f"run {run_uri} was trained with another configuration (config hash "
        f"{have.get('config_hash')}, now {settings['config_hash']}; {_settings_diff(have, settings)}): "
        "use another --name or storage path, or --overwrite to start it afresh"
    )


def _check_model(cfg: TrainConfig, num_classes: int, weights_path) -> None:
    """Build the model on the driver, as every worker will: the encoder, its output stride, the
    crop size and (when given) the encoder weights: they load, fit the encoder and are finite."""
    from reco.segmodel import SegModelSpec, build_model, load_encoder_weights, read_state_dict, required_multiple

    model = build_model(SegModelSpec(cfg.encoder, num_classes, cfg.output_stride, cfg.decoder_channels))
    if cfg.crop_size % required_multiple(model):
        raise ConfigError(
            f"crop_size {cfg.crop_size} must be a multiple of the encoder's stride {required_multiple(model)}"
        )
    if weights_path is not None:
        load_encoder_weights(model, read_state_dict(weights_path), cfg.encoder_weights)


def _check_folder(uri: str, what: str, storage_options) -> None:
    """``uri`` is a folder or does not exist yet (never a file)."""
    from index.storage import is_file

    if is_file(uri, storage_options):
        raise ConfigError(f"{what} {uri} is a file: give a folder (it is created when missing)")


@dataclass
class TrainPlan:
    """Everything checked before Ray starts (:func:`plan_training`)."""

    labels_uri: str
    storage_uri: str
    name: str
    run_uri: str
    cfg: TrainConfig
    data: PseudoLabels
    settings: Dict[str, Any]
    storage_options: Dict[str, Any]
    n_train: int
    n_holdout: int
    resume_from: Optional[str] = None  # the newest intact checkpoint
    damaged: List[Tuple[str, str]] = field(default_factory=list)  # (name, problem), newer than resume_from
    overwrite: bool = False  # the run holds another configuration and is started afresh

    @property
    def config_hash(self) -> str:
        return self.settings["config_hash"]


def plan_training(
    labels_uri: str,
    storage_uri: str,
    name: str,
    cfg: TrainConfig = TrainConfig(),
    storage_options: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> TrainPlan:
    """Check a run before anything starts: the run name, the storage folder, the encoder, the
    weight file, the pseudo-labels (manifest present, usable rows, confidence maps when a threshold
    is set), that ``storage_uri/name`` holds no run of another configuration (unless
    ``overwrite``), and its checkpoints (the newest intact one is resumed from; none intact is an
    error). Writes nothing. Raises
    :class:`ConfigError` / ``FileNotFoundError`` (:class:`WeightsNotFoundError` for weights)."""
    from index.storage import fetch_to_cache, file_sha256, join
    from reco.segmodel import check_encoder

    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise ConfigError(f"--name {name!r}: give a plain run name (no '/')")
    run_uri = join(storage_uri, name)
    _check_folder(storage_uri, "--storage", storage_options)
    _check_folder(run_uri, "the run folder", storage_options)
    check_encoder(cfg.encoder)
    weights_path = None
    if cfg.encoder_weights:
        try:
            weights_path = fetch_to_cache(cfg.encoder_weights, storage_options)
        except FileNotFoundError as exc:
            raise WeightsNotFoundError(f"encoder_weights {cfg.encoder_weights} does not exist") from exc
    data = read_pseudo_labels(labels_uri, storage_options)
    _check_model(cfg, len(data.classes), weights_path)
    weights_sha = file_sha256(weights_path) if weights_path else None
    if cfg.confidence_threshold is not None:
        lacking = [s.id for s in data.samples if not s.confidence]
        if lacking:
            raise ConfigError(
                f"confidence_threshold is set but {len(lacking)} pseudo-labels have no confidence map "
                f"(e.g. {lacking[0]}): pseudo-label with --confidence-maps, or drop the threshold"
            )
    train, holdout = split_holdout(data.samples, cfg)
    chash, core = config_hash(cfg, data.digest, weights_sha)
    settings = {
        "config_hash": chash,
        **core,
        "labels_uri": labels_uri,
        "classes": list(data.classes),
        "pseudo_label_config_hash": data.settings.get("config_hash"),
    }
    same = _check_settings(run_uri, settings, storage_options, overwrite)
    resume_from, damaged = survey(run_uri, storage_options) if same is not False else (None, [])
    return TrainPlan(
        labels_uri,
        storage_uri,
        name,
        run_uri,
        cfg,
        data,
        settings,
        dict(storage_options or {}),
        len(train),
        len(holdout),
        resume_from,
        damaged,
        same is False,
    )


def _set_damaged_aside(plan: TrainPlan) -> None:
    """Move the damaged checkpoints newer than the one resumed from into ``RUN/damaged_checkpoints/``
    and drop Ray Train's snapshot (it names them; without it Ray starts a fresh list and the loop
    resumes from ``plan.resume_from``). One warning line."""
    from index.storage import is_url, join, local_path, remove_files

    for name, _ in plan.damaged:
        src, dst = join(plan.run_uri, name), join(plan.run_uri, DAMAGED_DIR, f"{name}.{int(time.time())}")
        if is_url(src):
            fs, path = filesystem(src, plan.storage_options)
            fs.mv(path, filesystem(dst, plan.storage_options)[1], recursive=True)
        else:
            local_path(dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local_path(src), local_path(dst))
    remove_files([join(plan.run_uri, RAY_SNAPSHOT)], plan.storage_options)
    name, problem = plan.damaged[0]
    more = f" (and {len(plan.damaged) - 1} more)" if len(plan.damaged) > 1 else ""
    logger.warning(
        "checkpoint %s of run %s is damaged (%s)%s: set aside in %s/; resuming from %s",
        name,
        plan.run_uri,
        problem,
        more,
        DAMAGED_DIR,
        plan.resume_from,
    )


def _forget_run(run_uri: str, storage_options) -> None:
    """``--overwrite`` of a run of another configuration (under its lock): its checkpoints, Ray
    Train's snapshot, the damaged ones set aside, the exported model and the reports go."""
    from index.storage import is_url, join, local_path, remove_files

    names = [n for _, n in list_checkpoints(run_uri, storage_options)] + [DAMAGED_DIR, MODEL_DIR]
    for name in names:
        uri = join(run_uri, name)
        if is_url(uri):
            fs, path = filesystem(uri, storage_options)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            shutil.rmtree(local_path(uri), ignore_errors=True)
    remove_files([join(run_uri, n) for n in (RAY_SNAPSHOT, DIVERGED_FILE, REPORT_FILE, PLOT_FILE)], storage_options)
    logger.warning(
        "--overwrite: run %s of another configuration started afresh (%d checkpoint(s) removed)",
        run_uri,
        len(names) - 2,
    )


def execute_training(
    plan: TrainPlan, worker_setup: Optional[Callable[[], None]] = None, start_ray: Optional[Callable[[], Any]] = None
) -> TrainResult:
    """Run a checked plan on Ray Train, then export and report, holding the run's writer lock
    (:class:`index.output.ResumableOutput`: local or S3; a second writer is refused).
    ``start_ray``: called once the lock is held (the CLI starts Ray there: a refused run never
    starts it); otherwise Ray must be initialised. ``worker_setup``: called in every train worker
    before its loop starts (e.g. a test registering :mod:`cluster.faults` hooks there: the
    workers are other processes)."""
    import yaml

    from index.storage import exists, join, read_bytes, remove_files

    from .backend import cluster_is_loopback

    so, cfg, run_uri = plan.storage_options, plan.cfg, plan.run_uri
    covered = {k: plan.settings[k] for k in ("train", "data_digest", "encoder_weights_sha256")}
    extra = {k: v for k, v in plan.settings.items() if k not in covered and k != "config_hash"}
    out = _run_output(run_uri, so)
    with out.open(
        covered,
        overwrite=plan.overwrite,
        extra=extra,
        describe=_settings_diff(out.read_settings() or {}, plan.settings),
    ):
        assert out.settings["config_hash"] == plan.config_hash, "train and index.output hash alike"
        existed = out.previous is not None
        if existed and out.previous.get("config_hash") != plan.config_hash:
            _forget_run(run_uri, so)
            existed = False
        out.write_file(CONFIG_FILE, yaml.safe_dump({"train": to_dict(cfg)}, sort_keys=False).encode())
        if plan.damaged:
            _set_damaged_aside(plan)
        remove_files([join(run_uri, DIVERGED_FILE)], so)
        if start_ray is not None:
            start_ray()
        logger.info(
            "%s run %s: %d training images, %d held out, %d classes, config hash %s",
            "resuming" if existed else "starting",
            run_uri,
            plan.n_train,
            plan.n_holdout,
            len(plan.data.classes),
            plan.config_hash,
        )
        lc = LoopConfig(
            cfg,
            plan.labels_uri,
            plan.data.digest,
            plan.config_hash,
            so,
            plan.settings["encoder_weights_sha256"],
            run_uri,
            plan.resume_from,
            tuple(n for n, _ in plan.damaged),
            cluster_is_loopback(),
        )
        t0 = time.perf_counter()
        result = _fit({"loop": lc, "worker_setup": worker_setup}, cfg, plan.storage_uri, plan.name, so, lc.loopback)
        diverged = join(run_uri, DIVERGED_FILE)
        if exists(diverged, so):
            raise TrainingDiverged(json.loads(read_bytes(diverged, so))["message"])
        return _finish(result, plan, out, time.perf_counter() - t0)


def run_training(
    labels_uri: str,
    storage_uri: str,
    name: str,
    cfg: TrainConfig = TrainConfig(),
    storage_options: Optional[Mapping[str, Any]] = None,
    worker_setup: Optional[Callable[[], None]] = None,
) -> TrainResult:
    """Train ReCo+ on the pseudo-labels at ``labels_uri`` into ``storage_uri/name`` with Ray Train
    (Ray must be initialised). Resumes a run of the same configuration; refuses another one."""
    return execute_training(plan_training(labels_uri, storage_uri, name, cfg, storage_options), worker_setup)


def _fit(loop_config: Dict[str, Any], cfg: TrainConfig, storage_uri: str, name: str, storage_options, loopback: bool):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .backend import torch_config
    from .loop import train_loop_per_worker

    try:
        from ray.train import TrainingFailedError
    except ImportError:  # pragma: no cover
        TrainingFailedError = RuntimeError  # type: ignore

    path, fs = _ray_storage(storage_uri, storage_options)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    holdout = cfg.selection == "holdout"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=torch_config(cfg.use_gpu, loopback),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="holdout_miou" if holdout else "step",
                checkpoint_score_order="max",
            ),
        ),
    )
    try:
        return trainer.fit()
    except TrainingFailedError as exc:
        msg = str(exc).strip().splitlines()
        raise TrainingFailed(
            f"training run {name} failed ({type(exc).__name__}: {msg[0] if msg else ''}); "
            "rerun the same command to resume from its latest checkpoint"
        ) from exc


def select_checkpoint(
    checkpoints: List[Tuple[Any, Dict[str, Any]]], cfg: TrainConfig
) -> Tuple[Any, Dict[str, Any], str]:
    if not checkpoints:
        raise TrainingFailed("the run reported no checkpoint")
    last = max(checkpoints, key=lambda cm: cm[1].get("step", -1))
    if cfg.selection == "last":
        return last[0], last[1], "the last checkpoint (no selection)"
    best = max(checkpoints, key=lambda cm: (cm[1].get("holdout_miou", float("-inf")), cm[1].get("step", -1)))
    return (
        best[0],
        best[1],
        (
            "the checkpoint with the best mIoU against the pseudo-labels of the held-out "
            "slice of the pseudo-labelled training images (never the evaluation split)"
        ),
    )


def _finish(result, plan: TrainPlan, out, fit_seconds: float) -> TrainResult:
    from index.storage import join

    cfg, data, settings, run_uri = plan.cfg, plan.data, plan.settings, plan.run_uri
    n_train, n_holdout = plan.n_train, plan.n_holdout
    kept = list(result.best_checkpoints or [])
    if result.checkpoint is not None and not any(c.path == result.checkpoint.path for c, _ in kept):
        kept.append((result.checkpoint, dict(result.metrics or {})))
    chosen, chosen_metrics, rule = select_checkpoint(kept, cfg)
    last_ckpt = max(kept, key=lambda cm: cm[1].get("step", -1))[0]
    with last_ckpt.as_directory() as d:
        final_state = read_checkpoint_state(d)
    with chosen.as_directory() as d:
        try:  # never export damaged or non-finite weights
            chosen_state = verify_checkpoint(d)
        except CheckpointDamaged as exc:
            raise CheckpointDamaged(f"checkpoint {chosen.path} is damaged ({exc}): nothing was exported") from None
        seg = checkpoint_segmodel(d)
    if chosen_state["config_hash"] != settings["config_hash"]:
        raise ConfigError(f"checkpoint {chosen.path} belongs to another configuration")
    chosen_name = os.path.basename(chosen.path.rstrip("/"))
    encoder_init = (
        f"ImageNet weights from {cfg.encoder_weights} (sha256 {settings['encoder_weights_sha256']})"
        if cfg.encoder_weights
        else "random init (no encoder_weights given)"
    )
    hist = final_state.get("history", [])
    steps_done = int(final_state["step"])
    train_s = float(final_state.get("train_seconds", 0.0))
    provenance = {
        "config_hash": settings["config_hash"],
        "config": to_dict(cfg),
        "labels_uri": settings["labels_uri"],
        "pseudo_label_config_hash": settings["pseudo_label_config_hash"],
        "data_digest": data.digest,
        "encoder_init": encoder_init,
        "checkpoint": chosen_name,
        "step": int(chosen_state["step"]),
        "selection": cfg.selection,
        "selection_rule": rule,
        "run": run_uri,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
        "segmentation_models_pytorch": _version("segmentation_models_pytorch"),
        "ray": _version("ray"),
    }
    seg.training = provenance
    weights, meta = seg.to_bytes()
    model_uri = join(run_uri, MODEL_DIR)
    out.write_file(f"{MODEL_DIR}/model.safetensors", weights)
    out.write_file(f"{MODEL_DIR}/model.json", meta)
    ckpts = sorted(
        (
            {
                "name": os.path.basename(c.path.rstrip("/")),
                "uri": join(run_uri, os.path.basename(c.path.rstrip("/"))),
                **{k: v for k, v in m.items() if k != "config_hash"},
            }
            for c, m in kept
        ),
        key=lambda c: c.get("step", 0),
    )
    report = {
        "run": run_uri,
        "config_hash": settings["config_hash"],
        "labels": settings["labels_uri"],
        "classes": list(data.classes),
        "train_images": n_train,
        "holdout_images": n_holdout,
        "holdout": final_state.get("holdout"),
        "encoder": cfg.encoder,
        "encoder_init": encoder_init,
        "selection": {
            "mode": cfg.selection,
            "rule": rule,
            "checkpoint": chosen_name,
            "step": int(chosen_state["step"]),
            "holdout_miou": chosen_metrics.get("holdout_miou"),
            "evaluation_split_used": False,
        },
        "steps": steps_done,
        "iterations": cfg.iterations,
        "batch_size": cfg.batch_size,
        "attempts": final_state.get("attempts", []),
        "throughput": {
            "train_seconds": train_s,
            "steps_per_s": steps_done / train_s if train_s else None,
            "images_per_s": steps_done * cfg.batch_size / train_s if train_s else None,
            "note": "train_seconds sums the loop time of every attempt (start-up excluded)",
        },
        "fit_seconds_this_call": fit_seconds,
        "checkpoints": ckpts,
        "checkpoint_history": final_state.get("checkpoints", []),
        "history": hist,
        "model": {"weights": join(model_uri, "model.safetensors"), "meta": join(model_uri, "model.json")},
        "plot": join(run_uri, PLOT_FILE),
    }
    out.write_file(PLOT_FILE, render_curve(hist, f"ReCo+ {cfg.encoder} - {os.path.basename(run_uri)}"))
    out.write_file(REPORT_FILE, json.dumps(report, indent=2, default=str).encode())
    logger.info(
        "trained %d/%d steps (%s); exported %s (%s) to %s",
        steps_done,
        cfg.iterations,
        encoder_init,
        chosen_name,
        cfg.selection,
        model_uri,
    )
    return TrainResult(run_uri, model_uri, report)


def _version(pkg: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # pragma: no cover
        return None
