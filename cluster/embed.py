"""Ray Data CLIP image embedding into an :class:`index.store.EmbeddingStore`.

Pipeline: ``from_items(pending items)`` -> ``map_batches(decode_batch)`` (CPU tasks: fetch bytes,
decode, centre-crop to CLIP's input size, count failures) -> ``map_batches(ClipEmbedUDF)``
(an actor pool: the model is loaded once per actor; CUDA + bf16 autocast where the actor has a
GPU). The driver holds the store's writer lock for the whole run, streams results, groups them
by planned shard and commits every complete group as one shard, so an interrupted job loses at
most the shards in flight and a rerun redoes only those (exactly-once ids).

Every input ends in one of three states (the rule is :func:`index.sources.classify_failure`):
embedded, skipped for good (bad input, recorded in ``skipped/`` with its reason), or *failed
transiently* (I/O error, timeout, file missing on the node, after the fetch retries): those are
neither embedded nor skipped, their group's other rows are still committed, and the next run
picks them up again (they are not in ``committed_ids()``) into a new shard.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from reco.errors import ConfigError, ImageDecodeError
from reco.image import decode_image, resize_center_crop

from .config import ActorConfig
from .models import EncoderSpec

logger = logging.getLogger(__name__)

# Fault-injection knob for tests and benchmarks: seconds to sleep per embedded batch.
DELAY_ENV = "RECO_EMBED_DELAY_S"


def decode_batch(batch: Mapping[str, np.ndarray], image_size: int,
                 storage_options: Optional[Mapping[str, Any]] = None,
                 bytes_only: bool = False, retry: Any = None) -> Dict[str, np.ndarray]:
    """Fetch + decode + centre-crop a batch. Bad inputs get status 'skipped' and a reason;
    transient failures (after ``retry``, an :class:`index.sources.RetryPolicy`) get status
    'transient' and a reason.

    ``bytes_only``: only fetch the encoded bytes (column ``data``); the actor decodes them on its
    device (nvJPEG on GPUs), the plan for GPU hosts where CPU decode cannot keep up.
    """
    from index.sources import BAD, ParquetRowReader, classify_failure, fetch_bytes

    pq_reader = ParquetRowReader(storage_options)
    n = len(batch["id"])
    side = 1 if bytes_only else image_size  # bytes_only: a placeholder column of the right length
    pixels = np.zeros((n, side, side, 3), dtype=np.uint8)
    data = np.empty(n, dtype=object)
    width = np.zeros(n, np.int32)
    height = np.zeros(n, np.int32)
    status = np.empty(n, dtype=object)
    error = np.empty(n, dtype=object)
    problems = batch["problem"] if "problem" in batch else [""] * n
    t0 = time.perf_counter()
    for i, uri in enumerate(batch["uri"]):
        uri = str(uri)
        if problems[i]:  # bad input already at listing time (e.g. a name that is not UTF-8)
            status[i], error[i] = "skipped", f"bad input: {problems[i]}"
            continue
        try:
            raw = fetch_bytes(uri, storage_options, pq_reader, retry=retry)
            if bytes_only:
                if not raw:
                    raise ImageDecodeError(f"{uri}: empty file")
                data[i], status[i], error[i] = raw, "ok", ""
                continue
            img = decode_image(raw, source=uri)
            width[i], height[i] = img.size
            pixels[i] = (resize_center_crop(img, image_size) * 255.0).round().byte().permute(1, 2, 0).numpy()
            status[i], error[i] = "ok", ""
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none crashes the job
            kind, reason = classify_failure(exc)
            status[i], error[i] = ("skipped" if kind == BAD else "transient"), reason
    out = {k: np.asarray(batch[k]) for k in ("id", "uri", "group")}
    out.update(pixels=pixels, width=width, height=height, status=status, error=error, data=data,
               decode_s=np.full(n, (time.perf_counter() - t0) / max(n, 1)))
    return out


class ClipEmbedUDF:
    """Actor: (B, S, S, 3) uint8 crops -> (B, E) L2-normalised CLIP image embeddings."""

    def __init__(self, encoders: EncoderSpec, threads: Optional[int] = None, device_decode: bool = False):
        self.device_decode = device_decode
        if not encoders.has_clip:
            raise ValueError("CLIP embedding needs encoders.clip_model")
        if threads:
            torch.set_num_threads(threads)
        from reco.encoders import create_clip

        self.device = encoders.resolve_device()
        self.clip = create_clip(encoders.clip_model, encoders.clip_weights, device=self.device)
        self.clip.set_precision(encoders.clip_precision)
        self.delay = float(os.environ.get(DELAY_ENV, "0") or 0)

    def _decode_on_device(self, batch: Dict[str, np.ndarray]) -> np.ndarray:
        """Decode the ``data`` column on this actor's device (torchvision/nvJPEG), falling back to
        PIL for non-JPEG inputs; returns (B, S, S, 3) uint8 and updates status/size columns."""
        from torchvision.io import decode_jpeg

        size = self.clip.image_size
        status, error = batch["status"], batch["error"]
        n = len(status)
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        for i in range(n):
            if status[i] != "ok":
                continue
            raw = batch["data"][i]
            try:
                try:
                    t = decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8), device=self.device)
                    if t.shape[0] == 1:
                        t = t.expand(3, -1, -1)
                    if t.shape[0] != 3:
                        raise RuntimeError("not 3-channel")
                except RuntimeError:  # PNG, CMYK, progressive oddities: the CPU decoder handles them
                    img = decode_image(raw, source=str(batch["uri"][i]))
                    t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(self.device)
                batch["height"][i], batch["width"][i] = int(t.shape[1]), int(t.shape[2])
                pixels[i] = _crop_tensor(t, size).permute(1, 2, 0).cpu().numpy()
            except (ImageDecodeError, OSError, ValueError) as exc:
                status[i], error[i] = "skipped", f"decode: {exc}"
        return pixels

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.device_decode:
            # decoding here updates status/size columns: work on writable copies of those only
            batch = {k: np.array(v, copy=True) if k in ("status", "error", "width", "height") else v
                     for k, v in batch.items()}
            batch["pixels"] = self._decode_on_device(batch)
        ok = np.asarray(batch["status"]) == "ok"
        n = len(ok)
        emb = np.zeros((n, self.clip.embed_dim), dtype=np.float32)
        t0 = time.perf_counter()
        if ok.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.device, non_blocking=True)
            x = self.clip.normalize(x.permute(0, 3, 1, 2).float().div_(255.0))
            with torch.inference_mode():
                emb[ok] = self.clip.encode_image(x).float().cpu().numpy()
        if self.delay:
            time.sleep(self.delay)
        out = {k: np.asarray(batch[k]) for k in ("id", "uri", "group", "width", "height", "status", "error", "decode_s")}
        out["embedding"] = emb
        out["model_s"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        return out


def _crop_tensor(t: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> (3, size, size) uint8: shorter side to ``size``
    (bicubic, antialiased), centre crop; the tensor twin of :func:`reco.image.resize_center_crop`."""
    import torch.nn.functional as F

    h, w = t.shape[1:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(t[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)


@dataclass
class EmbedReport:
    """What a run did. ``skipped``: bad inputs (committed as skipped, never retried);
    ``failed_transient``: inputs that could not be read this time (NOT committed: rerun to retry)."""

    listed: int = 0
    already_done: int = 0
    embedded: int = 0
    skipped: Dict[str, str] = field(default_factory=dict)
    failed_transient: Dict[str, str] = field(default_factory=dict)
    shards_committed: List[int] = field(default_factory=list)
    seconds: float = 0.0
    decode_seconds_per_image: float = 0.0
    model_seconds_per_image: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.embedded + len(self.skipped)) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["skipped_count"] = len(self.skipped)
        d["failed_transient_count"] = len(self.failed_transient)
        d["images_per_second"] = self.images_per_second
        return d


def model_identity(encoders: EncoderSpec) -> Dict[str, Any]:
    return {"clip_model": encoders.clip_model, "clip_weights": encoders.clip_weights}


def run_embed(
    items: Sequence[Any],
    store,
    encoders: EncoderSpec,
    actors: ActorConfig = ActorConfig(),
    shard_size: int = 10_000,
    storage_options: Optional[Mapping[str, Any]] = None,
    decode_cpus: float = 0.5,
    image_size: Optional[int] = None,
    device_decode: bool = False,
    retry: Any = None,
) -> EmbedReport:
    """Embed every item not yet in ``store`` (Ray must be initialised), holding the store's
    writer lock for the whole run. ``retry``: an :class:`index.sources.RetryPolicy` for fetches
    (default: :meth:`~index.sources.RetryPolicy.from_env`)."""
    import ray.data
    from tqdm import tqdm

    from index.sources import RetryPolicy, is_representable

    if shard_size < 1:
        raise ConfigError(f"shard size must be >= 1, got {shard_size}")
    t_start = time.perf_counter()
    report = EmbedReport(listed=len(items))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ConfigError("item ids must be unique")
    bad = [it.id for it in items if not (is_representable(it.id) and is_representable(it.uri))]
    if bad:
        raise ConfigError(f"{len(bad)} item ids/uris are not valid UTF-8 (e.g. {bad[0]!r}): list inputs "
                          f"with index.sources, which escapes such names")
    retry = retry if retry is not None else RetryPolicy.from_env()
    model = model_identity(encoders)
    with store.writer(job="embed"):
        store.check_compatible(model)
        done = store.committed_ids() if store.exists else set()
        pending = [it for it in items if it.id not in done]
        report.already_done = len(items) - len(pending)
        if not pending:
            logger.info("nothing to embed: all %d items are already in %s", len(items), store.root)
            report.seconds = time.perf_counter() - t_start
            return report
        clip_size, dim = clip_dims(encoders)
        store.create_or_check(model, dim)
        # rows are planned in groups of shard_size; each group is committed as one shard whose
        # index is taken at commit time (contiguous even when a group is entirely transient)
        rows = [{"id": it.id, "uri": it.uri, "group": i // shard_size, "problem": getattr(it, "problem", "")}
                for i, it in enumerate(pending)]
        expected: Dict[int, int] = {}
        for r in rows:
            expected[r["group"]] = expected.get(r["group"], 0) + 1
        size = image_size or clip_size

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // max(actors.batch_size, 1), 512)))
        ds = ds.map_batches(decode_batch, fn_kwargs=dict(image_size=size, storage_options=dict(storage_options or {}),
                                                         bytes_only=device_decode, retry=retry),
                            batch_size=actors.batch_size, batch_format="numpy", num_cpus=decode_cpus)
        ds = ds.map_batches(
            ClipEmbedUDF, fn_constructor_kwargs=dict(encoders=encoders, threads=actors.torch_threads,
                                                     device_decode=device_decode),
            batch_size=actors.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors.num_actors),
            num_cpus=actors.cpus_per_actor, num_gpus=actors.gpus_per_actor or None,
        )
        buffers: Dict[int, Dict[str, list]] = {}
        decode_s = model_s = 0.0
        bar = tqdm(total=len(rows), desc="embed", unit="img")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["id"])):
                g = int(batch["group"][i])
                b = buffers.setdefault(g, {"ok": [], "skipped": [], "transient": []})
                st = batch["status"][i]
                if st == "ok":
                    b["ok"].append((str(batch["id"][i]), str(batch["uri"][i]), batch["embedding"][i],
                                    int(batch["width"][i]), int(batch["height"][i])))
                elif st == "skipped":
                    b["skipped"].append((str(batch["id"][i]), str(batch["uri"][i]), str(batch["error"][i])))
                else:  # transient: reported, never committed
                    b["transient"].append((str(batch["id"][i]), str(batch["error"][i])))
                decode_s += float(batch["decode_s"][i])
                model_s += float(batch["model_s"][i])
                if sum(len(v) for v in b.values()) == expected[g]:
                    _commit(store, b, report)
                    del buffers[g]
            bar.update(len(batch["id"]))
        bar.close()
        if buffers:  # pragma: no cover - would mean rows were lost by the pipeline
            raise RuntimeError(f"incomplete shards after the pipeline finished: {sorted(buffers)}")
    n = report.embedded + len(report.skipped)
    report.decode_seconds_per_image = decode_s / max(n, 1)
    report.model_seconds_per_image = model_s / max(n, 1)
    report.seconds = time.perf_counter() - t_start
    if report.failed_transient:
        logger.warning("%d input(s) could not be read this time (transient: I/O errors, timeouts, files "
                       "missing on a node) and were NOT committed; rerun to retry them. First: %s",
                       len(report.failed_transient), "; ".join(
                           f"{k}: {v}" for k, v in list(report.failed_transient.items())[:3]))
    return report


