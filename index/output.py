"""One resumable job output: settings + config hash, writer lock, committed parts, job report.

Every job that writes a folder of results (``build-bank``, ``pseudo-label``, ``train``,
``evaluate``, a distributed index build; ``embed`` keeps its store format, :mod:`index.store`,
and uses the same lock and report) follows one protocol, on a local folder or any fsspec URL::

    out = ResumableOutput("s3://bucket/bank", job="build-bank", settings_file="build.json",
                          parts_dir="parts", part_suffix=".safetensors", storage_options=opts)
    with out.open(covered, overwrite=args.overwrite):   # lock, check/record settings, overwrite
        for uri, data in out.parts.read_new():           # every committed part, each read once
            ...                                           # fold it into the job's state
        out.commit(blob)                                  # an atomic part (the lock is checked first)
        out.write_file("concepts.parquet", table_bytes)   # final outputs, under the lock
        out.write_report(report)                          # job_report.json + .txt beside them

Layout under ``OUT``::

    OUT/<settings_file>       {"config_hash": ..., **covered, **extra}: what the outputs depend on
    OUT/<parts_dir>/part-00004-9f1c2a7b<suffix>   committed parts (each one atomic write)
    OUT/writer.lock           held by the one writing job (:mod:`index.lock`)
    OUT/job_report.json/.txt  the uniform report (:mod:`index.report`)

**Rules.** :meth:`ResumableOutput.open` takes ``OUT/writer.lock`` (local ``O_EXCL``; S3
conditional requests: a second writer gets :class:`~index.lock.StoreLockedError` naming the
owner), then reads the settings file. The ``config_hash`` of ``covered``
(:func:`config_hash`, the one digest of a configuration) must equal the recorded one: another
configuration is refused (:class:`~reco.errors.ConfigError`) unless ``overwrite``, which forgets
every committed part *under the lock* (a second writer cannot interleave) and records the new
settings. Parts are written under fresh names, each in one atomic write, so a part exists whole
or not at all; a crash loses at most the parts not yet written and a rerun with the same
configuration resumes from the committed ones. :meth:`Parts.read_new` yields each committed part
exactly once per :class:`Parts` object (a job folds parts in as they appear, never reads one
twice). Writers that are not the lock holder (e.g. Ray tasks of a distributed index build) get
``out.parts`` (picklable) and write named parts with :meth:`Parts.create`: an exclusive create
(``If-None-Match: *`` on S3, a hard link locally), so a part is written exactly once even when a
task is retried; the lock holder lists them with :meth:`Parts.read_new`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from reco.config import config_hash
from reco.errors import ConfigError

from . import storage
from .lock import StoreLock, StoreLockedError, make_lock
from .outputs import check_output_folder
from .report import EXIT_FAILED, EXIT_OK, EXIT_RERUN, JobReport

__all__ = [
    "ResumableOutput",
    "Parts",
    "config_hash",
    "JobReport",
    "StoreLockedError",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_RERUN",
    "REPORT_NAME",
]

logger = logging.getLogger(__name__)

#: stem of the uniform report beside every output (``job_report.json`` / ``job_report.txt``)
REPORT_NAME = "job_report"


class Parts:
    """The committed parts of one output: ``URI/<dir>/part-<key><suffix>`` files. Picklable (a
    URI and options: no lock, no thread), so workers can write parts too."""

    def __init__(self, uri: str, suffix: str, storage_options: Optional[Mapping[str, Any]] = None):
        self.uri = str(uri)
        self.suffix = suffix
        self.storage_options = dict(storage_options or {})
        self._read: Set[str] = set()

    def __getstate__(self) -> Dict[str, Any]:
        return {"uri": self.uri, "suffix": self.suffix, "storage_options": self.storage_options}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(state["uri"], state["suffix"], state["storage_options"])  # type: ignore[misc]

    def list(self) -> List[str]:
        """URIs of every committed part, sorted (part numbers are zero-padded)."""
        return storage.list_files(self.uri, self.storage_options, suffix=self.suffix, refresh=True)

    def next_seq(self) -> int:
        """One more than the highest part number committed (0 when none)."""
        seqs = []
        for p in self.list():
            head = p.rsplit("/", 1)[-1][len("part-") :].split("-", 1)[0]
            if head.isdigit():
                seqs.append(int(head))
        return max(seqs, default=-1) + 1

    def read_new(self) -> Iterator[Tuple[str, bytes]]:
        """``(uri, bytes)`` of every committed part not yet returned by this object, in order:
        each part is read back exactly once."""
        for uri in self.list():
            if uri in self._read:
                continue
            data = storage.read_bytes(uri, self.storage_options)
            self._read.add(uri)
            yield uri, data

    def write(self, seq: int, data: bytes) -> str:
        """Commit ``data`` as part ``seq`` under a fresh name (``part-SEQ-TOKEN``), atomically."""
        uri = storage.join(self.uri, f"part-{seq:05d}-{secrets.token_hex(4)}{self.suffix}")
        storage.write_bytes(uri, data, self.storage_options)
        return uri

    def create(self, key: str, data: bytes) -> bool:
        """Commit ``data`` as the part named ``key`` exactly once: True when written, False when
        that part already exists (a retried task; the existing part is kept)."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad part key {key!r}")
        return storage.write_new(storage.join(self.uri, f"part-{key}{self.suffix}"), data, self.storage_options)

    def forget(self) -> int:
        """Remove every committed part (``--overwrite``, under the lock); returns how many."""
        self._read.clear()
        return storage.remove_files(self.list(), self.storage_options)


