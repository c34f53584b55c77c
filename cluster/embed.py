"""Ray Data CLIP image embedding into an :class:`index.store.EmbeddingStore`.

Pipeline: ``from_arrow(pending items, in blocks of whole batches: cluster.datamap)`` -> ``map_batches(DecodeUDF)``
(a CPU actor pool running :func:`decode_batch`: fetch bytes, decode, centre-crop to CLIP's input
size, count failures) -> ``map_batches(ClipEmbedUDF)``
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
import time
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from index.report import JobReport, JobResult
from reco.errors import ConfigError, ImageDecodeError
from reco.image import decode_image

from . import faults
from .config import ActorConfig
from .datamap import aligned_dataset, map_actors
from .models import EncoderSpec
from .report import count_actor_restarts

logger = logging.getLogger(__name__)


def crop_uint8(img: "Image.Image", size: int) -> np.ndarray:
    """RGB PIL -> (size, size, 3) uint8: the geometry and resampling of
    :func:`reco.image.resize_center_crop` (shorter side -> ``size``, bicubic, centre crop) and the
    same values (``round(255 * x)`` of its float output), without its float32 round trip, which
    was ~1/3 of the decode stage's time per image."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.resize((nw, nh), Image.BICUBIC).crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def decode_batch(
    batch: Mapping[str, np.ndarray],
    image_size: int,
    storage_options: Optional[Mapping[str, Any]] = None,
    bytes_only: bool = False,
    retry: Any = None,
) -> Dict[str, np.ndarray]:
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
            pixels[i] = crop_uint8(img, image_size)
            status[i], error[i] = "ok", ""
        except Exception as exc:  # noqa: BLE001 - every failure is classified, none crashes the job
            kind, reason = classify_failure(exc)
            status[i], error[i] = ("skipped" if kind == BAD else "transient"), reason
    out = {k: np.asarray(batch[k]) for k in ("id", "uri", "group")}
    out.update(
        pixels=pixels,
        width=width,
        height=height,
        status=status,
        error=error,
        data=data,
        decode_s=np.full(n, (time.perf_counter() - t0) / max(n, 1)),
    )
    return out


class DecodeUDF:
    """:func:`decode_batch` in a long-lived actor (the decode stage's actor pool).

    As Ray tasks, decode ran in whichever worker was free; on a node whose idle workers exceed
    Ray's soft limit (the CPU count) a worker idle for a second is killed, and with the decode
    stage throttled to the model's pace the next task started a fresh one (6 decode processes for
    1,000 images on 2 CPUs, each importing torch, PIL and pyarrow): 19.5 ms of CPU per image for
    decode and worker start-ups (12 ms as an actor; 1.9 ms of it is decoding), taken from the
    model's cores. An actor pays its start-up once."""

    def __call__(self, batch: Mapping[str, np.ndarray], **kwargs: Any) -> Dict[str, np.ndarray]:
        return decode_batch(batch, **kwargs)


def decode_pool_size(actors: ActorConfig, decode_cpus: float, cluster_cpus: float) -> int:
    """Decode actors at most: the CPUs the embedding actors leave free, in ``decode_cpus`` each
    (at least 1). Ray Data starts one and adds more while the decode stage is the bottleneck."""
    free = cluster_cpus - actors.num_actors * actors.cpus_per_actor
    return max(1, int(free / decode_cpus + 1e-9)) if decode_cpus > 0 else 1


def reuse_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep freed memory (``mallopt``:
    no mmap, trim threshold 1 GiB); True if applied (glibc only; a no-op elsewhere).

    By default glibc maps every block above its mmap threshold (128 KiB, raised dynamically to at
    most 32 MiB) with a fresh ``mmap`` and unmaps it on free, so each activation tensor of a CPU
    forward (ViT-B/16 at batch 32: 10-39 MB each) is page-faulted and zeroed again on every call:
    measured here, 19-26% of the tower's CPU time in the kernel and a ~1.45x slower forward in a
    fresh process. A process that had already freed large blocks did not pay it: the old
    benchmark's tower alone, timed after an fp32 run in the same process, did not; the actor, a
    fresh Ray worker, did (most of the reported 16 vs 27.8 img/s)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


