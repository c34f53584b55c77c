"""Ray glue: runtime init, actors and Ray Data UDFs around the pure ``reco`` core."""

from .config import ActorConfig, ClusterConfig, RayRuntimeConfig, load_cluster_config
from .models import EncoderSpec
from .runtime import init_ray

__all__ = ["ActorConfig", "ClusterConfig", "EncoderSpec", "RayRuntimeConfig", "init_ray", "load_cluster_config"]
