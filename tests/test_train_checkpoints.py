"""`reco train` checkpoints: digests written at commit time and verified on resume, damaged
checkpoints reported and skipped (fall back to the newest intact one, or one clear error), and a
NaN loss that stops training instead of exporting. Checkpoints are made by the real loop
(`run_local`, and Ray Train for the end-to-end cases) on the toy pseudo-labels of test_train."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from test_train import TOY, write_pseudo_labels

TINY = dict(TOY, num_workers=1, cpus_per_worker=1, iterations=4, checkpoint_every=2, log_every=1)


def _cfg(**kw):
    from cluster.train import TrainConfig

    return TrainConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    return write_pseudo_labels(tmp_path_factory.mktemp("toyck"), n=6)


@pytest.fixture(scope="module")
def local_run(labels, tmp_path_factory) -> Path:
    """A run folder with checkpoints 2 and 4 written by the training loop (no Ray)."""
    from cluster.train import run_local

    run = tmp_path_factory.mktemp("runs") / "r"
    run_local(str(labels), str(run), _cfg())
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000002", "checkpoint_00000004"]
    return run


def _redigest(folder: Path) -> None:
    """Recompute rank 0's digest, as if the damage had happened before the commit (so that the
    checks after the digest are reached)."""
    from index.storage import file_sha256

    d = json.loads((folder / "digest_rank0.json").read_text())
    d["files"] = {n: file_sha256(folder / n) for n in d["files"] if (folder / n).exists()}
    (folder / "digest_rank0.json").write_text(json.dumps(d))


def _random_tensor_bytes(folder: Path, name: str = "model.safetensors") -> None:
    raw = bytearray((folder / name).read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    body = os.urandom(len(raw) - 8 - n)  # the header stays intact: the file still loads
    (folder / name).write_bytes(bytes(raw[: 8 + n]) + body)


def _truncate(folder: Path) -> None:
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / "model.safetensors"))
    k = next(k for k, v in t.items() if v.is_floating_point())
    t[k] = torch.full_like(t[k], float("nan"))
    save_file(t, str(folder / "model.safetensors"))
    _redigest(folder)


def _garbage_state(folder: Path) -> None:
    (folder / "state.json").write_bytes(b"\x00{not json")
    _redigest(folder)


def _empty(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


DAMAGE = {
    "random bytes, header intact": (_random_tensor_bytes, "altered since it was written"),
    "truncated": (_truncate, "altered since it was written"),
    "missing optimiser file": (lambda f: (f / "optimizer.safetensors").unlink(), "optimizer.safetensors missing"),
    "missing digest": (lambda f: (f / "digest_rank0.json").unlink(), "digest_rank0.json missing"),
    "empty folder": (_empty, "empty"),
    "garbage state.json": (_garbage_state, "state.json is not JSON"),
    "NaN tensors (digest matching)": (_nan_weights, "NaN/Inf"),
}


def test_intact_checkpoint_verifies_and_carries_a_digest_of_every_file(local_run):
    from cluster.train import verify_checkpoint
    from index.storage import file_sha256

    ck = local_run / "checkpoint_00000004"
    state = verify_checkpoint(str(ck))
    assert state["step"] == 4
    digest = json.loads((ck / "digest_rank0.json").read_text())["files"]
    assert set(digest) == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "state.json",
        "rng_rank0.json",
    }
    assert all(digest[n] == file_sha256(ck / n) for n in digest)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_caught_and_the_run_falls_back(kind, local_run, labels, tmp_path):
    from cluster.train import CheckpointDamaged, plan_training, verify_checkpoint

    run = tmp_path / "runs" / "r"
    shutil.copytree(local_run, run)
    damage, reason = DAMAGE[kind]
    damage(run / "checkpoint_00000004")
    with pytest.raises(CheckpointDamaged, match=reason):
        verify_checkpoint(str(run / "checkpoint_00000004"))
    plan = plan_training(str(labels), str(tmp_path / "runs"), "r", _cfg())
    assert plan.resume_from == "checkpoint_00000002"
    assert [n for n, _ in plan.damaged] == ["checkpoint_00000004"] and reason in plan.damaged[0][1]


def test_no_intact_checkpoint_is_one_clear_error_before_ray(local_run, labels, tmp_path, caplog):
    from cluster.train import NoIntactCheckpoint, plan_training
    from jobs.cli import main

    run = tmp_path / "runs" / "r"
    shutil.copytree(local_run, run)
    _truncate(run / "checkpoint_00000004")
    (run / "checkpoint_00000002" / "optimizer.json").unlink()
    with pytest.raises(NoIntactCheckpoint, match="none of its 2 checkpoint"):
        plan_training(str(labels), str(tmp_path / "runs"), "r", _cfg())
    import ray

    was_up = ray.is_initialized()
    cfg = tmp_path / "t.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"train": TINY}))
    assert main(["train", str(labels), "--name", "r", "--storage", str(tmp_path / "runs"), "--config", str(cfg)]) == 2
    assert ray.is_initialized() == was_up  # refused before Ray started
    err = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(err) == 1 and "\n" not in err[0], err
    assert "cannot be resumed" in err[0] and "checkpoint_00000004" in err[0] and "checkpoint_00000002" in err[0]


def test_nan_loss_stops_the_local_loop(labels, tmp_path, monkeypatch):
    """The same loop as on Ray: a NaN loss at step 3 raises before checkpoint 4 is written."""
    import torch.nn.functional as F

    from cluster.train import TrainingDiverged, run_local

    real, calls = F.cross_entropy, []

    def poisoned(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) >= 3 else out

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan over steps 3-4"):
        run_local(str(labels), str(tmp_path / "run"), _cfg(log_every=2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_00000002"]


# -- Ray Train end to end (1 worker, 4 steps) ------------------------------------------------------


@pytest.mark.slow
def test_damaged_latest_checkpoint_on_ray_falls_back_and_ends_where_an_intact_run_ends(
    ray_local, labels, tmp_path, caplog
):
    from safetensors.torch import load_file

    from cluster.train import run_training

    runs, cfg = tmp_path / "runs", _cfg()
    run_training(str(labels), str(runs), "r", cfg)
    ck4 = runs / "r" / "checkpoint_00000004"
    want = {k: v.clone() for k, v in load_file(str(ck4 / "model.safetensors")).items()}
    _random_tensor_bytes(ck4)  # what `reco train` once resumed from, reported "ok" and exported as NaN
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = run_training(str(labels), str(runs), "r", cfg)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "damaged" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint_00000004" in warned[0] and "resuming from checkpoint_00000002" in warned[0]
    assert [a["start_step"] for a in res.report["attempts"]] == [0, 2]  # resumed from 2, not from scratch
    assert [p.name.split(".")[0] for p in (runs / "r" / "damaged_checkpoints").iterdir()] == ["checkpoint_00000004"]
    got = load_file(str(ck4 / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), atol=1e-6, rtol=1e-5), k
    exported = load_file(str(runs / "r" / "model" / "model.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in exported.values() if v.is_floating_point())


def poison_loss_from(call: int):
    """A ``worker_setup``: from the ``call``-th loss on, the worker's loss is NaN (Ray pickles this
    closure by value; the patch lives in the worker process only)."""

    def setup() -> None:
        import torch.nn.functional as F

        real, calls = F.cross_entropy, []

        def poisoned(*a, **k):
            calls.append(1)
            out = real(*a, **k)
            return out * float("nan") if len(calls) >= call else out

        F.cross_entropy = poisoned

    return setup


@pytest.mark.slow
def test_nan_loss_on_ray_stops_with_a_clear_error_and_exports_nothing(ray_local, labels, tmp_path):
    from cluster.train import TrainingDiverged, run_training

    runs = tmp_path / "runs"
    with pytest.raises(TrainingDiverged, match="loss is nan over steps 3-4"):
        run_training(str(labels), str(runs), "r", _cfg(log_every=2, max_failures=2), worker_setup=poison_loss_from(3))
    run = runs / "r"
    assert not (run / "model").exists() and not (run / "train_report.json").exists()
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000002"]
