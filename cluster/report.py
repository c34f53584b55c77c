"""One report format for every job: a JSON document plus a one-screen human summary.

A job builds a :class:`JobReport`, feeds it while it runs and writes it at the end::

    report = JobReport("embed", config=vars(args))          # config is redacted on the way in
    report.seen(len(items))
    with report.stage("embed", items=len(items)):
        ...                                                 # time per stage, items/s per stage
    report.processed(n_ok); report.already_done(n_before)
    report.skip(item_id, "not an image: cannot identify image file")   # reasons grouped by kind
    report.retry("s3 throttled")                            # retries counted by reason
    report.fail_transient(item_id, "timeout")                # left for a rerun
    report.actor_memory("Embedder-0", peak_memory())         # peak memory per actor (max kept)
    report.write(out_dir)           # <job>_report.json + <job>_report.txt (storage URIs work)
    print(report.summary())

Actors report their own peak memory with :func:`peak_memory` (RSS high-water mark, plus CUDA's
when torch has a GPU) and return it with their results. :class:`JobMetrics` exports the same
counts to Prometheus through Ray's metrics API (``ray.util.metrics``), from the driver or from
actors; it is a no-op where Ray is not running.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import resource
import socket
import sys
import time
from collections import Counter as _Counter
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Mapping, Optional

from .config import redact, redact_text

logger = logging.getLogger(__name__)

#: version of the JSON layout below; bump when a field changes meaning
REPORT_FORMAT = 1
#: examples kept per skip / failure reason (the full lists belong in the job's own manifests)
EXAMPLES_PER_REASON = 5


def reason_kind(reason: str) -> str:
    """The group a free-text reason is counted under: its text before the first ``:``, so
    ``"not an image: cannot identify image file '/a/b.jpg'"`` counts as ``"not an image"``."""
    head = str(reason).split(":", 1)[0].strip()
    return head or "unknown"


def peak_memory() -> Dict[str, int]:
    """This process's peak memory in bytes: ``rss`` (high-water mark of resident memory) and, when
    torch has initialised CUDA, ``cuda`` (peak allocated on the current device)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss": int(ru) * (1 if sys.platform == "darwin" else 1024)}
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out["cuda"] = int(torch.cuda.max_memory_allocated())
        except Exception:  # pragma: no cover - no usable CUDA
            pass
    return out


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"  # pragma: no cover


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


