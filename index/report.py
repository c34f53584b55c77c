"""The uniform job report: what every job did, as a JSON document plus a one-screen summary.

Ray-free (the Ray parts, metrics and actor restarts, are in :mod:`cluster.report`). A job builds a
:class:`JobReport`, feeds it while it runs and writes it beside its outputs
(:meth:`index.output.ResumableOutput.write_report`, or :meth:`JobReport.write`)::

    report = JobReport("embed", config=vars(args), max_failed_fraction=0.5)  # config redacted
    report.seen(len(items))
    with report.stage("embed", items=len(items)):
        ...                                                 # time per stage, items/s per stage
    report.processed(n_ok); report.already_done(n_before, failed=n_before_bad)
    report.skip(item_id, "not an image: cannot identify image file")   # bad input, for good
    report.fail_transient(item_id, "timeout")                # left for a rerun
    report.retry("s3 throttled"); report.actor_memory("Embedder-0", peak_memory())
    report.write(out_dir)           # <job>_report.json + <job>_report.txt (storage URIs work)
    return report.exit_code         # 0 ok, 3 incomplete (rerun), 1 failed

**Status** (:attr:`JobReport.status`): ``failed`` when the inputs that failed for good (skipped
as bad input, in this run or an earlier one) are more than ``max_failed_fraction`` of the inputs
decided (processed, skipped or already done): a run that turns most of its inputs into nothing is
not "ok" (the threshold is ``jobs.max_failed_fraction`` of ``configs/cluster.yaml``; None: never);
else ``incomplete`` when inputs failed transiently (a rerun retries them); else ``ok``.

Jobs keep their own names for the counts (``built``, ``labelled``, ``embedded``...) through a
:class:`JobResult`: a thin view whose fields are aliases of one report's counters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import resource
import socket
import sys
import time
from collections import Counter as _Counter
from datetime import datetime, timezone
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional

from .redact import redact, redact_text
from .storage import join, write_bytes

logger = logging.getLogger(__name__)

#: version of the JSON layout below; bump when a field changes meaning
REPORT_FORMAT = 1
#: examples kept per skip / failure reason (the full lists belong in the job's own manifests)
EXAMPLES_PER_REASON = 5
#: exit status of a job: every input done / most inputs failed for good / some left for a rerun
EXIT_OK, EXIT_FAILED, EXIT_RERUN = 0, 1, 3


def reason_kind(reason: str) -> str:
    """The group a free-text reason is counted under: its text before the first ``:``, so
    ``"not an image: cannot identify image file '/a/b.jpg'"`` counts as ``"not an image"``."""
    head = str(reason).split(":", 1)[0].strip()
    return head or "unknown"


def reset_peak_memory() -> bool:
    """Start a new resident-memory high-water mark for this process, so that a Ray worker that
    runs several tasks reports each task's own peak (:func:`peak_memory` after it). Linux: writing
    ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM``; also resets torch's CUDA peak when CUDA is
    initialised. Returns False where the RSS mark cannot be reset (then the process's lifetime
    high-water mark is what :func:`peak_memory` reports)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
        except Exception:  # pragma: no cover - no usable CUDA
            pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory() -> Dict[str, int]:
    """This process's peak memory in bytes: ``rss`` (high-water mark of resident memory since the
    process started or since :func:`reset_peak_memory`) and, when torch has initialised CUDA,
    ``cuda`` (peak allocated on the current device)."""
    hwm = _vm_hwm()
    if hwm is None:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        hwm = int(ru) * (1 if sys.platform == "darwin" else 1024)
    out = {"rss": hwm}
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


def _iso(t: Optional[float]) -> Optional[str]:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds") if t else None


