"""Ray runtime initialisation from :class:`ClusterConfig` (the only place that calls ray.init)."""
from __future__ import annotations

import logging
import os

from .config import RayRuntimeConfig

logger = logging.getLogger(__name__)


def init_ray(cfg: RayRuntimeConfig = RayRuntimeConfig()):
    """Start (or join) Ray once per process; later calls are no-ops."""
    import ray

    if ray.is_initialized():
        return ray
    env = dict(cfg.env_vars)
    env.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    if cfg.address is None and cfg.disable_auth_for_local:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        env.setdefault("RAY_AUTH_MODE", "disabled")
    for k, v in env.items():
        os.environ.setdefault(k, v)
    kwargs = dict(
        include_dashboard=cfg.include_dashboard,
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    if cfg.address is None:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = int(cfg.object_store_memory_mb) * 2**20
    else:
        kwargs["address"] = cfg.address
    logger.info("starting Ray (%s)", "local" if cfg.address is None else cfg.address)
    ray.init(**kwargs)
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = True
    except Exception:  # pragma: no cover - older Ray
        pass
    return ray