class JobReport:
    """Counts, reasons, retries, stage times and peak memory of one job run."""

    def __init__(self, job: str, *, config: Optional[Mapping[str, Any]] = None, unit: str = "images"):
        self.job = job
        self.unit = unit
        self.config = redact(dict(config)) if config is not None else None
        self.started = time.time()
        self.finished: Optional[float] = None
        self._clock0 = time.perf_counter()
        self._wall: Optional[float] = None
        self.n_seen = 0
        self.n_processed = 0
        self.n_already_done = 0
        self.skipped: _Counter = _Counter()
        self.skipped_examples: Dict[str, List[str]] = {}
        self.failed: _Counter = _Counter()
        self.failed_examples: Dict[str, List[str]] = {}
        self.retries: _Counter = _Counter()
        self.stages: Dict[str, Dict[str, float]] = {}
        self.memory: Dict[str, Dict[str, int]] = {}
        self.extra: Dict[str, Any] = {}

    # -- counting -------------------------------------------------------------------------------
    def seen(self, n: int = 1) -> None:
        """Inputs listed / read by the job (including those done by an earlier run)."""
        self.n_seen += int(n)

    def processed(self, n: int = 1) -> None:
        """Inputs that produced their output in this run."""
        self.n_processed += int(n)

    def already_done(self, n: int = 1) -> None:
        """Inputs whose output an earlier run had already committed (resumed jobs)."""
        self.n_already_done += int(n)

    @staticmethod
    def _add(counter: _Counter, examples: Dict[str, List[str]], item: Optional[str], reason: str, n: int) -> None:
        kind = reason_kind(reason)
        counter[kind] += int(n)
        if item is not None:
            ex = examples.setdefault(kind, [])
            if len(ex) < EXAMPLES_PER_REASON:
                ex.append(redact_text(str(item)))

    def skip(self, item: Optional[str], reason: str, n: int = 1) -> None:
        """An input skipped for good (bad input), counted under :func:`reason_kind` of ``reason``."""
        self._add(self.skipped, self.skipped_examples, item, reason, n)

    def fail_transient(self, item: Optional[str], reason: str, n: int = 1) -> None:
        """An input left unprocessed after retries (a rerun tries it again)."""
        self._add(self.failed, self.failed_examples, item, reason, n)

    def retry(self, reason: str = "retry", n: int = 1) -> None:
        """A retried read, task, actor restart or training restart."""
        self.retries[reason_kind(reason)] += int(n)

    def actor_memory(self, actor: str, peak: Mapping[str, int]) -> None:
        """Peak memory of one actor (bytes per kind, e.g. from :func:`peak_memory`); the maximum of
        repeated reports is kept."""
        cur = self.memory.setdefault(str(actor), {})
        for k, v in peak.items():
            cur[k] = max(int(v), cur.get(k, 0))

    # -- timing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, items: Optional[int] = None) -> Iterator[None]:
        """Time a stage (repeated entries add up); ``items`` gives its throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_stage(name, time.perf_counter() - t0, items)

    def add_stage(self, name: str, seconds: float, items: Optional[int] = None) -> None:
        st = self.stages.setdefault(name, {"seconds": 0.0, "items": 0})
        st["seconds"] += float(seconds)
        if items is not None:
            st["items"] += int(items)

    def finish(self) -> "JobReport":
        if self.finished is None:
            self.finished = time.time()
            self._wall = time.perf_counter() - self._clock0
        return self

    # -- output ---------------------------------------------------------------------------------
    @property
    def wall_seconds(self) -> float:
        return self._wall if self._wall is not None else time.perf_counter() - self._clock0

    @property
    def status(self) -> str:
        """``ok`` (every input processed, skipped or already done), ``incomplete`` (transient
        failures left for a rerun)."""
        return "incomplete" if sum(self.failed.values()) else "ok"

    def as_dict(self) -> Dict[str, Any]:
        wall = self.wall_seconds
        stages = []
        for name, st in self.stages.items():
            d = {"name": name, "seconds": round(st["seconds"], 3)}
            if st["items"]:
                d["items"] = int(st["items"])
                d["items_per_second"] = round(st["items"] / st["seconds"], 3) if st["seconds"] > 0 else None
            stages.append(d)
        iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds") if t else None
        return {
            "format": REPORT_FORMAT,
            "job": self.job,
            "status": self.status,
            "unit": self.unit,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "wall_seconds": round(wall, 3),
            "host": socket.gethostname(),
            "python": platform.python_version(),
            "inputs": {
                "seen": self.n_seen,
                "processed": self.n_processed,
                "already_done": self.n_already_done,
                "skipped": sum(self.skipped.values()),
                "failed_transient": sum(self.failed.values()),
            },
            "skipped_by_reason": dict(self.skipped.most_common()),
            "skipped_examples": self.skipped_examples,
            "failed_by_reason": dict(self.failed.most_common()),
            "failed_examples": self.failed_examples,
            "retries": {"total": sum(self.retries.values()), "by_reason": dict(self.retries.most_common())},
            "stages": stages,
            "throughput_per_second": round(self.n_processed / wall, 3) if wall > 0 else None,
            "peak_memory_bytes": self.memory,
            "config": self.config,
            "extra": redact(self.extra),
        }

    def summary(self, width: int = 100) -> str:
        """A one-screen human summary (at most ~25 lines)."""
        d = self.as_dict()
        i = d["inputs"]
        lines = [f"{self.job}: {d['status']} in {_fmt_seconds(d['wall_seconds'])}"
                 + (f"  ({d['throughput_per_second']:.2f} {self.unit}/s)" if d["throughput_per_second"] else ""),
                 (f"  {self.unit}: {i['seen']} seen, {i['processed']} processed, {i['already_done']} already done, "
                  f"{i['skipped']} skipped, {i['failed_transient']} failed transiently (rerun to retry)")]
        for title, by, ex in (("skipped", d["skipped_by_reason"], d["skipped_examples"]),
                              ("failed", d["failed_by_reason"], d["failed_examples"])):
            for k, n in list(by.items())[:5]:
                sample = ", ".join(ex.get(k, [])[:2])
                line = f"    {title} {n:>6}  {k}" + (f"  e.g. {sample}" if sample else "")
                lines.append(line if len(line) <= width else line[: width - 3] + "...")
            if len(by) > 5:
                lines.append(f"    ... {len(by) - 5} more {title} reasons in the JSON report")
        r = d["retries"]
        lines.append(f"  retries: {r['total']}" + (" (" + ", ".join(f"{k} {n}" for k, n in
                                                                     list(r["by_reason"].items())[:4]) + ")"
                                                   if r["total"] else ""))
        if d["stages"]:
            lines.append("  stages:")
            for st in d["stages"][:8]:
                rate = f"  {st['items_per_second']:.2f}/s over {st['items']}" if st.get("items_per_second") else ""
                lines.append(f"    {st['name']:<20} {_fmt_seconds(st['seconds']):>10}{rate}")
        if self.memory:
            lines.append("  peak memory per actor:")
            for name, m in sorted(self.memory.items(), key=lambda kv: -kv[1].get("rss", 0))[:6]:
                lines.append(f"    {name:<28} rss {_fmt_bytes(m.get('rss'))}"
                             + (f", cuda {_fmt_bytes(m['cuda'])}" if "cuda" in m else ""))
            if len(self.memory) > 6:
                lines.append(f"    ... {len(self.memory) - 6} more actors in the JSON report")
        return "\n".join(lines)

    def write(self, out: str, storage_options: Optional[Mapping[str, Any]] = None, name: Optional[str] = None) -> str:
        """Write ``<name>.json`` and ``<name>.txt`` (default name ``<job>_report``) under ``out``
        (a directory or storage URI); returns the JSON file's URI."""
        self.finish()
        stem = name or f"{self.job}_report"
        body = json.dumps(self.as_dict(), indent=2, default=str).encode()
        text = (self.summary() + "\n").encode()
        if "://" in str(out):
            from index.storage import join, write_bytes

            json_uri = join(str(out), stem + ".json")
            write_bytes(json_uri, body, storage_options)
            write_bytes(join(str(out), stem + ".txt"), text, storage_options)
            return json_uri
        os.makedirs(out, exist_ok=True)
        json_path = os.path.join(out, stem + ".json")
        for path, data in ((json_path, body), (os.path.join(out, stem + ".txt"), text)):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return json_path


