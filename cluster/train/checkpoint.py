"""Checkpoints: safetensors + JSON (never pickle), a content digest per rank, verification.

A checkpoint folder (``RUN/checkpoint_<step:08d>``)::

    model.safetensors      the unwrapped model's state dict (rank 0)
    optimizer.safetensors  Adam's tensors; optimizer.json: its param groups and scalars (rank 0)
    state.json             step, config hash, scheduler state, loss/lr history, attempts, ... (rank 0)
    rng_rank<r>.json       every rank's torch (and CUDA) RNG state
    digest_rank<r>.json    sha256 of every file rank ``r`` wrote, computed when it was written

:func:`verify_checkpoint` checks a folder before anything is loaded from it: the files rank 0
must write exist, ``state.json`` parses and names a step, every digest of every rank that wrote
the checkpoint matches the bytes, and every floating tensor of the model and optimiser is finite.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import random
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from index.storage import file_sha256 as _sha256
from index.storage import filesystem
from reco.errors import ConfigError

from .config import CKPT_PREFIX
from .errors import CheckpointDamaged, NoIntactCheckpoint

logger = logging.getLogger(__name__)

RANK0_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "state.json")
DIGEST = "digest_rank{}.json"
_CKPT_NAME = re.compile(re.escape(CKPT_PREFIX) + r"(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> Optional[int]:
    """The step of a checkpoint folder name, None for other names."""
    m = _CKPT_NAME.match(name)
    return int(m.group(1)) if m else None


def _optimizer_to_files(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> Dict[str, Any]:
    st = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        st["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))
    py = st.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    if st.get("cuda") and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in st["cuda"]]
        )


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def write_checkpoint(folder: str, rank: int, model: torch.nn.Module, opt, sched, state: Mapping[str, Any]) -> None:
    """Write this rank's part of a checkpoint into a local folder (rank 0: model, optimiser, state),
    then the digest of what it wrote (its commit mark: written last)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    written = []
    if rank == 0:
        meta = {"config_hash": str(state["config_hash"]), "step": str(state["step"])}
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            os.path.join(folder, "model.safetensors"),
            metadata=meta,
        )
        tensors, ometa = _optimizer_to_files(opt)
        save_file(tensors, os.path.join(folder, "optimizer.safetensors"), metadata=meta)
        _write_json(os.path.join(folder, "optimizer.json"), ometa)
        _write_json(os.path.join(folder, "state.json"), {**state, "scheduler": sched.state_dict()})
        written += list(RANK0_FILES)
    _write_json(os.path.join(folder, f"rng_rank{rank}.json"), _rng_state())
    written.append(f"rng_rank{rank}.json")
    _write_json(
        os.path.join(folder, DIGEST.format(rank)),
        {"step": int(state["step"]), "files": {n: _sha256(os.path.join(folder, n)) for n in written}},
    )