class ClipEmbedUDF:
    """Actor: (B, S, S, 3) uint8 crops -> (B, E) L2-normalised CLIP image embeddings.

    Per batch it reports its own time split into ``input_s`` (uint8 HWC -> normalised NCHW in the
    model's dtype), ``forward_s`` (the image tower) and ``output_s`` (embeddings back to NumPy),
    each as seconds per row, so a pipeline's time inside the actor can be compared with the tower
    alone (``bench/bench_embed.py``). ``warmup_batch`` > 0 runs one forward of that batch size at
    start-up: the first call of a shape builds the oneDNN (CPU) or cuBLAS/cuDNN (GPU) kernels,
    which otherwise lands on the first real batch. On a CPU device it applies
    :func:`reuse_freed_memory` to its process first.
    """

    def __init__(
        self, encoders: EncoderSpec, threads: Optional[int] = None, device_decode: bool = False, warmup_batch: int = 0
    ):
        self.device_decode = device_decode
        if not encoders.has_clip:
            raise ValueError("CLIP embedding needs encoders.clip_model")
        # a CPU actor allocates its activations in this process: keep the freed blocks for reuse
        self.malloc_tuned = encoders.resolve_device().type == "cpu" and reuse_freed_memory()
        if threads:
            torch.set_num_threads(threads)
        try:  # the tower is one op after another: inter-op threads only add idle pollers
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work already ran in this process
            pass
        from reco.encoders import create_clip

        self.device = encoders.resolve_device()
        self.clip = create_clip(encoders.clip_model, encoders.clip_weights, device=self.device)
        self.clip.set_precision(encoders.clip_precision)
        self.dtype = self.clip.dtype
        # normalisation fused into one multiply-add on the uint8 values:
        # ((x / 255) - mean) / std == x * (1 / (255 std)) - mean / std
        mean = self.clip.mean.to(self.device, torch.float32)
        std = self.clip.std.to(self.device, torch.float32)
        self._scale = 1.0 / (255.0 * std)
        self._shift = mean / std
        self.threads = torch.get_num_threads()
        self.warmup_s = 0.0
        if warmup_batch > 0:
            t = time.perf_counter()
            size = self.clip.image_size
            self._embed(np.zeros((warmup_batch, size, size, 3), np.uint8))
            self.warmup_s = time.perf_counter() - t

    def _to_input(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) normalised, contiguous, in the model's dtype: a
        float32 copy, one fused multiply-add (the normalisation stays in float32, as before) and
        one cast; it was a gather copy, a channels-last float32 copy and three elementwise passes."""
        with warnings.catch_warnings():  # Ray's batches are read-only views; nothing writes to them here
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(pixels)
        x = x.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        x = torch.addcmul(self._shift.neg(), x, self._scale)  # x * scale - shift
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def _embed(self, pixels: np.ndarray) -> Tuple[np.ndarray, float, float, float]:
        """-> (embeddings (B, E) float32, input_s, forward_s, output_s)."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = self._to_input(pixels)
            sync()
            t1 = time.perf_counter()
            e = self.clip.encode_image(x)
            sync()
            t2 = time.perf_counter()
            out = e.float().cpu().numpy()
        return out, t1 - t0, t2 - t1, time.perf_counter() - t2

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
            batch = {
                k: np.array(v, copy=True) if k in ("status", "error", "width", "height") else v
                for k, v in batch.items()
            }
            batch["pixels"] = self._decode_on_device(batch)
        ok = np.asarray(batch["status"]) == "ok"
        n = len(ok)
        t0, c0 = time.perf_counter(), time.process_time()
        t_in = t_fwd = t_out = 0.0
        if n and ok.all():  # the usual case: no gather copy, the pixels go to torch as they are
            emb, t_in, t_fwd, t_out = self._embed(np.asarray(batch["pixels"]))
        else:
            emb = np.zeros((n, self.clip.embed_dim), dtype=np.float32)
            if ok.any():
                emb[ok], t_in, t_fwd, t_out = self._embed(np.asarray(batch["pixels"])[ok])
        faults.fire("embed.batch", n)
        out = {
            k: np.asarray(batch[k]) for k in ("id", "uri", "group", "width", "height", "status", "error", "decode_s")
        }
        out["embedding"] = emb
        per = 1.0 / max(n, 1)
        out["model_s"] = np.full(n, (time.perf_counter() - t0) * per)
        out["cpu_s"] = np.full(n, (time.process_time() - c0) * per)  # CPU of the whole actor process
        out["input_s"] = np.full(n, t_in * per)
        out["forward_s"] = np.full(n, t_fwd * per)
        out["output_s"] = np.full(n, t_out * per)
        out["batch_rows"] = np.full(n, n, np.int32)
        out["torch_threads"] = np.full(n, self.threads, np.int16)
        out["warmup_s"] = np.full(n, self.warmup_s)
        out["done_at"] = np.full(n, time.time())  # wall clock at the end of this batch
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
    return x[:, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)