class ResumableOutput:
    """A job's output folder under the one protocol of this module (see its docstring)."""

    def __init__(
        self,
        uri: str,
        job: str,
        settings_file: str,
        parts_dir: str = "parts",
        part_suffix: str = ".parquet",
        storage_options: Optional[Mapping[str, Any]] = None,
        heartbeat_s: float = 10.0,
        stale_after_s: float = 120.0,
    ):
        self.uri = storage.absolute(str(uri).rstrip("/") or str(uri))
        self.job = job
        self.settings_file = settings_file
        self.storage_options = dict(storage_options or {})
        self.parts = Parts(storage.join(self.uri, parts_dir), part_suffix, self.storage_options)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.lock: Optional[StoreLock] = None
        self.settings: Dict[str, Any] = {}
        self.previous: Optional[Dict[str, Any]] = None  # the settings found on open (None: new output)
        self._seq: Optional[int] = None

    def join(self, *names: str) -> str:
        return storage.join(self.uri, *names)

    # -- the protocol -----------------------------------------------------------------------
    @contextlib.contextmanager
    def open(
        self,
        covered: Mapping[str, Any],
        overwrite: bool = False,
        extra: Optional[Mapping[str, Any]] = None,
        describe: str = "",
    ) -> Iterator["ResumableOutput"]:
        """Hold the writer lock and make the output this configuration's for the block.

        ``covered``: what the outputs depend on (hashed with :func:`config_hash`); ``extra``:
        recorded in the settings file too, not hashed. A different recorded hash raises
        :class:`ConfigError` (``describe`` adds to its message) unless ``overwrite``: then the
        committed parts are forgotten, under the lock."""
        self.check_location()
        digest = config_hash(dict(covered))
        lock = make_lock(self.uri, self.job, self.storage_options, self.heartbeat_s, self.stale_after_s).acquire()
        self.lock, self._seq = lock, None
        try:
            try:
                self.previous = self.read_settings()
            except ConfigError:
                if not overwrite:
                    raise
                self.previous = {"config_hash": None}  # unreadable: --overwrite starts afresh
            if self.previous is not None and self.previous.get("config_hash") != digest:
                if not overwrite:
                    raise ConfigError(
                        f"{self.uri} holds {self.job} output of another configuration (config hash "
                        f"{self.previous.get('config_hash')}, now {digest}{'; ' + describe if describe else ''}): "
                        "use another output, or --overwrite to start it afresh"
                    )
                n = self.parts.forget()
                logger.warning(
                    "--overwrite: forgot the %d committed part(s) of %s (another configuration)", n, self.uri
                )
            self.settings = {"config_hash": digest, **dict(covered), **dict(extra or {})}
            self._write_settings()
            yield self
        finally:
            self.lock = None
            lock.release()

    def check_location(self) -> None:
        """Raise :class:`ConfigError` when the output URI names a file (or a folder inside one)."""
        check_output_folder(self.uri, self.storage_options, what=f"{self.job} output")

    def read_settings(self) -> Optional[Dict[str, Any]]:
        """The recorded settings, None for a new output; :class:`ConfigError` when unreadable."""
        uri = self.join(self.settings_file)
        try:
            data = storage.read_bytes(uri, self.storage_options)
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{uri} is corrupt ({exc}): remove it, or use --overwrite / another output") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{uri} is corrupt (not a JSON object): remove it, or use another output")
        return value

    def update_settings(self, **extra: Any) -> None:
        """Record more (unhashed) facts in the settings file, e.g. encoder digests learnt later."""
        self.settings.update(extra)
        self._write_settings()

    def _write_settings(self) -> None:
        self.write_file(self.settings_file, json.dumps(self.settings, indent=2, default=str).encode())

    # -- writing under the lock ----------------------------------------------------------------
    def _held(self) -> StoreLock:
        if self.lock is None:
            raise StoreLockedError(f"{self.uri}: written outside ResumableOutput.open (no writer lock held)")
        self.lock.verify()
        return self.lock

    def commit(self, data: bytes) -> str:
        """Commit one part (atomic, fresh name, next number) after checking the lock is still ours."""
        self._held()
        if self._seq is None:
            self._seq = self.parts.next_seq()
        uri = self.parts.write(self._seq, data)
        self._seq += 1
        return uri

    def write_file(self, name: str, data: bytes) -> str:
        """Write (replace) ``OUT/name`` atomically, under the lock."""
        self._held()
        uri = self.join(name)
        storage.write_bytes(uri, data, self.storage_options)
        return uri

    def write_report(self, report: JobReport) -> str:
        """Write the uniform report beside the outputs (``job_report.json`` / ``.txt``) and log
        its summary (and, for a failed run, the one line with the count and first reasons)."""
        self._held()
        uri = report.write(self.uri, self.storage_options, name=REPORT_NAME)
        logger.info("%s\n(report: %s)", report.summary(), uri)
        if report.status == "failed":
            logger.error("%s", report.failure_line())
        return uri
