"""Ray runtime initialisation from :class:`RayRuntimeConfig` (the only place that calls ray.init).

Where a job's Ray comes from:

* ``ray.address`` set (``auto``, ``HOST:6379``): join that cluster. Its token comes from the
  environment as Ray reads it (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN_PATH`` /
  ``RAY_AUTH_TOKEN`` / ``~/.ray/auth_token``).
* no address but ``RAY_ADDRESS`` names a cluster (the Jobs API sets it for a submitted job's
  driver): join it.
* otherwise: start an embedded single-machine Ray with secure defaults -- every Ray process
  (GCS, raylet, workers, agents, dashboard) listens on 127.0.0.1 only, and token auth is on with
  a fresh random token that lives only in this process's environment (never on disk, never in
  a log or report). ``RAY_AUTH_MODE`` set explicitly in the environment wins over the config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from typing import Dict, Iterator, Optional

from reco.errors import ConfigError

from .config import RayRuntimeConfig

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Ray's switch for "this machine is not part of a multi-node cluster": with it off, Ray keeps a
#: loopback node IP instead of resolving 127.0.0.1 to the machine's network address (the default on
#: macOS/Windows; on Linux it must be asked for).
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def cluster_address(cfg: RayRuntimeConfig) -> Optional[str]:
    """The cluster a job joins, or None for an embedded local Ray.

    ``cfg.address`` wins; ``"local"`` forces a local Ray. Without it, ``RAY_ADDRESS`` is used when it
    names a Ray cluster (``auto``, ``HOST:PORT``, ``ray://``) -- an ``http(s)://`` job-API address
    (the one ``reco submit`` talks to) never makes a job join anything."""
    if cfg.address:
        return None if cfg.address == "local" else cfg.address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and not env.lower().startswith(("http://", "https://")) and env != "local":
        return env
    return None


def local_auth_mode(cfg: RayRuntimeConfig) -> str:
    """The auth mode of the embedded Ray: an explicit ``RAY_AUTH_MODE`` wins, else ``cfg.auth_mode``."""
    env = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if env:
        if env not in ("token", "disabled"):
            raise ConfigError(f"RAY_AUTH_MODE={env!r} in the environment: expected token or disabled")
        return env
    return cfg.auth_mode


def _check_token_path() -> None:
    """Ray aborts the whole process on an unreadable RAY_AUTH_TOKEN_PATH: say it first, clearly."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN"):
        p = os.path.expanduser(path)
        try:
            with open(p) as f:
                ok = bool(f.read().strip())
        except OSError as exc:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not ok:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")


def _refresh_ray_auth_state() -> None:
    """Make this process's Ray core re-read RAY_AUTH_MODE / the token (both are cached)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception as exc:  # pragma: no cover - internal API moved
        logger.debug("could not refresh Ray's auth state: %s", exc)


def prepare_local_auth(cfg: RayRuntimeConfig) -> str:
    """Set the process environment for the embedded Ray's auth mode; returns the mode.

    Token mode with no token configured generates one (256 bits, :func:`secrets.token_hex`) into
    ``RAY_AUTH_TOKEN`` of this process: Ray's processes inherit it, nothing is written to disk, and
    it dies with the process. A token already given (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``)
    is used as it is. The token is never logged."""
    mode = local_auth_mode(cfg)
    os.environ["RAY_AUTH_MODE"] = mode
    if mode == "token":
        _check_token_path()
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    else:
        logger.warning(
            "token auth is disabled for the embedded Ray (RAY_AUTH_MODE=disabled)%s",
            "; it listens on 127.0.0.1 only" if cfg.loopback_only else "",
        )
    _refresh_ray_auth_state()
    return mode


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While Ray starts, keep its node IP on loopback (Ray otherwise swaps 127.0.0.1 for the
    machine's network address and its gRPC servers listen on all interfaces). The environment
    switch reaches the Ray processes started inside the block; both are restored afterwards, so
    a later connection to a real cluster from this process is unaffected."""
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover
        ray_constants = None
    had = os.environ.get(_RAY_CLUSTER_SWITCH)
    old = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if ray_constants is None or old is None:  # pragma: no cover - Ray changed
        logger.warning(
            "cannot pin the embedded Ray to 127.0.0.1 with this Ray version: it may listen on all interfaces"
        )
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    if old is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if had is None:
            os.environ.pop(_RAY_CLUSTER_SWITCH, None)
        else:
            os.environ[_RAY_CLUSTER_SWITCH] = had
        if old is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old


def _job_env_keys() -> set:
    """Env var names the submitting job's runtime env already sets (Ray refuses duplicates)."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return set()
    try:
        return set(((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}).keys())
    except (ValueError, AttributeError):
        return set()


def init_ray(cfg: RayRuntimeConfig = RayRuntimeConfig()):
    """Start (or join) Ray once per process; later calls are no-ops."""
    import ray

    if ray.is_initialized():
        return ray
    env: Dict[str, str] = dict(cfg.env_vars)
    env.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    for k, v in env.items():
        os.environ.setdefault(k, v)
    address = cluster_address(cfg)
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if address is None:
        mode = prepare_local_auth(cfg)
        kwargs = dict(
            common,
            address="local",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            include_dashboard=cfg.include_dashboard,
            dashboard_host=cfg.dashboard_host,
            runtime_env={"env_vars": env},
        )
        if cfg.dashboard_port is not None:
            kwargs["dashboard_port"] = cfg.dashboard_port
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = int(cfg.object_store_memory_mb) * 2**20
        if cfg.temp_dir:
            kwargs["_temp_dir"] = os.path.abspath(os.path.expanduser(cfg.temp_dir))
        logger.info(
            "starting a local Ray (%s, token auth %s)",
            "127.0.0.1 only" if cfg.loopback_only else "all interfaces",
            "on" if mode == "token" else "off",
        )
        if cfg.loopback_only:
            kwargs["_node_ip_address"] = LOOPBACK
            with loopback_node():
                ray.init(**kwargs)
        else:
            ray.init(**kwargs)
    else:
        taken = _job_env_keys()
        env = {k: v for k, v in env.items() if k not in taken}
        logger.info("joining the Ray cluster at %s", address)
        from ray.exceptions import AuthenticationError

        try:
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, **common)
        except AuthenticationError as exc:
            raise ConfigError(
                f"the Ray cluster at {address} refused this process's token: set RAY_AUTH_MODE=token and "
                "RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) to the cluster's token "
                f"({str(getattr(exc, 'message', exc)).splitlines()[0]})"
            ) from None
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = True
    except Exception:  # pragma: no cover - older Ray
        pass
    return ray
