"""Large-scale pseudo-labelling: Ray Data segmentation with an exactly-once, resumable manifest.

Output layout under ``OUT`` (a storage URI, :mod:`index.storage`)::

    OUT/pseudo_label.json                 bank digest, class list, segmenter config, config hash
    OUT/manifest/part-00003-9f1c2a7b.parquet   committed rows (one per image), written atomically
    OUT/labels/<id>.png                   class ids into ``classes`` (palette PNG; 16-bit > 256)
    OUT/confidence/<id>.png               max score x 255 (with ``confidence_maps``)
    OUT/overlays/<id>.png                 colour overlays of the first N images, OUT/index.html
    OUT/report.json                       this run's counts, timings and failures
    OUT/job_report.json, OUT/job_report.txt   the uniform job report (index.report)

**Commit rule.** Workers write an image's files, then the driver commits its manifest row in a
part file (one atomic write per ``commit_every`` rows). A row is committed when the image is
done (``ok``) or is bad input (``skipped``, with its reason, for good); an image that failed
transiently (I/O error, S3 timeout) is *not* committed, so the next run retries it. A rerun reads
the committed ids from the manifest and processes only the rest: every id appears exactly once
(files of an uncommitted image are simply rewritten). All of it is
:class:`index.output.ResumableOutput`: one job writes an output at a time (``OUT/writer.lock``,
local or S3), ``--overwrite`` forgets the manifest under that lock, and the job report says
``failed`` when more than ``jobs.max_failed_fraction`` of the images were bad input.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from index.output import JobReport, Parts, ResumableOutput
from index.report import JobResult
from index.storage import join, sha256_bytes
from reco.bank import ConceptBank
from reco.config import SegmenterConfig, to_dict
from reco.errors import ConfigError

from .config import ActorConfig, JobsConfig
from .models import EncoderSpec
from .report import count_actor_restarts

logger = logging.getLogger(__name__)

MANIFEST_DIR = "manifest"
SETTINGS_FILE = "pseudo_label.json"
COLUMNS = (
    "id",
    "uri",
    "status",
    "error",
    "label",
    "confidence",
    "overlay",
    "width",
    "height",
    "classes",
    "shares",
    "mean_confidence",
    "seconds",
    "mode",
)


class PseudoLabelReport(JobResult):
    """pseudo-label's names for the counts of its uniform report (``.report``, a
    :class:`index.report.JobReport` in images)."""

    ALIASES = {
        "listed": "n_seen",
        "already_done": "n_already_done",
        "labelled": "n_processed",
        "skipped": "skipped_items",
        "failed_transient": "failed_items",
    }
    FIELDS = {"parts_committed": 0, "model_seconds_per_image": 0.0, "actor_peak_rss_mb": 0.0}

    @property
    def images_per_second(self) -> float:
        return (self.labelled + len(self.skipped)) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return dict(
            super().as_dict(),
            skipped_count=len(self.skipped),
            failed_count=len(self.failed_transient),
            images_per_second=self.images_per_second,
        )


def settings(
    bank_bytes: bytes, bank: ConceptBank, class_names: Sequence[str], config: SegmenterConfig, encoders: EncoderSpec
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(what the outputs depend on: hashed, must match on every rerun into the same output;
    what is only recorded beside it) of ``OUT/pseudo_label.json``."""
    core = {
        "bank_sha256": sha256_bytes(bank_bytes),
        "classes": list(class_names),
        "segmenter": to_dict(config),
        "dense_encoder": encoders.dense_encoder,
        "clip": encoders.clip_model,
        "clip_dense_head": encoders.clip_dense_head if encoders.clip_model else None,
    }
    return core, {"bank_concepts": list(bank.names)}


