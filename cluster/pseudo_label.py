"""Large-scale pseudo-labelling: Ray Data segmentation with an exactly-once, resumable manifest.

Output layout under ``OUT`` (a storage URI, :mod:`index.storage`)::

    OUT/pseudo_label.json                 bank digest, class list, segmenter config, config hash
    OUT/manifest/part-00003-9f1c2a7b.parquet   committed rows (one per image), written atomically
    OUT/labels/<id>.png                   class ids into ``classes`` (palette PNG; 16-bit > 256)
    OUT/confidence/<id>.png               max score x 255 (with ``confidence_maps``)
    OUT/overlays/<id>.png                 colour overlays of the first N images, OUT/index.html
    OUT/report.json                       this run's counts, timings and failures

**Commit rule.** Workers write an image's files, then the driver commits its manifest row in a
part file (one atomic write per ``commit_every`` rows). A row is committed when the image is
done (``ok``) or is bad input (``skipped``, with its reason, for good); an image that failed
transiently (I/O error, S3 timeout) is *not* committed, so the next run retries it. A rerun reads
the committed ids from the manifest and processes only the rest: every id appears exactly once
(files of an uncommitted image are simply rewritten). One job writes an output at a time: local
outputs take ``OUT/writer.lock`` (see :class:`index.store.StoreLock`); object-store outputs
cannot be locked this way, which the log says.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from reco.bank import ConceptBank
from reco.config import SegmenterConfig, to_dict
from reco.errors import ConfigError

from .config import ActorConfig
from .models import EncoderSpec

logger = logging.getLogger(__name__)

MANIFEST_DIR = "manifest"
SETTINGS_FILE = "pseudo_label.json"
COLUMNS = ("id", "uri", "status", "error", "label", "confidence", "overlay", "width", "height", "classes",
           "shares", "mean_confidence", "seconds", "mode")


@dataclass
class PseudoLabelReport:
    listed: int = 0
    already_done: int = 0
    labelled: int = 0
    skipped: Dict[str, str] = field(default_factory=dict)
    failed_transient: Dict[str, str] = field(default_factory=dict)
    parts_committed: int = 0
    seconds: float = 0.0
    model_seconds_per_image: float = 0.0
    actor_peak_rss_mb: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.labelled + len(self.skipped)) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(skipped_count=len(self.skipped), failed_count=len(self.failed_transient),
                 images_per_second=self.images_per_second)
        return d


def settings(bank_bytes: bytes, bank: ConceptBank, class_names: Sequence[str], config: SegmenterConfig,
             encoders: EncoderSpec) -> Dict[str, Any]:
    """What the outputs depend on; its hash must match on every rerun into the same output."""
    core = {"bank_sha256": hashlib.sha256(bank_bytes).hexdigest(), "classes": list(class_names),
            "segmenter": to_dict(config), "dense_encoder": encoders.dense_encoder, "clip": encoders.clip_model,
            "clip_dense_head": encoders.clip_dense_head if encoders.clip_model else None}
    digest = hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]
    return {**core, "config_hash": digest, "bank_concepts": list(bank.names)}


def committed_rows(out_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """Every committed manifest row under ``out_uri``."""
    import pyarrow.parquet as pq

    from index.storage import join, list_files, read_bytes

    rows: List[Dict[str, Any]] = []
    for part in list_files(join(out_uri, MANIFEST_DIR), storage_options, suffix=".parquet"):
        rows += pq.read_table(io.BytesIO(read_bytes(part, storage_options))).to_pylist()
    return rows


def _commit(out_uri: str, rows: List[Dict[str, Any]], storage_options, seq: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from index.storage import join, write_bytes

    table = pa.table({c: [r[c] for r in rows] for c in COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    name = f"part-{seq:05d}-{secrets.token_hex(4)}.parquet"
    write_bytes(join(out_uri, MANIFEST_DIR, name), buf.getvalue(), storage_options)


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
) -> PseudoLabelReport:
    """Pseudo-label ``items`` (objects with ``id``, ``uri`` and optionally ``problem``) with the
    bank at ``bank_uri`` (optionally restricted to ``vocab``) into ``out_uri``. Ray must be
    initialised. Resumable and exactly once (see the module docstring)."""
    from tqdm import tqdm

    from index.storage import exists, join, read_bytes, write_bytes
    from reco.segmenter import BACKGROUND

    from .segment import segmentation_dataset

    if commit_every < 1:
        raise ConfigError("commit_every must be >= 1")
    t_start = time.perf_counter()
    ids = [str(it.id) for it in items]
    if len(set(ids)) != len(ids):
        raise ConfigError("item ids must be unique (they name the output files)")
    bank_bytes = read_bytes(join(bank_uri, "bank.safetensors"), storage_options)
    bank = ConceptBank.from_bytes(bank_bytes, bank_uri)
    if vocab:
        bank = bank.subset(list(vocab))  # UnknownConceptError names the bank's concepts
        bank_bytes = bank.to_bytes()
    class_names = ((BACKGROUND,) if config.background_threshold is not None else ()) + tuple(bank.names)
    want = settings(bank_bytes, bank, class_names, config, encoders)
    report = PseudoLabelReport(listed=len(items))
    settings_uri = join(out_uri, SETTINGS_FILE)

    from index.lock import writer_lock

    with writer_lock(out_uri, "pseudo-label", storage_options):
        if exists(settings_uri, storage_options):
            have = json.loads(read_bytes(settings_uri, storage_options))
            if have.get("config_hash") != want["config_hash"] and not overwrite:
                raise ConfigError(
                    f"{out_uri} holds pseudo-labels of another configuration (config hash {have.get('config_hash')}, "
                    f"now {want['config_hash']}; classes {len(have.get('classes', []))} vs {len(class_names)}): "
                    "use another --out, or --overwrite to start it afresh"
                )
            if have.get("config_hash") != want["config_hash"]:
                _clear_manifest(out_uri, storage_options)
        write_bytes(settings_uri, json.dumps(want, indent=2).encode(), storage_options)
        done = {r["id"] for r in committed_rows(out_uri, storage_options)}
        report.already_done = len(done & set(ids))
        pending = [it for it in items if str(it.id) not in done]
        bad_now = [it for it in pending if getattr(it, "problem", "")]
        todo = [it for it in pending if not getattr(it, "problem", "")]
        seq = _next_seq(out_uri, storage_options)
        buffer: List[Dict[str, Any]] = []
        for it in bad_now:  # bad already at listing time (e.g. a name that is not UTF-8)
            buffer.append(_bad_row(it))
            report.skipped[str(it.id)] = it.problem
        model_s = 0.0
        if todo:
            order = sorted(todo, key=lambda it: str(it.id))
            first = {str(it.id) for it in order[:overlays]}
            rows = [{"id": str(it.id), "uri": str(it.uri), "overlay": str(it.id) in first} for it in order]
            ds = segmentation_dataset(rows, bank_bytes, encoders, config, list(range(len(class_names))),
                                      len(class_names), None, out_uri, actors, storage_options,
                                      write_overlays=False, confidence_maps=confidence_maps)
            bar = tqdm(total=len(rows), desc="pseudo-label", unit="img")
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                report.actor_peak_rss_mb = max(report.actor_peak_rss_mb, float(np.max(batch["peak_rss_mb"])))
                for i in range(len(batch["id"])):
                    row = {c: _py(batch[c][i]) for c in COLUMNS}
                    if row["status"] == "failed":
                        report.failed_transient[row["id"]] = row["error"]
                        continue
                    if row["status"] == "ok":
                        report.labelled += 1
                        model_s += row["seconds"]
                    else:
                        report.skipped[row["id"]] = row["error"]
                    buffer.append(row)
                    if len(buffer) >= commit_every:
                        _commit(out_uri, buffer, storage_options, seq)
                        seq, buffer = seq + 1, []
                        report.parts_committed += 1
                bar.update(len(batch["id"]))
            bar.close()
        if buffer:
            _commit(out_uri, buffer, storage_options, seq)
            report.parts_committed += 1
        report.model_seconds_per_image = model_s / max(report.labelled, 1)
        report.seconds = time.perf_counter() - t_start
        write_bytes(join(out_uri, "report.json"), json.dumps(report.as_dict(), indent=2).encode(), storage_options)
        if overlays:
            write_bytes(join(out_uri, "index.html"), _html(out_uri, class_names, storage_options).encode(),
                        storage_options)
    if report.failed_transient:
        logger.warning("%d images failed transiently and were not committed: rerun the same command to retry them",
                       len(report.failed_transient))
    return report


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _bad_row(it) -> Dict[str, Any]:
    return {"id": str(it.id), "uri": str(it.uri), "status": "skipped", "error": str(it.problem), "label": "",
            "confidence": "", "overlay": "", "width": 0, "height": 0, "classes": "[]", "shares": "[]",
            "mean_confidence": float("nan"), "seconds": 0.0, "mode": ""}


def _next_seq(out_uri: str, storage_options) -> int:
    from index.storage import join, list_files

    parts = list_files(join(out_uri, MANIFEST_DIR), storage_options, suffix=".parquet")
    seqs = [int(p.rsplit("/", 1)[-1].split("-")[1]) for p in parts]
    return max(seqs, default=-1) + 1


def _clear_manifest(out_uri: str, storage_options) -> None:
    """Forget every committed row (``--overwrite``): the manifest parts are removed."""
    from index.storage import join, list_files, remove_files

    remove_files(list_files(join(out_uri, MANIFEST_DIR), storage_options, suffix=".parquet"), storage_options)
    logger.warning("--overwrite: forgot the committed pseudo-labels under %s", out_uri)


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
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>reco pseudo-labels</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}img{{max-width:100%}}</style></head><body>"
            f"<h1>Pseudo-labels</h1><h2>Legend</h2>{legend_html(class_names)}{figs}</body></html>")
