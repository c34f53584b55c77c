"""Frozen configuration of the Ray side, read from ``configs/cluster.yaml`` at the edge.

Two files, two owners:

* ``configs/cluster.yaml`` (this module): the project's per-stage settings -- how the embedded
  local Ray is started (or which cluster to join), and the actors of each stage (how many, CPUs
  and GPUs each, batch sizes). Parsed strictly: an unknown key is an error.
* ``ray_config.yaml``: a Ray cluster-launcher config for ``ray up`` (head node, autoscaling GPU
  workers, setup commands). Ray validates it with its own schema; this module refuses it with a
  pointer to the right file when it is passed as ``--ray-config`` by mistake.

:func:`redact` (from :mod:`index.redact`) masks credentials in any mapping before it is logged or written beside outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from index.redact import REDACTED, is_sensitive_key, redact, redact_text  # noqa: F401 (re-exported)
from reco.config import from_dict
from reco.errors import ConfigError

from .index_config import IndexClusterConfig

#: authentication modes of the embedded local Ray (the values of Ray's ``RAY_AUTH_MODE``)
AUTH_MODES = ("token", "disabled")


@dataclass(frozen=True)
class RayRuntimeConfig:
    """How a job gets its Ray.

    ``address`` None starts an embedded single-machine Ray (unless ``RAY_ADDRESS`` names a
    cluster, as it does inside a job submitted with ``reco submit``); ``"auto"`` or
    ``"HOST:6379"`` joins a running cluster. The ``num_*``, ``object_store_memory_mb``,
    ``include_dashboard``, ``dashboard_*``, ``auth_mode``, ``loopback_only`` and ``temp_dir`` keys
    only shape the embedded local Ray.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None  # local Ray only; None = all cores
    num_gpus: Optional[int] = None
    object_store_memory_mb: Optional[int] = 512
    include_dashboard: bool = False
    # The dashboard and the Jobs API it serves; loopback unless configured otherwise.
    dashboard_host: str = "127.0.0.1"
    dashboard_port: Optional[int] = None  # None: Ray's default (8265)
    # Token auth for the embedded Ray: "token" (a fresh random token per process, never written to
    # disk) or "disabled". An explicit RAY_AUTH_MODE in the environment overrides it.
    auth_mode: str = "token"
    # Every Ray process of the embedded Ray (GCS, raylet, workers, agents) listens on 127.0.0.1.
    loopback_only: bool = True
    temp_dir: Optional[str] = None  # local Ray only; None = Ray's default (/tmp/ray)
    env_vars: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.auth_mode not in AUTH_MODES:
            raise ConfigError(f"ray.auth_mode must be one of {', '.join(AUTH_MODES)}, got {self.auth_mode!r}")
        if self.dashboard_port is not None and not 0 < self.dashboard_port < 65536:
            raise ConfigError(f"ray.dashboard_port must be in 1..65535, got {self.dashboard_port}")
        if not self.dashboard_host:
            raise ConfigError("ray.dashboard_host must not be empty")
        if self.object_store_memory_mb is not None and self.object_store_memory_mb < 64:
            raise ConfigError(f"ray.object_store_memory_mb must be >= 64, got {self.object_store_memory_mb}")