class EmbedReport(JobResult):
    """What a run did, under embed's names for the counts of its uniform report (``.report``).
    ``skipped``: bad inputs (committed as skipped, never retried); ``failed_transient``: inputs
    that could not be read this time (NOT committed: rerun to retry)."""

    ALIASES = {
        "listed": "n_seen",
        "already_done": "n_already_done",
        "embedded": "n_processed",
        "skipped": "skipped_items",
        "failed_transient": "failed_items",
    }
    FIELDS = {
        "shards_committed": list,
        "decode_seconds_per_image": 0.0,
        # time inside the actor's ``__call__`` per image, and its split (input conversion, the image
        # tower, output conversion); the rest of ``model_seconds_per_image`` is bookkeeping
        "model_seconds_per_image": 0.0,
        "input_seconds_per_image": 0.0,
        "forward_seconds_per_image": 0.0,
        "output_seconds_per_image": 0.0,
        "actor_cpu_seconds_per_image": 0.0,  # CPU seconds (all threads of the actor process) per image
        "batch_sizes": dict,  # batch size -> number of batches the actors received
        "actor_torch_threads": 0,
        "actor_warmup_seconds": 0.0,
        # images per second from the end of the first batch to the end of the last (start-up excluded)
        "steady_images_per_second": 0.0,
    }

    @property
    def images_per_second(self) -> float:
        return (self.embedded + len(self.skipped)) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return dict(
            super().as_dict(),
            skipped_count=len(self.skipped),
            failed_transient_count=len(self.failed_transient),
            images_per_second=self.images_per_second,
        )


