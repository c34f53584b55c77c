"""The one writer lock of every job output (a local folder or an fsspec URL such as ``s3://``).

Every job that writes an output (the embedding store, a concept bank, pseudo-labels, a training
run, an evaluation, a distributed index build) holds ``OUT/writer.lock`` while it writes::

    from index.lock import writer_lock
    with writer_lock("s3://bucket/out", job="build-bank", storage_options=opts) as lock:
        ...                       # lock.verify() before a commit: raises if the lock was lost

A second writer gets :class:`StoreLockedError` naming the owner (host, pid, job, start time).

**Local folders** (:class:`StoreLock`): the lock file is created atomically
(``os.open(O_CREAT | O_EXCL)``) and holds its owner and a random token. Its heartbeat is the
file's modification time, refreshed every ``heartbeat_s`` by a daemon thread (and by
:meth:`StoreLock.touch`) with ``os.utime``: the file is never rewritten, so a refresh can never
clobber another owner's lock. A lock is stale, and broken with a WARNING, when its heartbeat is
older than ``stale_after_s`` or when its owner ran on this host and its pid is gone (pids are
compared per host name). The owner checks its token before every commit (:meth:`StoreLock.verify`),
so a job whose lock was broken (e.g. frozen for longer than the timeout) fails instead of
writing. Needs a local or POSIX shared file system with atomic exclusive create (NFSv3+).

**Object stores** (:class:`ObjectStoreLock`): on S3 every step is one conditional request
(:func:`index.storage.write_conditional`): create ``If-None-Match: *``, heartbeat and stale-lock
takeover ``If-Match``, release ``DELETE If-Match``; ages by the server's clock. As exclusive as
the local lock. On other fsspec file systems it is best effort (check-then-write), which a
WARNING says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

from reco.errors import ReCoError

from . import storage

logger = logging.getLogger(__name__)

#: the lock's file name inside the output folder
LOCK_FILE = "writer.lock"


class StoreError(ReCoError, RuntimeError):
    """A store or job output is missing, corrupt, locked, or incompatible with the request."""


class StoreLockedError(StoreError):
    """Another job holds the output's writer lock (or this job lost it)."""


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, killed but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:  # pragma: no cover
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):  # no /proc (macOS): trust kill(0)
        return True


def _describe_owner(owner: Optional[Dict[str, Any]], age: Optional[float]) -> str:
    if not owner:
        who = "an unknown writer (lock file empty or unreadable)"
    else:
        who = (
            f"job {owner.get('job', '?')!r} on host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
            f"since {owner.get('since', '?')}"
        )
    if age is not None:
        who += f" (last heartbeat {age:.0f}s ago)"
    return who