class JobMetrics:
    """Prometheus metrics of a job through ``ray.util.metrics`` (exported by each node's metrics
    agent, ``ray_`` prefixed): ``reco_items_total`` and ``reco_errors_total`` counters and a
    ``reco_items_per_second`` gauge, tagged with job and stage (errors also with kind).

    Create one per process (driver or actor) and call it freely: outside a running Ray it does
    nothing, so library code needs no guard."""

    def __init__(self, job: str, stage: str = "main"):
        self.tags = {"job": job, "stage": stage}
        self._items = self._errors = self._rate = None
        self._ready = False

    def _init(self) -> bool:
        if self._ready:
            return True
        try:
            import ray

            if not ray.is_initialized():
                return False
            from ray.util.metrics import Counter, Gauge

            self._items = Counter("reco_items_total", description="inputs processed by reco jobs",
                                  tag_keys=("job", "stage"))
            self._errors = Counter("reco_errors_total", description="inputs skipped or failed in reco jobs",
                                   tag_keys=("job", "stage", "kind"))
            self._rate = Gauge("reco_items_per_second", description="throughput of reco jobs (items/s)",
                               tag_keys=("job", "stage"))
            self._ready = True
        except Exception:  # pragma: no cover - metrics must never break a job
            return False
        return True

    def processed(self, n: int = 1) -> None:
        if n and self._init():
            self._items.inc(float(n), tags=self.tags)

    def error(self, kind: str, n: int = 1) -> None:
        if n and self._init():
            self._errors.inc(float(n), tags={**self.tags, "kind": reason_kind(kind)[:64]})

    def throughput(self, items_per_second: float) -> None:
        if self._init():
            self._rate.set(float(items_per_second), tags=self.tags)