def _finish_report(report: EmbedReport) -> None:
    """The stages and shard count of a run, in its uniform report."""
    r = report.report.finish()
    n = report.embedded + len(report.skipped)
    r.add_stage("decode (per-image sum)", report.decode_seconds_per_image * n, n)
    r.add_stage("image tower (per-image sum)", report.model_seconds_per_image * report.embedded, report.embedded)
    r.add_stage("job", r.wall_seconds, n)
    count_actor_restarts(r)
    r.extra["shards_committed"] = list(report.shards_committed)


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
    import ray
    import ray.data
    from tqdm import tqdm

    from index.sources import RetryPolicy, is_representable

    if shard_size < 1:
        raise ConfigError(f"shard size must be >= 1, got {shard_size}")
    report = EmbedReport(JobReport("embed"))
    report.listed = len(items)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise ConfigError("item ids must be unique")
    bad = [it.id for it in items if not (is_representable(it.id) and is_representable(it.uri))]
    if bad:
        raise ConfigError(
            f"{len(bad)} item ids/uris are not valid UTF-8 (e.g. {bad[0]!r}): list inputs "
            f"with index.sources, which escapes such names"
        )
    retry = retry if retry is not None else RetryPolicy.from_env()
    model = model_identity(encoders)
    with store.writer(job="embed"):
        store.check_compatible(model)
        done = store.committed_ids() if store.exists else set()
        pending = [it for it in items if it.id not in done]
        skipped_before = set(store.skipped()) if done else set()
        report.report.already_done(len(items) - len(pending), failed=sum(1 for i in ids if i in skipped_before))
        if not pending:
            logger.info("nothing to embed: all %d items are already in %s", len(items), store.root)
            _finish_report(report)
            return report
        clip_size, dim = clip_dims(encoders)
        store.create_or_check(model, dim)
        # rows are planned in groups of shard_size; each group is committed as one shard whose
        # index is taken at commit time (contiguous even when a group is entirely transient)
        rows = [
            {"id": it.id, "uri": it.uri, "group": i // shard_size, "problem": getattr(it, "problem", "")}
            for i, it in enumerate(pending)
        ]
        expected: Dict[int, int] = {}
        for r in rows:
            expected[r["group"]] = expected.get(r["group"], 0) + 1
        size = image_size or clip_size

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ds = aligned_dataset(rows, actors.batch_size)
        n_decode = decode_pool_size(actors, decode_cpus, float(ray.cluster_resources().get("CPU", 1)))
        ds = map_actors(
            ds,
            DecodeUDF,
            actors,
            fn_kwargs=dict(
                image_size=size, storage_options=dict(storage_options or {}), bytes_only=device_decode, retry=retry
            ),
            min_size=1,
            max_size=n_decode,
            num_cpus=decode_cpus,
        )
        ds = map_actors(
            ds,
            ClipEmbedUDF,
            actors,
            dict(
                encoders=encoders,
                threads=actors.torch_threads,
                device_decode=device_decode,
                warmup_batch=actors.batch_size,
            ),
        )
        buffers: Dict[int, Dict[str, list]] = {}
        decode_s = model_s = 0.0
        split = np.zeros(4)  # input, forward, output, actor CPU seconds
        batch_rows: Dict[int, int] = {}
        done_rows = []
        bar = tqdm(total=len(rows), desc="embed", unit="img")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["id"])):
                g = int(batch["group"][i])
                b = buffers.setdefault(g, {"ok": [], "skipped": [], "transient": []})
                st = batch["status"][i]
                if st == "ok":
                    b["ok"].append(
                        (
                            str(batch["id"][i]),
                            str(batch["uri"][i]),
                            batch["embedding"][i],
                            int(batch["width"][i]),
                            int(batch["height"][i]),
                        )
                    )
                elif st == "skipped":
                    b["skipped"].append((str(batch["id"][i]), str(batch["uri"][i]), str(batch["error"][i])))
                else:  # transient: reported, never committed
                    b["transient"].append((str(batch["id"][i]), str(batch["error"][i])))
                decode_s += float(batch["decode_s"][i])
                model_s += float(batch["model_s"][i])
                if sum(len(v) for v in b.values()) == expected[g]:
                    _commit(store, b, report)
                    del buffers[g]
            split += [float(batch[k].sum()) for k in ("input_s", "forward_s", "output_s", "cpu_s")]
            for k, c in zip(*np.unique(batch["batch_rows"], return_counts=True)):
                batch_rows[int(k)] = batch_rows.get(int(k), 0) + int(c)
            done_rows.append(batch["done_at"])
            if len(batch["id"]):
                report.actor_torch_threads = max(report.actor_torch_threads, int(batch["torch_threads"].max()))
                report.actor_warmup_seconds = max(report.actor_warmup_seconds, float(batch["warmup_s"].max()))
            bar.update(len(batch["id"]))
        bar.close()
        if buffers:  # pragma: no cover - would mean rows were lost by the pipeline
            raise RuntimeError(f"incomplete shards after the pipeline finished: {sorted(buffers)}")
    n = report.embedded + len(report.skipped)
    report.decode_seconds_per_image = decode_s / max(n, 1)
    report.model_seconds_per_image = model_s / max(n, 1)
    rows_total = max(sum(batch_rows.values()), 1)
    (
        report.input_seconds_per_image,
        report.forward_seconds_per_image,
        report.output_seconds_per_image,
        report.actor_cpu_seconds_per_image,
    ) = (float(v) for v in split / rows_total)
    report.batch_sizes = {k: c // k for k, c in sorted(batch_rows.items())}
    if done_rows:
        done = np.concatenate(done_rows)
        first = done.min()
        after = int((done > first).sum())
        if after and done.max() > first:
            report.steady_images_per_second = after / float(done.max() - first)
    _finish_report(report)
    if report.failed_transient:
        logger.warning(
            "%d input(s) could not be read this time (transient: I/O errors, timeouts, files "
            "missing on a node) and were NOT committed; rerun to retry them. First: %s",
            len(report.failed_transient),
            "; ".join(f"{k}: {v}" for k, v in list(report.failed_transient.items())[:3]),
        )
    return report


def _commit(store, buf: Dict[str, list], report: EmbedReport) -> None:
    """Commit one complete group as the store's next shard (its embedded and skipped rows);
    its transient rows are only reported."""
    for item, reason in buf["transient"]:
        report.report.fail_transient(item, reason)
    if not buf["ok"] and not buf["skipped"]:
        logger.debug("group of %d rows failed transiently: nothing to commit", len(buf["transient"]))
        return
    ok = sorted(buf["ok"], key=lambda r: r[0])
    emb = np.stack([r[2] for r in ok]) if ok else np.zeros((0, store.dim), np.float32)
    shard = store.next_shard_index()
    store.commit_shard(
        shard,
        [r[0] for r in ok],
        [r[1] for r in ok],
        emb,
        [r[3] for r in ok],
        [r[4] for r in ok],
        buf["skipped"],
    )
    report.embedded += len(ok)
    for item, _, reason in buf["skipped"]:
        report.report.skip(item, reason)
    report.shards_committed.append(shard)
    logger.debug(
        "committed shard %d (%d embedded, %d skipped, %d transient left for a rerun)",
        shard,
        len(ok),
        len(buf["skipped"]),
        len(buf["transient"]),
    )


def clip_dims(encoders: EncoderSpec) -> Tuple[int, int]:
    """(input size, embedding dim) from the open_clip config, without building the model."""
    import json
    from pathlib import Path

    name = encoders.clip_model or ""
    if not name:
        raise ConfigError("CLIP embedding needs a CLIP model (--clip-model)")
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:") :]).expanduser() / "open_clip_config.json"
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
