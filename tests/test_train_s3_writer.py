"""#14: `reco train` with its runs on S3 (the moto server) holds the run's writer lock
(index.output.ResumableOutput): a second writer is refused with one line naming the holder,
before Ray starts and before anything of the run is touched, and `--overwrite` of a run of another
configuration happens under that lock. Before, train runs on S3 were written unlocked."""

import json
import logging
import secrets

import pytest
import yaml
from conftest import make_bucket
from test_train import TOY, write_pseudo_labels

from index import storage
from index.lock import writer_lock
from index.output import ResumableOutput

BUCKET = "reco-train-writer"


@pytest.mark.slow
def test_train_on_s3_refuses_a_second_writer_and_overwrites_under_the_lock(
    ray_local, s3_server, tmp_path, caplog, monkeypatch
):
    import cluster.runtime
    from jobs.cli import main

    ray_starts = []
    real_init = cluster.runtime.init_ray
    monkeypatch.setattr(cluster.runtime, "init_ray", lambda *a, **k: ray_starts.append(1) or real_init(*a, **k))

    make_bucket(s3_server, BUCKET)
    runs = f"s3://{BUCKET}/{secrets.token_hex(4)}/runs"
    run, opts = f"{runs}/r", dict(s3_server)
    labels = write_pseudo_labels(tmp_path, n=4)
    (tmp_path / "t.yaml").write_text(
        yaml.safe_dump({"train": {**TOY, "num_workers": 1, "iterations": 2, "checkpoint_every": 2, "log_every": 1}})
    )
    args = [
        "train",
        str(labels),
        "--name",
        "r",
        "--storage",
        runs,
        "--config",
        str(tmp_path / "t.yaml"),
        "--storage-options",
        json.dumps(s3_server),
    ]
    # an earlier run of another configuration: its settings and a checkpoint
    with ResumableOutput(run, "train", "train_settings.json", storage_options=opts).open(
        {"train": {"lr_head": 1.0}, "data_digest": "older", "encoder_weights_sha256": None}
    ):
        pass
    old_ckpt = f"{run}/checkpoint_00000002/state.json"
    storage.write_bytes(old_ckpt, b'{"step": 2}', opts)
    settings = storage.read_bytes(f"{run}/train_settings.json", opts)

    caplog.clear()
    assert main(args) == 2  # another configuration, no --overwrite
    assert any("another configuration" in r.getMessage() and "--overwrite" in r.getMessage() for r in caplog.records)
    with writer_lock(run, "train-elsewhere", opts):
        caplog.clear()
        assert main([*args, "--overwrite"]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "locked by another writer" in errors[0] and "train-elsewhere" in errors[0], errors
    assert ray_starts == []  # both refused before the job started Ray
    assert storage.read_bytes(old_ckpt, opts) == b'{"step": 2}'  # nothing touched while another held it
    assert storage.read_bytes(f"{run}/train_settings.json", opts) == settings
    # the lock released: --overwrite starts the run afresh, under the lock, and trains to S3
    assert main([*args, "--overwrite"]) == 0 and ray_starts == [1]
    assert storage.read_bytes(f"{run}/checkpoint_00000002/state.json", opts) != b'{"step": 2}'
    rep = json.loads(storage.read_bytes(f"{run}/train_report.json", opts))
    assert rep["steps"] == 2 and [a["start_step"] for a in rep["attempts"]] == [0]
    assert json.loads(storage.read_bytes(f"{run}/train_settings.json", opts))["config_hash"] == rep["config_hash"]
    assert not storage.exists(f"{run}/writer.lock", opts)
