"""``reco train LABELS --name NAME --storage RUNS``: train ReCo+ (DeepLabV3+) on ReCo pseudo-labels.

LABELS is the output URI of ``reco pseudo-label`` (its manifest rows with status ok, label PNGs,
optional confidence PNGs; the class list of its pseudo_label.json, i.e. the bank's). Training
runs on Ray Train (TorchTrainer, DDP, ``--num-workers`` workers, bf16 autocast on GPU) with the
paper's recipe by default (Adam 5e-4 head / 5e-5 encoder, wd 2e-4, poly 0.9, 20k iterations,
batch 8, 320 crops, scale 0.5-2, flip, colour jitter, blur). Checkpoints, the exported model
(RUNS/NAME/model: model.safetensors + model.json), the report (train_report.json) and the loss
curve (train_curve.png) go to RUNS/NAME (a local folder or s3://...). Rerunning the same command
resumes from the latest intact checkpoint; a different configuration under the same name is refused
(``--overwrite`` starts it afresh). One job writes a run at a time (RUNS/NAME/writer.lock, local or S3).

``--config`` takes YAML with a ``train:`` section (every key of cluster.train.TrainConfig,
strictly checked); the flags below override it.
"""

from __future__ import annotations

import logging
from typing import List, Optional

from cluster.config import load_yaml_mapping, resolve_cluster_config
from jobs.common import JobParser, add_cluster_args, parse_json_object
from reco.errors import ConfigError

logger = logging.getLogger(__name__)


def train_config(args):
    from cluster.train import load_train_config

    data = load_yaml_mapping(args.config, "config file") if args.config else {}
    unknown = set(data) - {"train"}
    if unknown:
        raise ConfigError(f"{args.config}: unknown top-level key(s) {sorted(unknown)}; expected train")
    return load_train_config(
        data.get("train") or {},
        encoder=args.encoder,
        encoder_weights=args.encoder_weights,
        iterations=args.iterations,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        use_gpu=True if args.use_gpu else None,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        checkpoint_every=args.checkpoint_every,
        selection=args.selection,
        confidence_threshold=args.confidence_threshold,
        loader_workers=args.loader_workers,
    )


def main(argv: Optional[List[str]] = None) -> int:
    p = JobParser(prog="reco train", description=__doc__)
    p.add_argument("labels", help="output URI of `reco pseudo-label` (local folder or s3://...)")
    p.add_argument("--name", required=True, help="run name: RUNS/NAME holds checkpoints, model, report")
    p.add_argument("--storage", required=True, help="runs URI (local folder or s3://bucket/prefix)")
    p.add_argument("--config", help="YAML with a `train:` section (strict keys)")
    p.add_argument("--encoder", help="smp encoder (default resnet101; tu-<timm name> also works)")
    p.add_argument(
        "--encoder-weights", help="ImageNet weights of the encoder (URI of .safetensors/.pth); default: random init"
    )
    p.add_argument("--iterations", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (split over the workers)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--loader-workers", type=int, help="DataLoader processes per train worker")
    p.add_argument("--max-failures", type=int, help="worker failures to recover from (-1: unlimited)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument(
        "--selection",
        choices=("last", "holdout"),
        help="export the last checkpoint, or the best on a held-out slice of the pseudo-labelled images",
    )
    p.add_argument("--confidence-threshold", type=float, help="ignore pixels whose pseudo-label confidence is below it")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start NAME afresh when it holds a run of another configuration (its checkpoints go)",
    )
    add_cluster_args(p)
    args = p.parse_args(argv)

    from cluster.runtime import init_ray
    from cluster.train import execute_training, plan_training

    storage = parse_json_object(args.storage_options, "--storage-options")
    cluster = resolve_cluster_config(args.ray_config)
    cfg = train_config(args)
    from index.storage import absolute

    # clear errors before Ray starts; Ray Train workers run in directories of their own: absolute paths
    plan = plan_training(absolute(args.labels), absolute(args.storage), args.name, cfg, storage, args.overwrite)
    res = execute_training(plan, start_ray=lambda: init_ray(cluster.ray))  # Ray starts once the run is locked
    rep = res.report
    logger.info(
        "%d/%d steps, %s img/s; encoder: %s; exported %s (%s) -> %s; report %s",
        rep["steps"],
        rep["iterations"],
        f"{rep['throughput']['images_per_s'] or 0:.2f}",
        rep["encoder_init"],
        rep["selection"]["checkpoint"],
        rep["selection"]["mode"],
        res.model_uri,
        rep["plot"],
    )
    from cluster.report import job_report, write_job_report

    attempts = rep.get("attempts") or []
    write_job_report(
        job_report(  # steps over every attempt of this run name (resumed runs included)
            "train",
            unit="steps",
            config=vars(args),
            seen=int(rep["iterations"]),
            processed=int(rep["steps"]),
            seconds=float(rep.get("fit_seconds_this_call") or 0.0),
            stages={
                "training loop (all attempts)": (float(rep["throughput"]["train_seconds"] or 0.0), int(rep["steps"])),
                "fit (this call)": (float(rep.get("fit_seconds_this_call") or 0.0), None),
            },
            retries={"restart from checkpoint (worker failure or rerun)": max(0, len(attempts) - 1)},
            extra={
                "train_images": rep["train_images"],
                "holdout_images": rep["holdout_images"],
                "checkpoint": rep["selection"]["checkpoint"],
                "selection": rep["selection"]["mode"],
                "model": res.model_uri,
            },
        ),
        res.run_uri,
        storage,
    )
    return 0
