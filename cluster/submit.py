"""Submit ``reco`` jobs to a Ray cluster through Ray's Jobs API (``JobSubmissionClient``).

The address is the cluster's job API (the dashboard's HTTP address, ``http://HEAD:8265``), taken
from ``--address`` or else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``. The token is read the way
Ray reads it -- ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token`` (skipped when ``RAY_AUTH_MODE=disabled``) -- and sent as ``Authorization:
Bearer``. The token itself is never printed or logged, only where it came from.

A job runs as ``python -m jobs.cli JOB ARGS`` with this checkout as its ``working_dir`` (venvs,
outputs, runs, data, caches and VCS files excluded), so the cluster runs the code that was
submitted; its Python packages come from the cluster's image / setup commands.

Every failure a user can cause is a :class:`SubmitError` with one clear line: an unreachable
address, a missing or rejected token, an unknown job id, a job that failed (with its last log
lines, see :func:`failure_text`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, TextIO
from urllib.parse import urlsplit

from reco.errors import ReCoError

from .config import is_sensitive_key

logger = logging.getLogger(__name__)

DEFAULT_JOB_API_PORT = 8265
#: what never travels with a job (gitignore syntax, relative to the working dir)
WORKING_DIR_EXCLUDES = [
    ".venv/",
    "venv/",
    ".env/",
    "env/",
    ".git/",
    ".hg/",
    "/outputs/",
    "/runs/",
    "/data/",
    "/shared/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    ".cache/",
    "*.egg-info/",
    "build/",
    "dist/",
    "*.safetensors",
    "*.pt",
    "*.pth",
    "*.onnx",
    "*.ckpt",
    "*.npy",
    "*.parquet",
    "*.tmp",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: The head's answer while its job agent is not up (cluster starting, or loaded): transient.
NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 60.0
#: lines of a failed job's log shown with its error
TAIL_LINES = 20


class SubmitError(ReCoError):
    """A job could not be submitted, inspected or stopped (one line says why)."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, safe to print

    def __repr__(self) -> str:  # never show the value
        return f"Token(source={self.source!r})"


def load_token(environ: Optional[Mapping[str, str]] = None) -> Optional[Token]:
    """The job-API token, looked up as Ray does (env value, env path, ``~/.ray/auth_token``). A
    token named explicitly (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) is always used; the default
    file is not when ``RAY_AUTH_MODE=disabled``."""
    env = os.environ if environ is None else environ
    value = env.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return Token(value, "RAY_AUTH_TOKEN")
    path = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        p = Path(path).expanduser()
        try:
            value = p.read_text().strip()
        except OSError as exc:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not value:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path}")
    if env.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None  # the default file is only used when auth is not switched off
    home = env.get("HOME") or str(Path.home())
    default = Path(home) / ".ray" / "auth_token"
    try:
        value = default.read_text().strip() if default.is_file() else ""
    except OSError:
        value = ""
    return Token(value, str(default)) if value else None


