"""Driver-side checks of a job's output location and the trained-model reader (Ray-free)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from reco.errors import ConfigError

from .storage import exists, is_file, is_url, join, read_bytes


def check_output_folder(uri: str, storage_options: Optional[Mapping[str, Any]] = None, what: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or lies below one."""
    if is_url(uri):
        try:
            if is_file(uri, storage_options):
                raise ConfigError(f"{what} {uri} is a file, not a folder")
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable endpoint, no such bucket, bad credentials
            raise ConfigError(f"{what} {uri}: cannot reach it: {type(exc).__name__}: {exc}") from exc
        return
    root = Path(uri).expanduser()
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what} {uri}: {p} is a file, not a folder")
            return


def load_segmodel(uri: str, storage_options: Optional[Mapping[str, Any]] = None, device: str = "cpu"):
    """A trained ReCo+ model from a storage URI: the export folder (``RUN/model``), the run folder
    (``RUN``), or the ``model.safetensors`` file itself. ``SegModel.predict(pil_image)`` returns
    ``(labels (H, W) int64, class_names)``. ``FileNotFoundError`` when nothing is there."""
    from reco.segmodel import META_FILE, WEIGHTS_FILE, SegModel

    uri = str(uri).rstrip("/")
    if uri.endswith(".safetensors"):
        folder, weights_uri = uri.rsplit("/", 1)[0] if "/" in uri else ".", uri
    else:
        folder = uri
        if not exists(join(folder, WEIGHTS_FILE), storage_options) and exists(
            join(uri, "model", WEIGHTS_FILE), storage_options
        ):
            folder = join(uri, "model")
        weights_uri = join(folder, WEIGHTS_FILE)
    try:
        weights = read_bytes(weights_uri, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} holds no trained model ({WEIGHTS_FILE}); train one with `reco train`") from None
    meta_uri = join(folder, META_FILE)
    meta = read_bytes(meta_uri, storage_options) if exists(meta_uri, storage_options) else None
    return SegModel.from_bytes(weights, meta, uri, device)