class JobReport:
    """Counts, reasons, retries, stage times and peak memory of one job run."""

    def __init__(
        self,
        job: str,
        *,
        config: Optional[Mapping[str, Any]] = None,
        unit: str = "images",
        max_failed_fraction: Optional[float] = None,
    ):
        self.job = job
        self.unit = unit
        self.max_failed_fraction = max_failed_fraction
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
        #: every named input skipped / failed transiently in this run, with its reason
        self.skipped_items: Dict[str, str] = {}
        self.failed_items: Dict[str, str] = {}
        self.n_failed_before = 0  # of the already-done inputs, those an earlier run skipped (bad input)

    def configure(
        self, config: Optional[Mapping[str, Any]] = None, max_failed_fraction: Optional[float] = None
    ) -> "JobReport":
        """Set the job's configuration (redacted on the way in) and its failure threshold."""
        if config is not None:
            self.config = redact(dict(config))
        if max_failed_fraction is not None:
            self.max_failed_fraction = max_failed_fraction
        return self

    # -- counting -------------------------------------------------------------------------------
    def seen(self, n: int = 1) -> None:
        """Inputs listed / read by the job (including those done by an earlier run)."""
        self.n_seen += int(n)

    def processed(self, n: int = 1) -> None:
        """Inputs that produced their output in this run."""
        self.n_processed += int(n)

    def already_done(self, n: int = 1, failed: int = 0) -> None:
        """Inputs whose output an earlier run had already committed (resumed jobs); ``failed`` of
        them were committed as failed for good (they count toward the ``failed`` status)."""
        self.n_already_done += int(n)
        self.n_failed_before += int(failed)

    @staticmethod
    def _add(
        counter: _Counter,
        examples: Dict[str, List[str]],
        items: Dict[str, str],
        item: Optional[str],
        reason: str,
        n: int,
    ) -> None:
        kind = reason_kind(reason)
        counter[kind] += int(n)
        if item is not None:
            items[str(item)] = str(reason)
            ex = examples.setdefault(kind, [])
            if len(ex) < EXAMPLES_PER_REASON:
                ex.append(redact_text(str(item)))

    def skip(self, item: Optional[str], reason: str, n: int = 1) -> None:
        """An input skipped for good (bad input), counted under :func:`reason_kind` of ``reason``."""
        self._add(self.skipped, self.skipped_examples, self.skipped_items, item, reason, n)

    def fail_transient(self, item: Optional[str], reason: str, n: int = 1) -> None:
        """An input left unprocessed after retries (a rerun tries it again)."""
        self._add(self.failed, self.failed_examples, self.failed_items, item, reason, n)

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
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def failed_fraction(self) -> float:
        """Inputs failed for good (this run and earlier ones) over inputs decided (0 when none)."""
        decided = self.n_processed + self.n_skipped + self.n_already_done
        return (self.n_skipped + self.n_failed_before) / decided if decided else 0.0

    @property
    def status(self) -> str:
        """``failed`` (more than ``max_failed_fraction`` of the inputs failed for good),
        ``incomplete`` (transient failures left for a rerun), else ``ok``."""
        if self.max_failed_fraction is not None and self.failed_fraction > self.max_failed_fraction:
            return "failed"
        return "incomplete" if sum(self.failed.values()) else "ok"

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_FAILED`, :data:`EXIT_RERUN` or :data:`EXIT_OK`, by :attr:`status`."""
        return {"failed": EXIT_FAILED, "incomplete": EXIT_RERUN}.get(self.status, EXIT_OK)

    def failure_line(self, first: int = 3) -> str:
        """One line for the log of a ``failed`` run: the count, the rule and the first reasons."""
        n = self.n_skipped + self.n_failed_before
        decided = self.n_processed + self.n_skipped + self.n_already_done
        reasons = "; ".join(f"{k}: {v}" for k, v in list(self.skipped_items.items())[:first])
        return (
            f"{self.job} failed: {n} of {decided} {self.unit} failed ({100 * self.failed_fraction:.1f}%, "
            f"above jobs.max_failed_fraction {self.max_failed_fraction:g})" + (f"; first: {reasons}" if reasons else "")
        )

    def as_dict(self) -> Dict[str, Any]:
        wall = self.wall_seconds
        stages = []
        for name, st in self.stages.items():
            d = {"name": name, "seconds": round(st["seconds"], 3)}
            if st["items"]:
                d["items"] = int(st["items"])
                d["items_per_second"] = round(st["items"] / st["seconds"], 3) if st["seconds"] > 0 else None
            stages.append(d)
        return {
            "format": REPORT_FORMAT,
            "job": self.job,
            "status": self.status,
            "failed_fraction": round(self.failed_fraction, 6),
            "max_failed_fraction": self.max_failed_fraction,
            "unit": self.unit,
            "started": _iso(self.started),
            "finished": _iso(self.finished),
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
        lines = [
            f"{self.job}: {d['status']} in {_fmt_seconds(d['wall_seconds'])}"
            + (f"  ({d['throughput_per_second']:.2f} {self.unit}/s)" if d["throughput_per_second"] else ""),
            (
                f"  {self.unit}: {i['seen']} seen, {i['processed']} processed, {i['already_done']} already done, "
                f"{i['skipped']} skipped, {i['failed_transient']} failed transiently (rerun to retry)"
            ),
        ]
        if d["status"] == "failed":
            lines.append(
                f"  FAILED: {100 * self.failed_fraction:.1f}% of the {self.unit} failed for good, above "
                f"jobs.max_failed_fraction {self.max_failed_fraction:g} (set it in the cluster config)"
            )
        for title, by, ex in (
            ("skipped", d["skipped_by_reason"], d["skipped_examples"]),
            ("failed", d["failed_by_reason"], d["failed_examples"]),
        ):
            for k, n in list(by.items())[:5]:
                sample = ", ".join(ex.get(k, [])[:2])
                line = f"    {title} {n:>6}  {k}" + (f"  e.g. {sample}" if sample else "")
                lines.append(line if len(line) <= width else line[: width - 3] + "...")
            if len(by) > 5:
                lines.append(f"    ... {len(by) - 5} more {title} reasons in the JSON report")
        r = d["retries"]
        lines.append(
            f"  retries: {r['total']}"
            + (" (" + ", ".join(f"{k} {n}" for k, n in list(r["by_reason"].items())[:4]) + ")" if r["total"] else "")
        )
        if d["stages"]:
            lines.append("  stages:")
            for st in d["stages"][:8]:
                rate = f"  {st['items_per_second']:.2f}/s over {st['items']}" if st.get("items_per_second") else ""
                lines.append(f"    {st['name']:<20} {_fmt_seconds(st['seconds']):>10}{rate}")
        if self.memory:
            lines.append("  peak memory per actor:")
            for name, m in sorted(self.memory.items(), key=lambda kv: -kv[1].get("rss", 0))[:6]:
                lines.append(
                    f"    {name:<28} rss {_fmt_bytes(m.get('rss'))}"
                    + (f", cuda {_fmt_bytes(m['cuda'])}" if "cuda" in m else "")
                )
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
        json_uri = join(str(out), stem + ".json")
        write_bytes(json_uri, body, storage_options)
        write_bytes(join(str(out), stem + ".txt"), text, storage_options)
        return json_uri


class JobResult:
    """A job's own names for the counters of one :class:`JobReport` (``.report``): each entry of
    :attr:`ALIASES` (``name -> report attribute``) reads and writes the report, so the counts live
    once; a subclass adds its job-specific measurements as plain attributes (:attr:`FIELDS`, with
    their defaults) and the job's legacy JSON in :meth:`as_dict`."""

    ALIASES: ClassVar[Dict[str, str]] = {}
    FIELDS: ClassVar[Dict[str, Any]] = {}

    def __init__(self, report: JobReport):
        object.__setattr__(self, "report", report)
        for k, v in self.FIELDS.items():
            object.__setattr__(self, k, v() if callable(v) else v)

    def __getattr__(self, name: str) -> Any:
        aliases = type(self).ALIASES
        if name in aliases:
            return getattr(self.report, aliases[name])
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).ALIASES:
            setattr(self.report, type(self).ALIASES[name], value)
        else:
            object.__setattr__(self, name, value)

    @property
    def seconds(self) -> float:
        return self.report.wall_seconds

    def as_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in (*self.ALIASES, *self.FIELDS)}
        d["seconds"] = self.seconds
        return d