@dataclass(frozen=True)
class ActorConfig:
    """Resources of one actor and how many of them."""

    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ConfigError("cpus_per_actor and gpus_per_actor must be >= 0")
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise ConfigError("an actor needs cpus_per_actor > 0 or gpus_per_actor > 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def torch_threads(self) -> int:
        return max(1, int(round(self.cpus_per_actor)))


@dataclass(frozen=True)
class JobsConfig:
    """Rules every job applies to its outcome."""

    #: a run whose inputs (concepts for build-bank, images for embed / pseudo-label) failed for good
    #: in a larger fraction than this is reported ``failed`` and exits non-zero (1), with the count
    #: and the first reasons in one log line; 1.0 never fails a run on its count
    max_failed_fraction: float = 0.5

    def __post_init__(self) -> None:
        f = self.max_failed_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 <= float(f) <= 1.0:
            raise ConfigError(f"jobs.max_failed_fraction must be a number in [0, 1], got {f!r}")


@dataclass(frozen=True)
class ClusterConfig:
    ray: RayRuntimeConfig = RayRuntimeConfig()
    bank: ActorConfig = ActorConfig()
    segment: ActorConfig = ActorConfig()
    embed: ActorConfig = ActorConfig()
    # Ray Train workers: num_actors = workers, resources per worker, per-worker batch size.
    train: ActorConfig = ActorConfig()
    jobs: JobsConfig = JobsConfig()
    index: IndexClusterConfig = IndexClusterConfig()  # FAISS index built in parts / served by actors (#17)


def load_yaml_mapping(path: Union[str, Path], what: str = "config") -> Dict[str, Any]:
    """Read a YAML file whose top level is a mapping; every failure is a :class:`ConfigError`."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} {p} must be a mapping at top level")
    return dict(data)


#: top-level keys of a Ray cluster-launcher config (never of the project's settings)
_LAUNCHER_KEYS = {
    "cluster_name",
    "provider",
    "available_node_types",
    "head_node_type",
    "setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "max_workers",
}
#: settings that moved or were renamed, with the message that says where to
_MOVED = {
    "disable_auth_for_local": "ray.disable_auth_for_local was replaced by ray.auth_mode (token | disabled); "
    "the embedded Ray now runs with token auth on 127.0.0.1",
}


def load_cluster_config(source: Union[str, Path, Mapping[str, Any], None]) -> ClusterConfig:
    """Parse ``configs/cluster.yaml`` (path) or an already-loaded mapping; unknown keys are errors."""
    if source is None:
        return ClusterConfig()
    data = dict(source) if isinstance(source, Mapping) else load_yaml_mapping(source, "cluster config")
    launcher = sorted(_LAUNCHER_KEYS & set(data))
    if launcher:
        name = source if not isinstance(source, Mapping) else "this mapping"
        raise ConfigError(
            f"{name} is a Ray cluster-launcher config (keys {', '.join(launcher)}) for `ray up`, not the "
            "project's per-stage settings: pass configs/cluster.yaml (or a copy of it) as --ray-config"
        )
    ray_section = data.get("ray") or {}
    if not isinstance(ray_section, Mapping):
        raise ConfigError("ray: expected a mapping")
    ray_section = dict(ray_section)
    for old, msg in _MOVED.items():
        if old in ray_section:
            raise ConfigError(msg)
    env = ray_section.pop("env_vars", None) or {}
    if not isinstance(env, Mapping):
        raise ConfigError("ray.env_vars must be a mapping")
    cfg = from_dict(ClusterConfig, {k: v for k, v in data.items() if k != "ray"}, "")
    rt = from_dict(RayRuntimeConfig, ray_section, "ray")
    rt = RayRuntimeConfig(**{**rt.__dict__, "env_vars": {str(k): str(v) for k, v in env.items()}})
    return ClusterConfig(
        ray=rt, bank=cfg.bank, segment=cfg.segment, embed=cfg.embed, train=cfg.train, jobs=cfg.jobs, index=cfg.index
    )


#: the repository's per-stage Ray settings, used when no ``--ray-config`` is given
DEFAULT_RAY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cluster.yaml"


def cluster_config_path(arg: Union[str, Path, None] = None) -> Optional[Path]:
    """The settings file a job uses: ``arg`` when given (it must exist: a path the user typed is
    never silently replaced by defaults), else the repository's ``configs/cluster.yaml`` when
    present, else None (built-in defaults). Raises :class:`ConfigError`."""
    if arg is None or str(arg) == "":
        return DEFAULT_RAY_CONFIG if DEFAULT_RAY_CONFIG.is_file() else None
    p = Path(arg).expanduser()
    if not p.exists():
        raise ConfigError(f"--ray-config {arg}: no such file")
    if not p.is_file():
        raise ConfigError(f"--ray-config {arg}: not a file")
    return p


def resolve_cluster_config(arg: Union[str, Path, None] = None) -> ClusterConfig:
    """The one rule for a job's ``--ray-config`` (default None): see :func:`cluster_config_path`."""
    return load_cluster_config(cluster_config_path(arg))
