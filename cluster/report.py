"""The Ray side of the uniform job report (:mod:`index.report`, re-exported here).

Actors report their own peak memory with :func:`peak_memory` (RSS high-water mark, plus CUDA's
when torch has a GPU) and return it with their results. :class:`JobMetrics` exports the same
counts to Prometheus through Ray's metrics API (``ray.util.metrics``), from the driver or from
actors; it is a no-op where Ray is not running.
"""

from __future__ import annotations

import logging
from collections import Counter as _Counter
from typing import Any, Dict, Mapping, Optional

from index.report import (  # noqa: F401
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RERUN,
    REPORT_FORMAT,
    JobReport,
    JobResult,
    peak_memory,
    reason_kind,
    reset_peak_memory,
)

logger = logging.getLogger(__name__)


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

            self._items = Counter(
                "reco_items_total", description="inputs processed by reco jobs", tag_keys=("job", "stage")
            )
            self._errors = Counter(
                "reco_errors_total",
                description="inputs skipped or failed in reco jobs",
                tag_keys=("job", "stage", "kind"),
            )
            self._rate = Gauge(
                "reco_items_per_second", description="throughput of reco jobs (items/s)", tag_keys=("job", "stage")
            )
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
        secs, items = v if isinstance(v, (tuple, list)) else (v, None)
        r.add_stage(name, float(secs), items)
    for actor, m in (memory or {}).items():
        r.actor_memory(actor, m if isinstance(m, Mapping) else {"rss": int(m)})
    for reason, n in (retries or {}).items():
        if n:
            r.retry(reason, int(n))
    count_actor_restarts(r)
    r.extra.update(dict(extra or {}))
    return r


def count_actor_restarts(report: JobReport) -> JobReport:
    """Add the Ray actor restarts of the running job to ``report`` as retries, by actor class."""
    for cls, n in ray_actor_restarts().items():
        report.retry(f"actor restart ({cls})", n)
    return report


def write_job_report(report: JobReport, out: str, storage_options: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``job_report.json`` + ``job_report.txt`` under ``out`` (a directory or storage URI)
    and log the one-screen summary; returns the JSON's URI."""
    uri = report.write(out, storage_options, name="job_report")
    logger.info("%s\n(report: %s)", report.summary(), uri)
    if report.status == "failed":
        logger.error("%s", report.failure_line())
    return uri
