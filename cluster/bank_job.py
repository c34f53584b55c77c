"""Vocabulary-scale concept banks: a pool of Ray actors, committed in batches, resumable.

Output layout under ``OUT`` (a storage URI, :mod:`index.storage`)::

    OUT/build.json                         config hash + what it covers (bank config, encoders, mode)
    OUT/parts/part-00004-9f1c2a7b.safetensors   one commit: the references of a batch of concepts
                                           with their table rows in the safetensors header
    OUT/bank.safetensors, OUT/bank.json    the assembled bank (vocabulary order), written at the end
    OUT/concepts.parquet                   one row per concept: name, status, error, archive ids,
                                           seed token and seed score per archive image, language /
                                           context flags, image counts, seconds, config hash

**Commit rule.** Context concepts (the paper's context elimination) are built first, in order,
each with the earlier ones eliminated, and committed as one part. Then the target concepts: with
``bank.context_from_vocabulary`` (the default) they form a chain in
:func:`reco.bank.build_order`, each peeling off every concept built before it: the actors
read and encode archives in parallel ahead of the chain and the co-segmentations run in order
(the same result as :meth:`reco.bank.ConceptBank.build`); without it every concept is
co-segmented independently, in parallel. Concepts are committed every ``commit_every``. A part is one file written atomically, so it holds
references and rows of the same concepts or does not exist. A concept whose archive is empty or
unusable (bad input) is committed as ``failed`` with its reason; a concept with an image that
failed *transiently* is not committed, so the next run redoes it (in a peeling chain, it and
every concept after it: they depend on it). A rerun with the same config
hash skips every committed concept; another config is refused unless ``overwrite``. All of it is
:class:`index.output.ResumableOutput`: ``OUT/writer.lock`` is taken on any storage (local or S3),
``--overwrite`` forgets the parts under it, and ``OUT/job_report.json`` says ``failed`` when more
than ``jobs.max_failed_fraction`` of the concepts failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from index.output import JobReport, ResumableOutput
from index.report import JobResult
from reco.bank import ConceptBank, ConceptReference
from reco.config import BankConfig, resolve_context, to_dict
from reco.errors import ConfigError, EmptyArchiveError

from .bank import BankWorker
from .bank_parts import PARTS_DIR, Committed, commit_part, concept_row
from .config import ActorConfig, JobsConfig
from .models import EncoderSpec
from .report import count_actor_restarts

logger = logging.getLogger(__name__)

BUILD_FILE = "build.json"
#: Fault tolerance of the bank actors: an actor lost with its node (or killed by the OOM killer) is
#: recreated on any node that fits it, and the concept it was building is sent again (a build is a
#: pure function of its inputs; only the driver commits). Bounded, so that a concept that kills
#: every actor it lands on fails the job instead of looping; the rerun resumes from the parts.
ACTOR_MAX_RESTARTS = 4
ACTOR_MAX_TASK_RETRIES = 4


@dataclass(frozen=True)
class ConceptTask:
    """One concept to build: its archive (image URIs) and, with CLIP, its text embedding."""

    name: str
    uris: Tuple[str, ...]
    text: Optional[torch.Tensor] = None
    source: str = "exemplars"  # "exemplars" or "retrieval"


class BankJobReport(JobResult):
    """build-bank's names for the counts of its uniform report (``.report``, a
    :class:`index.report.JobReport` in concepts)."""

    ALIASES = {
        "concepts": "n_seen",
        "built": "n_processed",
        "already_done": "n_already_done",
        "failed": "skipped_items",
        "failed_transient": "failed_items",
    }
    FIELDS = {
        "parts_committed": 0,
        "concept_seconds": 0.0,
        "actor_peak_rss_mb": list,
        "left_for_rerun": 0,
        "context_dropped": list,
    }  # left_for_rerun: concepts after a transient failure in the peeling chain; context_dropped:
    # context concepts left out for want of an archive (reco.config.resolve_context)

    @property
    def concepts_per_minute(self) -> float:
        return 60.0 * (self.built + len(self.failed)) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return dict(super().as_dict(), concepts_per_minute=self.concepts_per_minute)


def bank_settings(config: BankConfig, encoders: EncoderSpec, archive_mode: str) -> Dict[str, Any]:
    """What a bank depends on (its ``build.json`` is these plus their :func:`index.output.config_hash`)."""
    return {
        "bank": to_dict(config),
        "dense_encoder": encoders.dense_encoder,
        "dense_weights": encoders.dense_weights,
        "clip": encoders.clip_model,
        "clip_weights": encoders.clip_weights,
        "clip_dense_head": encoders.clip_dense_head,
        "archive_mode": archive_mode,
    }


class _Parts:
    """Buffers finished concepts and commits them as parts of ``commit_every``."""

    def __init__(self, out: ResumableOutput, commit_every: int, report: BankJobReport):
        self.out, self.every, self.report = out, commit_every, report
        self.buffer: List[Tuple[Dict[str, Any], Optional[ConceptReference]]] = []

    def add(self, row: Dict[str, Any], ref: Optional[ConceptReference]) -> None:
        self.buffer.append((row, ref))
        if len(self.buffer) >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            commit_part(self.out, self.buffer)
            self.buffer = []
            self.report.parts_committed += 1


def _light(ref: ConceptReference) -> ConceptReference:
    """What later concepts need of an earlier one (its vectors): no score maps, no members."""
    return replace(ref, scores=None, member_sums=None, member_counts=None)


def run_build_bank(
    tasks: Sequence[ConceptTask],
    encoders: EncoderSpec,
    config: BankConfig,
    out_uri: str,
    actors: ActorConfig = ActorConfig(),
    context_tasks: Sequence[ConceptTask] = (),
    archive_mode: str = "exemplar",
    commit_every: int = 16,
    overwrite: bool = False,
    storage_options: Optional[Mapping[str, Any]] = None,
    max_failed_fraction: Optional[float] = JobsConfig.max_failed_fraction,
    job_config: Optional[Mapping[str, Any]] = None,
) -> Tuple[Optional[ConceptBank], BankJobReport]:
    """Build (or finish building) the bank of ``tasks`` into ``out_uri`` (Ray must be running),
    through :class:`index.output.ResumableOutput` (``build.json``, ``parts/``, writer lock).

    Returns the assembled bank (None when some concepts are left for a rerun) and a report; the
    uniform report (``job_report.json``, config ``job_config``) is written beside the bank, with
    status ``failed`` when more than ``max_failed_fraction`` of the concepts failed."""
    import ray

    if commit_every < 1:
        raise ConfigError("commit_every must be >= 1")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError("concept names must be unique")
    report = BankJobReport(
        JobReport("build-bank", unit="concepts", config=job_config, max_failed_fraction=max_failed_fraction)
    )
    report.concepts = len(tasks)
    config, context_tasks, report.context_dropped = resolve_context_tasks(config, tasks, context_tasks)
    report.report.extra["context_dropped"] = list(report.context_dropped)
    covered = bank_settings(config, encoders, archive_mode)
    use_context = bool(config.context_elimination and config.context_concepts)
    out = ResumableOutput(out_uri, "build-bank", BUILD_FILE, PARTS_DIR, ".safetensors", storage_options)
    with out.open(covered, overwrite):
        digest = out.settings["config_hash"]
        if out.previous and out.previous.get("config_hash") == digest and out.previous.get("encoder_metadata"):
            out.update_settings(encoder_metadata=out.previous["encoder_metadata"])  # a rerun with nothing left
            # to build starts no actor to say it again: keep it
        done = Committed(out.parts).update()
        rows, refs = done.rows, done.refs
        todo = [t for t in tasks if f"target:{t.name}" not in rows]
        report.report.already_done(
            len(tasks) - len(todo),
            failed=sum(1 for t in tasks if rows.get(f"target:{t.name}", {}).get("status") == "failed"),
        )
        ctx_names = list(config.context_concepts) if use_context else []
        need_context = use_context and any(f"context:{c}" not in rows for c in ctx_names)
        opts = dict(
            num_cpus=actors.cpus_per_actor,
            num_gpus=actors.gpus_per_actor,
            max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_MAX_TASK_RETRIES,
        )
        n_workers = min(actors.num_actors, max(1, len(todo)))
        workers = [
            ray.remote(BankWorker)
            .options(**opts)
            .remote(encoders, config, actors.torch_threads, dict(storage_options or {}))
            for _ in range(n_workers if (todo or need_context) else 0)
        ]
        parts = _Parts(out, commit_every, report)
        order: List[str] = list(names)
        try:
            if workers:  # provenance of the encoders as the actors built them (digests included)
                enc_meta = ray.get(workers[0].metadata.remote(archive_mode))
                enc_meta.pop("concepts", None)
                out.update_settings(encoder_metadata=enc_meta)
            if need_context:  # the chain is rebuilt whole: each step depends on the earlier ones
                by_name = {t.name: t for t in context_tasks}
                chain: Dict[str, ConceptReference] = {}
                for c in ctx_names:
                    t = by_name[c]
                    ref, info = ray.get(workers[0].build.remote(c, list(t.uris), t.text, dict(chain)))
                    if ref is None or info["read"].get("failed"):
                        raise EmptyArchiveError(
                            f"context concept {c!r} (archive: {t.source}) could not be built: "
                            f"{info.get('error') or info['read'].get('failed_files')}; every target "
                            "depends on it: fix its archive and rerun, or leave it out of bank.context_concepts"
                        )
                    chain[c] = _light(ref)
                    parts.buffer.append((concept_row(c, "context", ref, info, t, digest), ref))
                parts.flush()  # the context chain is one part
                done.update()
            context = {c: _light(refs[f"context:{c}"]) for c in ctx_names}
            if config.context_from_vocabulary:
                order = _build_chain(tasks, rows, refs, context, workers, config, digest, parts, report)
            elif todo:
                _build_parallel(todo, rows, refs, context, workers, digest, parts, report)
            parts.flush()
            if workers:
                report.actor_peak_rss_mb = [
                    round(float(m), 1) for m in ray.get([w.peak_rss_mb.remote() for w in workers])
                ]
        finally:
            for w in workers:
                ray.kill(w)
        done.update()
        _finish_report(report)
        if report.failed_transient:
            logger.warning(
                "%d concepts left for a rerun (transient read failures%s); the bank is not assembled yet",
                len(report.failed_transient) + report.left_for_rerun,
                f", and {report.left_for_rerun} later in the build order" if report.left_for_rerun else "",
            )
            out.write_report(report.report)
            return None, report
        try:
            bank = _assemble(
                tasks, rows, refs, out.settings.get("encoder_metadata") or {}, config, archive_mode, digest, order
            )
        except EmptyArchiveError:
            out.write_report(report.report)
            raise
        bank.metadata["context_dropped"] = list(report.context_dropped)
        _write_outputs(out, bank, tasks, rows)
        out.write_report(report.report)
    return bank, report


def resolve_context_tasks(
    config: BankConfig, tasks: Sequence[ConceptTask], context_tasks: Sequence[ConceptTask]
) -> Tuple[BankConfig, List[ConceptTask], List[str]]:
    """The context concepts' tasks (:func:`reco.config.resolve_context`): a context concept
    without an archive of its own takes the vocabulary concept's of the same name or alias; the
    others are left out with a warning (an error with ``bank.context_required``)."""
    given = {t.name: t for t in context_tasks if t.uris}
    targets = {t.name: t for t in tasks if t.uris}
    cfg, dropped = resolve_context(config, [*given, *targets])  # warns about the dropped
    if not cfg.context_elimination:
        return cfg, [], list(dropped)
    return cfg, [given[c] if c in given else targets[c] for c in cfg.context_concepts], list(dropped)


def _finish_report(report: BankJobReport) -> None:
    """The stages, actor memory, restarts and part count of a run, in its uniform report."""
    r = report.report.finish()
    n = report.built + len(report.failed)
    r.add_stage("job", r.wall_seconds, n)
    r.add_stage("concept builds (sum over concepts)", report.concept_seconds, n)
    for i, mb in enumerate(report.actor_peak_rss_mb):
        r.actor_memory(f"bank actor {i}", {"rss": int(mb * 2**20)})
    count_actor_restarts(r)
    r.extra.update(parts_committed=report.parts_committed, left_for_rerun=report.left_for_rerun)


#: failures logged one line each; past this the count is in the report and in one summary line
#: (a vocabulary of 10,000 names that all fail must not write megabytes of warnings)
LOGGED_FAILURES = 20


def _log_failure(report: "BankJobReport", line: str) -> None:
    """Log a failure the report has just counted (the first :data:`LOGGED_FAILURES` of a run)."""
    n = len(report.failed) + len(report.failed_transient)
    if n <= LOGGED_FAILURES:
        logger.warning("%s", line)
    elif n == LOGGED_FAILURES + 1:
        logger.warning("more concepts failed: further failures are counted in job_report.json, not logged")


def _record(
    name: str,
    ref: Optional[ConceptReference],
    info: Mapping[str, Any],
    task: ConceptTask,
    rows: Mapping[str, Dict[str, Any]],
    digest: str,
    report: BankJobReport,
) -> Optional[Dict[str, Any]]:
    """The table row of a finished concept, or None (reported) when an archive image failed
    transiently: such a concept is not committed, the next run redoes it."""
    report.concept_seconds += float(info.get("seconds", 0.0))
    read = info.get("read", {})
    if read.get("failed"):
        report.report.fail_transient(
            name,
            f"{read['failed']} archive image(s) unreadable now: "
            + "; ".join(f"{u}: {r}" for u, r in list(read["failed_files"].items())[:3]),
        )
        _log_failure(report, f"concept {name} left for a rerun: {report.failed_transient[name]}")
        return None
    row = concept_row(name, "target", ref, info, task, digest)
    if ref is not None and ref.reused_context:  # keep the context build's seeds and archive
        ctx_row = rows[f"context:{name}"]
        row.update(
            {
                k: ctx_row[k]
                for k in ("archive", "seed_index", "seed_scores", "grid", "images_skipped", "language_guidance")
            }
        )
    if ref is None:
        report.report.skip(name, row["error"])
        _log_failure(report, f"concept {name} failed: {row['error']}")
    else:
        report.built += 1
    return row


def _build_parallel(todo, rows, refs, context, workers, digest, parts: _Parts, report: BankJobReport) -> None:
    """Every concept independent of the others (``context_from_vocabulary`` off): co-segmented
    in parallel by the actor pool, committed in completion order. A concept that is also a
    context concept reuses its whole context reference (members included), as in one process:
    its archive is not read twice."""
    from ray.util import ActorPool
    from tqdm import tqdm

    from reco.bank import reused_reference

    for t in [t for t in todo if t.name in context]:
        ref = reused_reference(t.name, refs[f"context:{t.name}"])
        row = _record(t.name, ref, {"name": t.name, "archive": [], "read": {}, "seconds": 0.0}, t, rows, digest, report)
        if row is not None:
            parts.add(row, ref)
    todo = [t for t in todo if t.name not in context]
    by_task = {t.name: t for t in todo}
    jobs = ActorPool(workers).map_unordered(lambda w, t: w.build.remote(t.name, list(t.uris), t.text, context), todo)
    for ref, info in tqdm(jobs, total=len(todo), desc="concepts", unit="concept"):
        name = str(info["name"])
        row = _record(name, ref, info, by_task[name], rows, digest, report)
        if row is not None:
            parts.add(row, ref)


def _build_chain(
    tasks, rows, refs, context, workers, config: BankConfig, digest, parts: _Parts, report: BankJobReport
) -> List[str]:
    """Sequential peeling (``context_from_vocabulary``, :func:`reco.bank.build_order`): each
    concept eliminates every concept built before it, exactly as
    :meth:`reco.bank.ConceptBank.build` does in one process. The actors read and encode the
    archives in parallel, ahead of the chain (at most two per actor in flight, to bound memory);
    the co-segmentations run here, in order, each as soon as its features and every earlier
    concept are ready. Committed concepts are a prefix of the order and are not redone. A
    concept that failed transiently stops the chain (what follows it depends on it): it and the
    rest are left for the rerun. Returns the build order."""
    import math
    from collections import deque
    from itertools import count

    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from reco.bank import ConceptBuilder, build_order, reused_reference
    from reco.errors import ReCoError

    by_name = {t.name: t for t in tasks}
    names = [t.name for t in tasks]
    confidences: Optional[Dict[str, float]] = None
    if config.context_order == "confidence":
        confidences, need = {}, []
        for t in tasks:
            row = rows.get(f"target:{t.name}")
            if t.name in context:
                confidences[t.name] = math.inf
            elif row is not None:
                confidences[t.name] = float(row.get("order_key", math.nan))
            else:
                need.append(t)
        jobs = (
            ActorPool(workers).map_unordered(lambda w, t: w.confidence.remote(t.name, list(t.uris), t.text), need)
            if need
            else []
        )
        for conf, info in tqdm(jobs, total=len(need), desc="concept order (confidence)", unit="concept"):
            name = str(info["name"])
            if info["read"].get("failed"):  # the order itself is unknown: nothing can be built this run
                _record(name, None, info, by_name[name], rows, digest, report)
                report.left_for_rerun = len(need) - 1
                return names
            confidences[name] = conf
    order = build_order(config, names, {t.name: len(t.uris) for t in tasks}, confidences)
    peel: Dict[str, ConceptReference] = {}
    pending: List[ConceptTask] = []
    for n in order:
        key = f"target:{n}"
        if key not in rows:
            pending.append(by_name[n])
            continue
        if pending:
            logger.warning(
                "concept %s was committed after %s in the build order (vocabulary or order changed "
                "since the last run?): it is kept as committed",
                n,
                pending[-1].name,
            )
        if rows[key]["status"] == "ok":
            peel[n] = _light(refs[key])
    chain = ConceptBuilder(None, None, config)
    window = 2 * len(workers) if workers else 0
    to_encode = iter([t for t in pending if t.name not in context])
    inflight: deque = deque()
    turn = count()

    def top_up() -> None:
        while len(inflight) < window:
            t = next(to_encode, None)
            if t is None:
                return
            w = workers[next(turn) % len(workers)]
            inflight.append((t.name, w.prepare.remote(t.name, list(t.uris), t.text)))

    bar = tqdm(pending, desc="concepts (peeling chain)", unit="concept")
    for i, t in enumerate(bar):
        if t.name in context:  # also a context concept: reuses that whole reference (members too)
            ref: Optional[ConceptReference] = reused_reference(t.name, refs[f"context:{t.name}"])
            info: Dict[str, Any] = {"name": t.name, "archive": [], "read": {}, "seconds": 0.0}
        else:
            top_up()
            name, future = inflight.popleft()
            assert name == t.name, (name, t.name)
            feats, lang, info = ray.get(future)
            ref = None
            if feats is not None and not info["read"].get("failed"):
                t0 = time.perf_counter()
                try:
                    ref = chain.build_from_features(t.name, feats, context, lang, peel)
                except ReCoError as exc:
                    info["error"] = str(exc)
                info["seconds"] = float(info.get("seconds", 0.0)) + time.perf_counter() - t0
        row = _record(t.name, ref, info, t, rows, digest, report)
        if row is None:  # transient: everything after it in the order waits for the rerun
            report.left_for_rerun = len(pending) - i - 1
            for _, future in inflight:
                ray.cancel(future)
            break
        if confidences is not None:
            row["order_key"] = confidences.get(t.name, math.nan)
        parts.add(row, ref)
        if ref is not None:
            peel[t.name] = _light(ref)
    bar.close()
    return order


def _assemble(
    tasks,
    rows,
    refs,
    enc_meta: Mapping[str, Any],
    config: BankConfig,
    archive_mode: str,
    digest: str,
    order: Sequence[str],
) -> ConceptBank:
    ok = [t for t in tasks if rows[f"target:{t.name}"]["status"] == "ok"]
    if not ok:
        raise EmptyArchiveError(
            "no concept could be built: "
            + "; ".join(f"{t.name}: {rows[f'target:{t.name}']['error']}" for t in tasks[:5])
        )
    texts = [t.text for t in ok]
    text = torch.stack(texts).float() if all(x is not None for x in texts) else None
    meta: Dict[str, Any] = dict(enc_meta)
    meta.update(
        {
            "archive_mode": archive_mode,
            "language_guidance": any(rows[f"target:{t.name}"]["language_guidance"] for t in ok),
            "context_elimination": list(config.context_concepts) if config.context_elimination else [],
            "config": to_dict(config),
            "config_hash": digest,
            "concepts": {t.name: {"archive": rows[f"target:{t.name}"]["archive"]} for t in ok},
        }
    )
    if config.context_from_vocabulary:
        meta["build_order"] = list(order)
    return ConceptBank.from_references([refs[f"target:{t.name}"] for t in ok], text, meta)


def _write_outputs(out: ResumableOutput, bank: ConceptBank, tasks, rows) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from index.storage import save_bank

    out.lock.verify()  # type: ignore[union-attr]
    save_bank(bank, out.uri, out.storage_options)
    table_rows = [rows[f"target:{t.name}"] for t in tasks] + [r for k, r in rows.items() if k.startswith("context:")]
    cols = [
        "name",
        "kind",
        "status",
        "error",
        "source",
        "archive",
        "requested",
        "seed_index",
        "seed_scores",
        "language_guidance",
        "context_eliminated",
        "reused_context_reference",
        "seconds",
        "config_hash",
    ]
    table = pa.table({c: [r[c] for r in table_rows] for c in cols})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.write_file("concepts.parquet", buf.getvalue())