class StoreLock:
    """The exclusive writer lock of a local output folder: ``OUT/writer.lock`` (see the module docstring)."""

    def __init__(self, path: Path, job: str, heartbeat_s: float = 10.0, stale_after_s: float = 120.0):
        if heartbeat_s <= 0 or stale_after_s <= heartbeat_s:
            raise ValueError("need 0 < heartbeat_s < stale_after_s")
        self.path: Any = Path(path)  # a str URL in ObjectStoreLock
        self._where: Any = self.path.parent  # the store, as messages name it
        self.job = job
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token = secrets.token_hex(8)
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": job,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "since_epoch": time.time(),
            "token": self.token,
        }
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- reading someone's lock ----------------------------------------------------------
    def _read(self) -> Tuple[Optional[Dict[str, Any]], Optional[float]]:
        """(owner or None when unreadable, heartbeat age in seconds); FileNotFoundError if absent."""
        st = os.stat(self.path)
        age = max(0.0, time.time() - st.st_mtime)
        try:
            owner = json.loads(self.path.read_text())
            if not isinstance(owner, dict):
                owner = None
        except (OSError, ValueError):
            owner = None
        return owner, age

    def _stale_reason(self, owner: Optional[Dict[str, Any]], age: float) -> Optional[str]:
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f}s (timeout {self.stale_after_s:.0f}s)"
        if (
            owner
            and owner.get("host") == self.owner["host"]
            and isinstance(owner.get("pid"), int)
            and owner["pid"] != os.getpid()
            and not _pid_alive(owner["pid"])
        ):
            return f"its process (pid {owner['pid']} on this host) is gone"
        return None

    def _break(self, owner: Optional[Dict[str, Any]], why: str) -> None:
        """Move a stale lock aside; if what was moved is not the lock judged stale (another
        breaker replaced it meanwhile), put it back."""
        aside = self.path.with_name(f"{self.path.name}.broken-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else removed it: just try again
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        moved_token = moved.get("token") if isinstance(moved, dict) else None
        if moved_token != (owner or {}).get("token"):
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # fails if yet another lock was taken: fine, its owner holds it
            with contextlib.suppress(OSError):
                os.unlink(aside)
            return
        logger.warning("breaking the stale writer lock %s held by %s: %s", self.path, _describe_owner(owner, None), why)
        with contextlib.suppress(OSError):
            os.unlink(aside)

    # -- taking and holding --------------------------------------------------------------
    def acquire(self) -> "StoreLock":
        data = json.dumps(self.owner, indent=1).encode()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner, age = self._read()
                except FileNotFoundError:
                    continue  # released meanwhile
                why = self._stale_reason(owner, age or 0.0)
                if why is None:
                    raise self._locked_error(owner, age) from None
                self._break(owner, why)
                continue
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            storage.fsync_dir(self.path.parent)
            self._start_heartbeat()
            return self
        raise StoreLockedError(f"could not take the writer lock {self.path}: it keeps changing hands")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"store-lock-heartbeat:{self.path}", daemon=True)
        self._thread.start()

    def _locked_error(self, owner: Optional[Dict[str, Any]], age: Optional[float]) -> StoreLockedError:
        return StoreLockedError(
            f"{self._where} is locked by another writer: {_describe_owner(owner, age)}. "
            f"Wait for it to finish; a dead writer's lock is broken automatically "
            f"(after {self.stale_after_s:.0f}s without heartbeat, or at once on its host)"
        )

    def _lose(self, owner: Optional[Dict[str, Any]], age: Optional[float]) -> StoreLockedError:
        self.lost = (
            f"lost the writer lock on {self._where}: it is now held by "
            f"{_describe_owner(owner, age) if owner else 'nobody (lock file removed)'}; "
            f"nothing more is committed by this job"
        )
        return StoreLockedError(self.lost)

    def verify(self) -> None:
        """Raise :class:`StoreLockedError` unless this lock still holds the lock file."""
        if self.lost:
            raise StoreLockedError(self.lost)
        try:
            owner, age = self._read()
        except FileNotFoundError:
            owner, age = {}, None
        if not owner or owner.get("token") != self.token:
            raise self._lose(owner, age)

    def touch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.verify()
                self.touch()
            except StoreLockedError as exc:
                logger.error("%s", exc)
                return
            except OSError as exc:  # a flaky shared file system: try again next beat
                logger.warning("writer lock heartbeat on %s failed: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            owner, _ = self._read()
        except FileNotFoundError:
            return
        if owner and owner.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        elif not self.lost:
            logger.warning("writer lock %s is no longer ours at release: left in place", self.path)


class ObjectStoreLock(StoreLock):
    """The writer lock of an output named by an fsspec URL: ``OUT/writer.lock`` is one object.

    On S3 every step is one conditional request, so it is as exclusive as the local lock: the lock
    is taken with ``PUT If-None-Match: *``; its heartbeat rewrites the owner record with
    ``If-Match`` the ETag of its own last write (it can never replace another owner's lock); a
    stale lock is replaced with ``If-Match`` the ETag of the record judged stale (two breakers:
    one wins); it is released with ``DELETE If-Match``. Ages are measured by the server's clock
    (``Date`` minus ``Last-Modified``), so client clocks do not matter. A request whose answer was
    lost and that the client retried fails its own condition: the record is then read back and
    kept when its token is this lock's. An endpoint that ignores ``If-None-Match`` is detected
    when the lock is taken (a second create succeeds) and reported with a WARNING.

    Elsewhere (fsspec file systems without conditional writes) each step is a check-then-write:
    a second writer that starts while the first holds the lock is refused, but two writers
    starting at the same moment are not excluded (a WARNING says so): one writer per store."""

    def __init__(
        self,
        uri: str,
        job: str,
        heartbeat_s: float = 10.0,
        stale_after_s: float = 120.0,
        storage_options: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__(Path(LOCK_FILE), job, heartbeat_s, stale_after_s)
        self.path = str(uri)
        self._where = self.path.rsplit("/", 1)[0]
        self.storage_options = storage_options
        self.atomic = storage.conditional_writes(self.path)
        self.owner["heartbeat_epoch"] = self.owner["since_epoch"]
        self._version: Optional[str] = None  # of this lock's own last write
        self._seen: Optional[str] = None  # of the record last read
        self._io = threading.RLock()

    def _record(self) -> bytes:
        return json.dumps(self.owner, indent=1).encode()

    def _read(self) -> Tuple[Optional[Dict[str, Any]], Optional[float]]:
        data, self._seen, age = storage.read_versioned(self.path, self.storage_options)
        try:
            owner = json.loads(data)
            if not isinstance(owner, dict):
                owner = None
        except ValueError:
            owner = None
        if age is None:  # no server clock: the owner's own heartbeat, else never stale by age
            beat = (owner or {}).get("heartbeat_epoch")
            age = max(0.0, time.time() - float(beat)) if isinstance(beat, (int, float)) else 0.0
        return owner, age

    def acquire(self) -> "ObjectStoreLock":
        if not self.atomic:
            logger.warning(
                "%s: this file system has no conditional writes, so its writer lock is best effort "
                "(two writers starting at the same moment are not excluded): run one writer per store",
                self._where,
            )
        data = self._record()
        so = self.storage_options
        for _ in range(5):
            try:
                self._version = storage.write_conditional(self.path, data, so, if_version=storage.CREATE)
            except storage.ConditionFailedError:
                try:
                    owner, age = self._read()
                except FileNotFoundError:
                    continue  # released meanwhile
                seen = self._seen
                if owner and owner.get("token") == self.token:  # our own create, answered late and retried
                    self._version = seen
                else:
                    why = self._stale_reason(owner, age or 0.0)
                    if why is None:
                        raise self._locked_error(owner, age) from None
                    try:  # replace exactly the record judged stale
                        self._version = storage.write_conditional(self.path, data, so, if_version=seen)
                    except storage.ConditionFailedError:
                        continue  # taken over, refreshed or released meanwhile: look again
                    logger.warning(
                        "breaking the stale writer lock %s held by %s: %s", self.path, _describe_owner(owner, None), why
                    )
            if self.atomic:
                self._check_enforced(data)
            self._start_heartbeat()
            return self
        raise StoreLockedError(f"could not take the writer lock {self.path}: it keeps changing hands")

    def _check_enforced(self, data: bytes) -> None:
        """A second conditional create of the (identical) record must fail; if it succeeds the
        endpoint ignores conditional writes and nothing is exclusive there."""
        try:
            self._version = storage.write_conditional(self.path, data, self.storage_options, if_version=storage.CREATE)
        except storage.ConditionFailedError:
            return
        self.atomic = False
        logger.warning(
            "%s: this S3 endpoint ignores conditional writes (If-None-Match), so the writer lock "
            "cannot exclude a concurrent writer: run one writer per store",
            self._where,
        )

    def verify(self) -> None:
        with self._io:
            super().verify()
            self._version = self._seen

    def touch(self) -> None:
        """The heartbeat: rewrite the owner record, only if it is still this lock's own last write."""
        with self._io:
            if self.lost:
                raise StoreLockedError(self.lost)
            self.owner["heartbeat_epoch"] = time.time()
            try:
                self._version = storage.write_conditional(
                    self.path, self._record(), self.storage_options, if_version=self._version
                )
            except storage.ConditionFailedError:
                self.verify()  # ours after all (a retried write): keep it; else the lock is lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._io:
            try:
                owner, _ = self._read()
            except FileNotFoundError:
                return
            except OSError as exc:
                logger.warning("cannot read the writer lock %s at release (%s): left in place", self.path, exc)
                return
            if owner and owner.get("token") == self.token:
                try:
                    storage.delete_conditional(self.path, self.storage_options, if_version=self._seen)
                except storage.ConditionFailedError:
                    logger.warning("writer lock %s changed at release: left in place", self.path)
                except OSError as exc:
                    logger.warning(
                        "cannot remove the writer lock %s (%s): it goes stale after %.0fs",
                        self.path,
                        exc,
                        self.stale_after_s,
                    )
            elif not self.lost:
                logger.warning("writer lock %s is no longer ours at release: left in place", self.path)


def make_lock(
    uri: str,
    job: str,
    storage_options: Optional[Mapping[str, Any]] = None,
    heartbeat_s: float = 10.0,
    stale_after_s: float = 120.0,
) -> StoreLock:
    """The (not yet acquired) writer lock of the output folder ``uri``: ``URI/writer.lock``, a
    :class:`StoreLock` for a local folder (created), an :class:`ObjectStoreLock` for a URL."""
    if storage.is_url(uri):
        return ObjectStoreLock(storage.join(uri, LOCK_FILE), job, heartbeat_s, stale_after_s, storage_options)
    root = storage.local_path(uri)
    root.mkdir(parents=True, exist_ok=True)
    return StoreLock(root / LOCK_FILE, job, heartbeat_s, stale_after_s)


@contextlib.contextmanager
def writer_lock(
    uri: str,
    job: str,
    storage_options: Optional[Mapping[str, Any]] = None,
    heartbeat_s: float = 10.0,
    stale_after_s: float = 120.0,
) -> Iterator[StoreLock]:
    """Hold the exclusive writer lock of the output folder ``uri`` (local or any fsspec URL) for
    the block; :class:`StoreLockedError` naming the owner when another job holds it."""
    lock = make_lock(uri, job, storage_options, heartbeat_s, stale_after_s).acquire()
    try:
        yield lock
    finally:
        lock.release()