def read_checkpoint_state(folder: str) -> Dict[str, Any]:
    """``state.json`` of a checkpoint folder; :class:`CheckpointDamaged` when it is not a JSON object
    with an integer step and a config hash."""
    path = os.path.join(folder, "state.json")
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointDamaged("state.json is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointDamaged(f"state.json is not JSON ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not state.get("config_hash"):
        raise CheckpointDamaged("state.json holds no step and config hash")
    return state


def _load_tensors(folder: str, name: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(os.path.join(folder, name))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointDamaged(f"{name} cannot be read ({type(exc).__name__}: {exc})") from None


def _check_finite(tensors: Mapping[str, torch.Tensor], name: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointDamaged(f"{name}: {len(bad)} tensor(s) hold NaN/Inf (e.g. {bad[0]})")


def verify_checkpoint(folder: str) -> Dict[str, Any]:
    """Check a local checkpoint folder (see the module docstring); returns its state, or raises
    :class:`CheckpointDamaged` with the first problem found."""
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise CheckpointDamaged("the folder is empty")
    missing = [n for n in RANK0_FILES + (DIGEST.format(0),) if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise CheckpointDamaged(f"{', '.join(missing)} missing")
    for r in itertools.count():
        path = os.path.join(folder, DIGEST.format(r))
        if not os.path.isfile(path):
            break
        try:
            with open(path, "rb") as f:
                files = json.loads(f.read())["files"]
            assert isinstance(files, dict)
        except Exception:  # noqa: BLE001 - any damage of the digest itself
            raise CheckpointDamaged(f"{DIGEST.format(r)} is not a digest") from None
        for n, want in files.items():
            p = os.path.join(folder, os.path.basename(str(n)))
            if not os.path.isfile(p):
                raise CheckpointDamaged(f"{n} missing")
            if _sha256(p) != want:
                raise CheckpointDamaged(f"{n} was altered since it was written (sha256 differs from the digest)")
    state = read_checkpoint_state(folder)
    lacking = [
        r
        for r in range(int(state.get("world_size") or 1))
        if not os.path.isfile(os.path.join(folder, DIGEST.format(r)))
    ]
    if lacking:
        raise CheckpointDamaged(f"the digest of rank(s) {lacking} is missing")
    try:
        with open(os.path.join(folder, "optimizer.json"), "rb") as f:
            ometa = json.loads(f.read())
        assert isinstance(ometa.get("param_groups"), list)
    except Exception:  # noqa: BLE001
        raise CheckpointDamaged("optimizer.json holds no optimiser state") from None
    for name in ("model.safetensors", "optimizer.safetensors"):
        _check_finite(_load_tensors(folder, name), name)
    return state


def restore_checkpoint(folder: str, rank: int, model: torch.nn.Module, opt, sched, want_hash: str) -> Dict[str, Any]:
    """Load a (verified) checkpoint folder into model/optimiser/scheduler and this rank's RNG;
    returns its state. A checkpoint of another configuration raises :class:`ConfigError`."""
    state = read_checkpoint_state(folder)
    if state.get("config_hash") != want_hash:
        raise ConfigError(
            f"checkpoint {folder} was written by configuration {state.get('config_hash')}, "
            f"this run is {want_hash}: refusing to resume from it"
        )
    model.load_state_dict(_load_tensors(folder, "model.safetensors"), strict=True)
    with open(os.path.join(folder, "optimizer.json")) as f:
        ometa = json.load(f)
    opt.load_state_dict(_optimizer_from_files(_load_tensors(folder, "optimizer.safetensors"), ometa))
    sched.load_state_dict(state.pop("scheduler"))
    rng = os.path.join(folder, f"rng_rank{rank}.json")
    if os.path.isfile(rng):
        with open(rng) as f:
            _set_rng_state(json.load(f))
    else:  # resumed on more workers than wrote it: a fresh, deterministic stream
        torch.manual_seed(state["step"] * 1009 + rank)
    return state


def checkpoint_segmodel(folder: str, device: str = "cpu"):
    """A :class:`reco.segmodel.SegModel` from a local (verified) checkpoint folder."""
    from reco.segmodel import SegModel, SegModelSpec, build_model

    state = read_checkpoint_state(folder)
    spec = SegModelSpec(**state["spec"])
    model = build_model(spec)
    model.load_state_dict(_load_tensors(folder, "model.safetensors"), strict=True)
    return SegModel(
        model,
        spec,
        state["classes"],
        state["base_size"],
        state["mean"],
        state["std"],
        {"config_hash": state["config_hash"], "step": state["step"]},
        device,
    )


# -- the checkpoints of a run on its storage URI --------------------------------------------------


def list_checkpoints(run_uri: str, storage_options=None) -> List[Tuple[int, str]]:
    """``(step, name)`` of the checkpoint folders of a run, newest first ([] when there is none)."""
    from index.storage import is_url, local_path

    if is_url(run_uri):
        fs, path = filesystem(run_uri, storage_options)
        fs.invalidate_cache(path)
        try:
            names = [
                e["name"].rstrip("/").rsplit("/", 1)[-1]
                for e in fs.ls(path, detail=True)
                if e.get("type") == "directory"
            ]
        except FileNotFoundError:
            names = []
    else:
        root = local_path(run_uri)
        names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    found = [(checkpoint_step(n), n) for n in names]
    return sorted(((s, n) for s, n in found if s is not None), reverse=True)


class fetched_checkpoint:
    """``with fetched_checkpoint(uri, so) as folder``: a local folder holding the checkpoint at
    ``uri`` (the folder itself when local; a temporary copy for object stores)."""

    def __init__(self, uri: str, storage_options=None):
        self.uri, self.storage_options, self._tmp = uri, storage_options, None

    def __enter__(self) -> str:
        import tempfile

        from index.storage import is_url, local_path

        if not is_url(self.uri):
            return str(local_path(self.uri))
        self._tmp = tempfile.TemporaryDirectory(prefix="reco_ckpt_")
        fs, path = filesystem(self.uri, self.storage_options)
        for f in fs.find(path):
            name = f.rstrip("/").rsplit("/", 1)[-1]
            fs.get_file(f, os.path.join(self._tmp.name, name))
        return self._tmp.name

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def survey(run_uri: str, storage_options=None) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(the newest intact checkpoint of a run or None, [(name, problem)] of the damaged ones newer
    than it). :class:`NoIntactCheckpoint` when the run has checkpoints and none is intact."""
    from index.storage import join

    damaged: List[Tuple[str, str]] = []
    for _, name in list_checkpoints(run_uri, storage_options):
        with fetched_checkpoint(join(run_uri, name), storage_options) as folder:
            try:
                verify_checkpoint(folder)
            except CheckpointDamaged as exc:
                damaged.append((name, str(exc)))
                continue
        return name, damaged
    if damaged:
        raise NoIntactCheckpoint(
            f"run {run_uri} cannot be resumed: none of its {len(damaged)} checkpoint(s) is intact "
            f"({'; '.join(f'{n}: {p}' for n, p in damaged[:3])}); start afresh with another --name "
            "(or remove the run folder)"
        )
    return None, damaged
