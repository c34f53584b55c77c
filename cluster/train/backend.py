"""The torch process group of the Ray Train workers, on loopback when the Ray cluster is.

Ray Train's ``TorchConfig`` meets its workers at ``MASTER_ADDR:MASTER_PORT`` through a
``TCPStore`` that rank 0 serves; torch binds that server to every interface (``*:PORT``),
whatever the address, and offers no way to choose. When every node of the Ray cluster is on
127.0.0.1 (the embedded Ray with ``ray.loopback_only``: one machine), the workers meet through a
``FileStore`` in the machine's temp folder instead (no listener at all), and gloo / NCCL put
their own sockets on the loopback interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``).
On any other cluster Ray Train's own set-up is used as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import uuid
from typing import Optional

logger = logging.getLogger(__name__)

LOOPBACK_IPS = ("127.0.0.1", "::1")


def cluster_is_loopback() -> bool:
    """True when every live node of the connected Ray cluster has a loopback address."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return bool(nodes) and all(n.get("NodeManagerAddress") in LOOPBACK_IPS for n in nodes)


def loopback_interface() -> Optional[str]:
    """The name of the loopback network interface (``lo`` on Linux, ``lo0`` on macOS), or None."""
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def _pin_sockets(ifname: Optional[str]) -> None:
    """In a worker, before its process group exists: gloo and NCCL sockets on loopback."""
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        os.environ["NCCL_SOCKET_IFNAME"] = ifname


def torch_config(use_gpu: bool, loopback: bool):
    """The ``TorchConfig`` of a run: Ray Train's own, or the loopback one (see the module docstring)."""
    from ray.train.torch import TorchConfig

    backend = "nccl" if use_gpu else "gloo"
    if not loopback:
        return TorchConfig(backend=backend)
    try:
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend
    except ImportError:  # pragma: no cover - Ray moved its internals
        logger.warning(
            "this Ray version cannot keep the torch process group on loopback: its rendezvous "
            "server listens on all interfaces"
        )
        return TorchConfig(backend=backend)

    class LoopbackTorchBackend(_TorchBackend):
        store_path: Optional[str] = None

        def on_start(self, worker_group, backend_config) -> None:
            import ray

            self.store_path = os.path.join(tempfile.gettempdir(), f"reco_pg_{uuid.uuid4().hex}")
            worker_group.execute(_pin_sockets, loopback_interface())
            if not isinstance(worker_group, V1WorkerGroup):
                worker_group.execute(_set_torch_distributed_env_vars)
            ray.get(
                [
                    worker_group.execute_single_async(
                        i,
                        _setup_torch_process_group,
                        backend=backend_config.backend,
                        world_rank=i,
                        world_size=len(worker_group),
                        init_method=f"file://{self.store_path}",
                        timeout_s=backend_config.timeout_s,
                    )
                    for i in range(len(worker_group))
                ]
            )

        def on_shutdown(self, worker_group, backend_config) -> None:
            super().on_shutdown(worker_group, backend_config)
            if self.store_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.store_path)

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackTorchBackend

    return LoopbackTorchConfig(backend=backend)