def _manifest(out_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Parts:
    return Parts(join(out_uri, MANIFEST_DIR), ".parquet", storage_options)


def _rows_of(parts: Parts) -> List[Dict[str, Any]]:
    """The manifest rows of the parts not read yet from ``parts``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: List[Dict[str, Any]] = []
    for _, data in parts.read_new():
        # parse an Arrow-owned copy: Arrow buffers over Python bytes can be released on an Arrow
        # thread while the interpreter shuts down, which aborts the process ("terminate called
        # without an active exception", exit 134) when a job stops right after reading
        sink = pa.BufferOutputStream()
        sink.write(data)
        rows += pq.read_table(pa.BufferReader(sink.getvalue())).to_pylist()
    return rows


def committed_rows(out_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every committed manifest row under ``out_uri``."""
    return _rows_of(_manifest(out_uri, storage_options))


def _commit(out: ResumableOutput, rows: List[Dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.commit(buf.getvalue())


def run_pseudo_label(
    items: Sequence[Any],
    bank_uri: str,
    encoders: EncoderSpec,
    config: SegmenterConfig,
    out_uri: str,
    actors: ActorConfig = ActorConfig(),
    storage_options: Optional[Mapping[str, Any]] = None,
    vocab: Optional[Sequence[str]] = None,
    overlays: int = 0,
    confidence_maps: bool = False,
    commit_every: int = 256,
    overwrite: bool = False,
    max_failed_fraction: Optional[float] = JobsConfig.max_failed_fraction,
    job_config: Optional[Mapping[str, Any]] = None,
) -> PseudoLabelReport:
    """Pseudo-label ``items`` (objects with ``id``, ``uri`` and optionally ``problem``) with the
    bank at ``bank_uri`` (optionally restricted to ``vocab``) into ``out_uri``. Ray must be
    initialised. Resumable and exactly once (see the module docstring); the uniform report
    (``job_report.json``, config ``job_config``) says ``failed`` when more than
    ``max_failed_fraction`` of the images were bad input."""
    from tqdm import tqdm

    from index.storage import read_bytes
    from reco.segmenter import BACKGROUND

    from .segment import segmentation_dataset

    if commit_every < 1:
        raise ConfigError("commit_every must be >= 1")
    ids = [str(it.id) for it in items]
    if len(set(ids)) != len(ids):
        raise ConfigError("item ids must be unique (they name the output files)")
    bank_bytes = read_bytes(join(bank_uri, "bank.safetensors"), storage_options)
    bank = ConceptBank.from_bytes(bank_bytes, bank_uri)
    if vocab:
        bank = bank.subset(list(vocab))  # UnknownConceptError names the bank's concepts
        bank_bytes = bank.to_bytes()
    class_names = ((BACKGROUND,) if config.background_threshold is not None else ()) + tuple(bank.names)
    covered, extra = settings(bank_bytes, bank, class_names, config, encoders)
    report = PseudoLabelReport(JobReport("pseudo-label", config=job_config, max_failed_fraction=max_failed_fraction))
    report.listed = len(items)
    out = ResumableOutput(out_uri, "pseudo-label", SETTINGS_FILE, MANIFEST_DIR, ".parquet", storage_options)
    with out.open(covered, overwrite, extra, describe=f"{len(class_names)} classes now"):
        done = {r["id"]: r["status"] for r in _rows_of(out.parts)}
        mine = [i for i in ids if i in done]
        report.report.already_done(len(mine), failed=sum(1 for i in mine if done[i] == "skipped"))
        pending = [it for it in items if str(it.id) not in done]
        bad_now = [it for it in pending if getattr(it, "problem", "")]
        todo = [it for it in pending if not getattr(it, "problem", "")]
        buffer: List[Dict[str, Any]] = []
        for it in bad_now:  # bad already at listing time (e.g. a name that is not UTF-8)
            buffer.append(skipped_row(it))
            report.report.skip(str(it.id), it.problem)
        model_s = 0.0
        if todo:
            order = sorted(todo, key=lambda it: str(it.id))
            first = {str(it.id) for it in order[:overlays]}
            rows = [{"id": str(it.id), "uri": str(it.uri), "overlay": str(it.id) in first} for it in order]
            ds = segmentation_dataset(
                rows,
                bank_bytes,
                encoders,
                config,
                list(range(len(class_names))),
                len(class_names),
                None,
                out.uri,
                actors,
                storage_options,
                write_overlays=False,
                confidence_maps=confidence_maps,
            )
            bar = tqdm(total=len(rows), desc="pseudo-label", unit="img")
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                report.actor_peak_rss_mb = max(report.actor_peak_rss_mb, float(np.max(batch["peak_rss_mb"])))
                for i in range(len(batch["id"])):
                    row = {c: _py(batch[c][i]) for c in COLUMNS}
                    if row["status"] == "failed":
                        report.report.fail_transient(row["id"], row["error"])
                        continue
                    if row["status"] == "ok":
                        report.labelled += 1
                        model_s += row["seconds"]
                    else:
                        report.report.skip(row["id"], row["error"])
                    buffer.append(row)
                    if len(buffer) >= commit_every:
                        _commit(out, buffer)
                        buffer = []
                        report.parts_committed += 1
                bar.update(len(batch["id"]))
            bar.close()
        if buffer:
            _commit(out, buffer)
            report.parts_committed += 1
        report.model_seconds_per_image = model_s / max(report.labelled, 1)
        _finish_report(report)
        out.write_file("report.json", json.dumps(report.as_dict(), indent=2).encode())
        if overlays:
            out.write_file("index.html", _html(out.uri, class_names, storage_options).encode())
        out.write_report(report.report)
    if report.failed_transient:
        logger.warning(
            "%d images failed transiently and were not committed: rerun the same command to retry them",
            len(report.failed_transient),
        )
    return report


def _finish_report(report: PseudoLabelReport) -> None:
    """The stages, actor memory, restarts and part count of a run, in its uniform report."""
    r = report.report.finish()
    n = report.labelled + len(report.skipped)
    r.add_stage("job", r.wall_seconds, n)
    r.add_stage("segmentation (per-image sum)", report.model_seconds_per_image * n, n)
    if report.actor_peak_rss_mb:
        r.actor_memory("segment actors (max)", {"rss": int(report.actor_peak_rss_mb * 2**20)})
    count_actor_restarts(r)
    r.extra["parts_committed"] = report.parts_committed


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def skipped_row(it) -> Dict[str, Any]:
    """The manifest row of an item skipped before labelling (``it``: id, uri, problem)."""
    return {
        "id": str(it.id),
        "uri": str(it.uri),
        "status": "skipped",
        "error": str(it.problem),
        "label": "",
        "confidence": "",
        "overlay": "",
        "width": 0,
        "height": 0,
        "classes": "[]",
        "shares": "[]",
        "mean_confidence": float("nan"),
        "seconds": 0.0,
        "mode": "",
    }


def _html(out_uri: str, class_names: Sequence[str], storage_options) -> str:
    import html

    from reco.visualize import legend_html

    rows = [r for r in committed_rows(out_uri, storage_options) if r["status"] == "ok" and r["overlay"]]
    rows.sort(key=lambda r: r["id"])
    figs = "".join(
        f"<figure><img src='{html.escape(r['overlay'])}' loading='lazy'><figcaption>{html.escape(r['id'])} "
        f"&mdash; image | pseudo-label; classes: "
        f"{html.escape(', '.join(class_names[c] for c in json.loads(r['classes'])))}</figcaption></figure>"
        for r in rows
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>reco pseudo-labels</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}img{{max-width:100%}}</style></head><body>"
        f"<h1>Pseudo-labels</h1><h2>Legend</h2>{legend_html(class_names)}{figs}</body></html>"
    )
