"""Frozen configuration of the Ray side, read from ``ray_config.yaml`` at the edge."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from reco.config import from_dict
from reco.errors import ConfigError


@dataclass(frozen=True)
class RayRuntimeConfig:
    address: Optional[str] = None  # None: start a local Ray; "auto" or "ray://host:port": join
    num_cpus: Optional[int] = None  # local Ray only; None = all cores
    num_gpus: Optional[int] = None
    object_store_memory_mb: Optional[int] = 512
    include_dashboard: bool = False
    # Token auth is on by default since Ray 2.5x; a local loopback-only cluster disables it.
    disable_auth_for_local: bool = True
    env_vars: Dict[str, str] = field(default_factory=dict)


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
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise ConfigError("an actor needs cpus_per_actor > 0 or gpus_per_actor > 0")

    @property
    def torch_threads(self) -> int:
        return max(1, int(round(self.cpus_per_actor)))


@dataclass(frozen=True)
class ClusterConfig:
    ray: RayRuntimeConfig = RayRuntimeConfig()
    bank: ActorConfig = ActorConfig()
    segment: ActorConfig = ActorConfig()
    embed: ActorConfig = ActorConfig()


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


def load_cluster_config(source: Union[str, Path, Mapping[str, Any], None]) -> ClusterConfig:
    """Parse ``ray_config.yaml`` (path) or an already-loaded mapping; unknown keys are errors."""
    if source is None:
        return ClusterConfig()
    data = dict(source) if isinstance(source, Mapping) else load_yaml_mapping(source, "Ray config")
    ray_section = dict(data.get("ray") or {})
    env = ray_section.pop("env_vars", None) or {}
    if not isinstance(env, Mapping):
        raise ConfigError("ray.env_vars must be a mapping")
    cfg = from_dict(ClusterConfig, {k: v for k, v in data.items() if k != "ray"}, "")
    rt = from_dict(RayRuntimeConfig, ray_section, "ray")
    rt = RayRuntimeConfig(**{**rt.__dict__, "env_vars": {str(k): str(v) for k, v in env.items()}})
    return ClusterConfig(ray=rt, bank=cfg.bank, segment=cfg.segment, embed=cfg.embed)


#: the repository's Ray settings, used when no ``--ray-config`` is given
DEFAULT_RAY_CONFIG = Path(__file__).resolve().parents[1] / "ray_config.yaml"


def cluster_config_path(arg: Union[str, Path, None] = None) -> Optional[Path]:
    """The Ray settings file a job uses: ``arg`` when given (it must exist: a path the user typed
    is never silently replaced by defaults), else the repository's ``ray_config.yaml`` when
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