def job_api_address(address: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """Normalise the job-API address: ``http(s)://host:port``; a bare ``host[:port]`` means http
    (port 8265 when absent)."""
    env = os.environ if environ is None else environ
    a = (address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or "").strip()
    if not a:
        raise SubmitError(
            "no cluster address: give --address http://HEAD:8265 (the Ray dashboard / job API) or "
            "set RAY_ADDRESS; without a cluster, run the job directly (`reco JOB ...`) on an "
            "embedded local Ray"
        )
    if a in ("auto", "local") or a.startswith("ray://"):
        raise SubmitError(
            f"address {a!r} is not a job API address: give the dashboard URL, e.g. "
            "http://127.0.0.1:8265 (through `ray dashboard ray_config.yaml` or `kubectl port-forward`)"
        )
    if "://" not in a:
        a = "http://" + a
    parts = urlsplit(a)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"address {a!r}: expected http://HOST:PORT or https://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise SubmitError(f"address {a!r}: bad port") from None
    return (
        f"{parts.scheme}://{parts.netloc if port else parts.netloc + f':{DEFAULT_JOB_API_PORT}'}"
        + parts.path.rstrip("/")
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def _no_address_env() -> Iterator[None]:
    """Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given; the
    address this module resolved must win, so both are hidden while the client is built."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def parse_env(pairs: List[str]) -> Dict[str, str]:
    """``KEY=VALUE`` pairs for the job's runtime env. Credentials are refused: a runtime env is
    stored in the job's record (dashboard, ``reco list``), so secrets must reach the cluster
    through its own environment (instance profile, Kubernetes secret), never through a job."""
    env: Dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SubmitError(f"--env {pair!r}: expected KEY=VALUE")
        if is_sensitive_key(key) or key.upper().startswith("AWS_") and "KEY" in key.upper():
            raise SubmitError(
                f"--env {key}: credentials are not sent with a job (its runtime env is stored in the "
                "job record); give the cluster's nodes their own credentials (instance profile, "
                "Kubernetes secret)"
            )
        env[key] = value
    return env


def default_working_dir() -> Path:
    """This checkout (the folder holding ``pyproject.toml`` and ``jobs/``)."""
    root = Path(__file__).resolve().parents[1]
    if not ((root / "pyproject.toml").is_file() and (root / "jobs" / "cli.py").is_file()):
        raise SubmitError(f"{root} is not a reco-cluster checkout (no pyproject.toml): give --working-dir")
    return root


def entrypoint(job: str, args: List[str], python: str = "python") -> str:
    return " ".join([shlex.quote(python), "-m", "jobs.cli", shlex.quote(job)] + [shlex.quote(a) for a in args])


def _first_line(text: Any) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def tail(text: str, n: int = TAIL_LINES) -> List[str]:
    return [ln for ln in (text or "").splitlines() if ln.strip()][-n:]


class JobClient:
    """A :class:`ray.job_submission.JobSubmissionClient` with clear errors and this project's
    defaults. Construction checks that the job API answers and accepts the token."""

    def __init__(self, address: Optional[str] = None, *, connect_timeout: float = 10.0):
        self.address = job_api_address(address)
        self.token = load_token()
        parts = urlsplit(self.address)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=connect_timeout):
                pass
        except OSError as exc:
            raise SubmitError(
                f"cannot reach the Ray job API at {self.address} ({exc.strerror or exc}): is the cluster up, and is "
                f"this its dashboard address (port {DEFAULT_JOB_API_PORT} by default, not the GCS port 6379)? "
                "For `ray up` clusters run `ray dashboard ray_config.yaml`, for KubeRay `kubectl port-forward "
                "svc/<cluster>-head-svc 8265`, then use http://127.0.0.1:8265"
            ) from None
        if self.token and parts.scheme == "http" and not _is_loopback(host or ""):
            logger.warning(
                "the cluster token travels in clear text over http to %s: prefer an SSH tunnel "
                "(`ray dashboard`), `kubectl port-forward` or https",
                host,
            )
        # Always an explicit header: with none, Ray's client would add whatever token its process-wide
        # cache holds (an empty value sends no credential, and the cluster answers 401 if it needs one).
        headers = {"Authorization": f"Bearer {self.token.value}" if self.token else ""}
        from ray.job_submission import JobSubmissionClient

        with _no_address_env():
            self._client = self._call(JobSubmissionClient, self.address, headers=headers)

    # -- error mapping ----------------------------------------------------------------------------
    def _call(self, fn, *args, job_id: Optional[str] = None, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            import requests

            net_errors: tuple = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
        except ImportError:  # pragma: no cover - ray[default] brings requests
            net_errors = ()
        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            msg = str(getattr(exc, "message", "") or "")
            if msg.startswith("Authentication required") or "401" in msg:
                raise SubmitError(
                    f"the cluster at {self.address} requires a token and none was found: set RAY_AUTH_TOKEN_PATH to "
                    "a file holding the cluster's token (or RAY_AUTH_TOKEN, or write it to ~/.ray/auth_token); get "
                    "it with `ray get-auth-token` on the head node or from the cluster's Kubernetes secret"
                ) from None
            raise SubmitError(
                f"the cluster at {self.address} rejected the token from {self.token.source if self.token else '?'}: "
                "it is not this cluster's token"
            ) from None
        except net_errors as exc:
            raise SubmitError(f"lost the Ray job API at {self.address}: {_first_line(exc)}") from None
        except ConnectionError as exc:
            raise SubmitError(f"cannot reach the Ray job API at {self.address}: {_first_line(exc)}") from None
        except RuntimeError as exc:
            text = str(exc)
            if job_id and ("404" in text or "does not exist" in text):
                raise SubmitError(f"no job {job_id!r} on the cluster at {self.address} (see `reco list`)") from None
            raise SubmitError(f"the Ray job API at {self.address} refused the request: {_first_line(text)}") from None
        except ValueError as exc:  # e.g. a working dir over the upload limit
            raise SubmitError(_first_line(exc)) from None

    # -- operations -------------------------------------------------------------------------------
    def submit(
        self,
        job: str,
        args: List[str],
        *,
        working_dir: Optional[Path] = None,
        entrypoint_num_cpus: Optional[float] = None,
        entrypoint_num_gpus: Optional[float] = None,
        entrypoint_memory: Optional[int] = None,
        env: Optional[Dict[str, str]] = None,
        submission_id: Optional[str] = None,
        python: str = "python",
        excludes: Optional[List[str]] = None,
    ) -> str:
        wd = Path(working_dir) if working_dir else default_working_dir()
        if not wd.is_dir():
            raise SubmitError(f"--working-dir {wd}: not a directory")
        runtime_env: Dict[str, Any] = {"working_dir": str(wd), "excludes": list(excludes or WORKING_DIR_EXCLUDES)}
        if env:
            runtime_env["env_vars"] = dict(env)
        kwargs: Dict[str, Any] = dict(
            entrypoint=entrypoint(job, args, python), runtime_env=runtime_env, metadata={"reco_job": job}
        )
        for k, v in (
            ("entrypoint_num_cpus", entrypoint_num_cpus),
            ("entrypoint_num_gpus", entrypoint_num_gpus),
            ("entrypoint_memory", entrypoint_memory),
            ("submission_id", submission_id),
        ):
            if v is not None:
                kwargs[k] = v
        return self._submit_retrying(kwargs)

    def _submit_retrying(self, kwargs: Dict[str, Any], wait_s: float = AGENT_WAIT_S) -> str:
        """``submit_job``, retried while the head's job agent is not up yet (a cluster that is still
        starting, or one under load, answers 500 "No available agent to submit job, please try again
        later": nothing was submitted, so a retry cannot submit twice); any other refusal at once."""
        deadline, delay = time.monotonic() + wait_s, 1.0
        while True:
            try:
                return self._call(self._client.submit_job, **kwargs)
            except SubmitError as exc:
                if NO_AGENT not in str(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.warning("the Ray job API at %s has no job agent yet: retrying in %.0f s", self.address, delay)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)

    def info(self, job_id: str):
        return self._call(self._client.get_job_info, job_id, job_id=job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self._client.get_job_logs, job_id, job_id=job_id)

    def stop(self, job_id: str) -> bool:
        return bool(self._call(self._client.stop_job, job_id, job_id=job_id))

    def list(self) -> list:
        return self._call(self._client.list_jobs)

    def version(self) -> str:
        return str(self._call(self._client.get_version))

    def follow(self, job_id: str, out: Optional[TextIO] = None) -> None:
        """Stream a job's logs to ``out`` (default stdout) until it ends."""
        out = out or sys.stdout
        self.info(job_id)  # a clear error for an unknown id before the websocket opens

        async def _tail() -> None:
            async for chunk in self._client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        self._call(asyncio.run, _tail(), job_id=job_id)

    def wait(self, job_id: str, timeout: Optional[float] = None, poll: float = 0.5):
        """Poll until the job is terminal (or ``timeout`` seconds pass); returns its info."""
        t0 = time.monotonic()
        while True:
            info = self.info(job_id)
            if _status(info) in TERMINAL or (timeout is not None and time.monotonic() - t0 > timeout):
                return info
            time.sleep(poll)


def _status(info) -> str:
    s = getattr(info, "status", "")
    return str(getattr(s, "value", s))


def exit_code(info) -> int:
    """The exit status a CLI returns for a finished job: 0 succeeded / still running, the job's own
    exit code when it failed with one (3 = rerun to retry transient failures), else 1."""
    status = _status(info)
    if status == "FAILED":
        code = getattr(info, "driver_exit_code", None)
        return int(code) if code not in (None, 0) else 1
    if status == "STOPPED":
        return 1
    return 0


def _when(ts_ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts_ms / 1000)) if ts_ms else "-"


def _took(info) -> str:
    start, end = getattr(info, "start_time", None), getattr(info, "end_time", None)
    if not start:
        return "-"
    secs = ((end or time.time() * 1000) - start) / 1000
    m, s = divmod(int(secs), 60)
    return f"{m}m{s:02d}s" if m else f"{secs:.1f}s"


def job_id_of(info) -> str:
    return getattr(info, "submission_id", None) or getattr(info, "job_id", None) or "?"


def status_line(info) -> str:
    job = (getattr(info, "metadata", None) or {}).get("reco_job") or _first_line(getattr(info, "entrypoint", ""))[:40]
    msg = _first_line(getattr(info, "message", "") or "")
    return (
        f"{job_id_of(info)}  {_status(info):<9}  {job:<14} started {_when(getattr(info, 'start_time', None))}"
        f"  took {_took(info)}" + (f"  {msg}" if msg else "")
    )


def failure_text(info, logs: str, n: int = TAIL_LINES) -> str:
    """A failed job's one-line error and its last ``n`` log lines."""
    code = getattr(info, "driver_exit_code", None)
    head = (
        f"job {job_id_of(info)} FAILED"
        + (f" with exit code {code}" if code not in (None, 0) else "")
        + f": {_first_line(getattr(info, 'message', '') or 'no message')}"
    )
    lines = tail(logs, n)
    if not lines:
        return head + " (the job wrote no log lines)"
    return head + f"\n--- last {len(lines)} log lines ---\n" + "\n".join(lines)


def finish(client: JobClient, info, err: Optional[TextIO] = None) -> int:
    """Print a finished job's status line (and, when it failed, its last log lines to ``err``); its exit code."""
    import sys

    print(status_line(info))
    if _status(info) == "FAILED":
        try:
            logs = client.logs(job_id_of(info))
        except SubmitError:
            logs = ""
        print(failure_text(info, logs), file=err or sys.stderr)
    return exit_code(info)


def cluster_summary(client: JobClient, last: int = 5) -> str:
    """The cluster's Ray version, its jobs counted by status, and the ``last`` most recent ones."""
    jobs = client.list()
    counts: Dict[str, int] = {}
    for j in jobs:
        counts[_status(j)] = counts.get(_status(j), 0) + 1
    head = f"Ray {client.version()} at {client.address}: {len(jobs)} job(s)" + (
        "" if not counts else " (" + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) + ")"
    )
    recent = sorted(jobs, key=lambda j: j.start_time or 0)[-last:]
    return "\n".join([head] + ["  " + status_line(j) for j in recent])