def _commit(store, buf: Dict[str, list], report: EmbedReport) -> None:
    """Commit one complete group as the store's next shard (its embedded and skipped rows);
    its transient rows are only reported."""
    report.failed_transient.update(dict(buf["transient"]))
    if not buf["ok"] and not buf["skipped"]:
        logger.debug("group of %d rows failed transiently: nothing to commit", len(buf["transient"]))
        return
    ok = sorted(buf["ok"], key=lambda r: r[0])
    emb = np.stack([r[2] for r in ok]) if ok else np.zeros((0, store.dim), np.float32)
    shard = store.next_shard_index()
    store.commit_shard(
        shard, [r[0] for r in ok], [r[1] for r in ok], emb,
        [r[3] for r in ok], [r[4] for r in ok], buf["skipped"],
    )
    report.embedded += len(ok)
    report.skipped.update({s[0]: s[2] for s in buf["skipped"]})
    report.shards_committed.append(shard)
    logger.debug("committed shard %d (%d embedded, %d skipped, %d transient left for a rerun)",
                 shard, len(ok), len(buf["skipped"]), len(buf["transient"]))


def clip_dims(encoders: EncoderSpec) -> Tuple[int, int]:
    """(input size, embedding dim) from the open_clip config, without building the model."""
    import json
    from pathlib import Path

    name = encoders.clip_model or ""
    if not name:
        raise ConfigError("CLIP embedding needs a CLIP model (--clip-model)")
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser() / "open_clip_config.json"
        if not path.is_file():
            raise ConfigError(f"--clip-model {name}: {path} does not exist")
        try:
            cfg = json.loads(path.read_text())["model_cfg"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not an open_clip config ({type(exc).__name__}: {exc})") from exc
    else:
        import open_clip

        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise ConfigError(f"unknown open_clip model {name!r}")
    try:
        size = cfg["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size), int(cfg["embed_dim"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"CLIP model {name!r}: bad config ({type(exc).__name__}: {exc})") from exc