def ray_actor_restarts(job_id: Optional[str] = None) -> Dict[str, int]:
    """``{actor class: restarts}`` of the actors of a Ray job (default: the driver's), read from
    the GCS actor table, which needs no dashboard (the embedded Ray runs without one). ``{}``
    outside Ray. Task retries of Ray Data / plain tasks are not in that table and are not
    counted here."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        from ray._private import state

        jid = job_id or ray.get_runtime_context().get_job_id()
        out: _Counter = _Counter()
        for a in state.actors().values():
            n = int(a.get("NumRestarts") or 0)
            if n and a.get("JobID") == jid:
                out[str(a.get("ActorClassName")).rsplit(".", 1)[-1]] += n
        return dict(out)
    except Exception as exc:  # a report must never break a job
        logger.debug("could not read actor restarts: %s", exc)
        return {}


def job_report(
    job: str,
    *,
    unit: str = "images",
    config: Optional[Mapping[str, Any]] = None,
    seen: int = 0,
    processed: int = 0,
    already_done: int = 0,
    skipped: Optional[Mapping[str, str]] = None,
    failed_transient: Optional[Mapping[str, str]] = None,
    stages: Optional[Mapping[str, Any]] = None,
    memory: Optional[Mapping[str, Any]] = None,
    retries: Optional[Mapping[str, int]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    seconds: Optional[float] = None,
) -> JobReport:
    """A :class:`JobReport` from what a job already counted: ``skipped`` / ``failed_transient``
    map input ids to reasons; ``stages`` maps a stage name to seconds or (seconds, items);
    ``memory`` maps an actor name to peak bytes (int, RSS) or a :func:`peak_memory` dict;
    ``retries`` maps reasons to counts; ``seconds``: how long the job has run (its wall time and
    start are set from it). Ray actor restarts of the running job are added."""
    r = JobReport(job, config=config, unit=unit)
    if seconds is not None:
        r.started -= float(seconds)
        r._clock0 -= float(seconds)
    r.seen(seen)
    r.processed(processed)
    r.already_done(already_done)
    for item, reason in (skipped or {}).items():
        r.skip(item, reason)
    for item, reason in (failed_transient or {}).items():
        r.fail_transient(item, reason)
    for name, v in (stages or {}).items():
        secs, items = (v if isinstance(v, (tuple, list)) else (v, None))
        r.add_stage(name, float(secs), items)
    for actor, m in (memory or {}).items():
        r.actor_memory(actor, m if isinstance(m, Mapping) else {"rss": int(m)})
    for reason, n in (retries or {}).items():
        if n:
            r.retry(reason, int(n))
    for cls, n in ray_actor_restarts().items():
        r.retry(f"actor restart ({cls})", n)
    r.extra.update(dict(extra or {}))
    return r


def write_job_report(report: JobReport, out: str, storage_options: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``job_report.json`` + ``job_report.txt`` under ``out`` (a directory or storage URI)
    and log the one-screen summary; returns the JSON's URI."""
    uri = report.write(out, storage_options, name="job_report")
    logger.info("%s\n(report: %s)", report.summary(), uri)
    return uri
