"""#14: every job's output on S3 (the moto server) is locked: a second writer of `embed`,
`build-bank` or `pseudo-label` is refused with one clear line naming the holder (exit 2, nothing
written), and `--overwrite` happens under the lock (a held lock stops it before it forgets any
committed part). Before, index.storage.writer_lock held nothing for a URL."""

import json
import secrets

import pytest
from conftest import TINY_VIT, make_bucket, make_image

from index import storage
from index.lock import writer_lock
from index.output import ResumableOutput

BUCKET = "reco-writers-test"


@pytest.fixture()
def s3out(s3_server):
    """(a fresh s3:// prefix, storage options, the --storage-options argument)."""
    make_bucket(s3_server, BUCKET)
    return f"s3://{BUCKET}/{secrets.token_hex(4)}", dict(s3_server), json.dumps(s3_server)


def _images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(seed + i, (64, 64)).save(folder / f"{i}.png")
    return folder


def _earlier_run(uri, opts, job, settings_file, parts_dir, suffix):
    """An output an earlier run of another configuration left: its settings and one part."""
    with ResumableOutput(uri, job, settings_file, parts_dir, suffix, opts).open({"an": "older configuration"}) as out:
        part = out.commit(b"committed by the earlier run")
    return part, storage.read_bytes(storage.join(uri, settings_file), opts)


def _refused_then_overwritten(main, args, out, opts, caplog, job, settings_file, parts_dir, suffix):
    """A job run with --overwrite into an output of another configuration: refused (exit 2, one
    line naming the holder) while another writer holds the lock, forgetting nothing; run afresh
    once the lock is free."""
    part, settings = _earlier_run(out, opts, job, settings_file, parts_dir, suffix)
    with writer_lock(out, f"{job}-elsewhere", opts):
        caplog.clear()
        assert main([*args, "--overwrite"]) == 2
        _refused(caplog, f"{job}-elsewhere")
    # the refused --overwrite forgot nothing: the earlier run's part and settings are intact
    assert storage.read_bytes(part, opts) == b"committed by the earlier run"
    assert storage.read_bytes(storage.join(out, settings_file), opts) == settings
    assert main([*args, "--overwrite"]) == 0  # the lock is free: --overwrite starts afresh
    assert not storage.exists(part, opts)
    assert json.loads(storage.read_bytes(f"{out}/job_report.json", opts))["inputs"]["processed"] == 2
    assert not storage.exists(f"{out}/writer.lock", opts)


def _refused(caplog, holder):
    lines = [r.getMessage() for r in caplog.records if "locked by another writer" in r.getMessage()]
    assert lines and holder in lines[0], caplog.text[-2000:]


def test_embed_on_s3_refuses_a_second_writer(s3out, tiny_clip_dir, tmp_path, caplog):
    from jobs.cli import main

    root, opts, so = s3out
    store = f"{root}/store"
    src = _images(tmp_path / "src", 3)
    with writer_lock(store, "embed-elsewhere", opts):
        caplog.clear()
        assert (
            main(
                [
                    "embed",
                    str(src),
                    "--store",
                    store,
                    "--clip-model",
                    f"local-dir:{tiny_clip_dir}",
                    "--storage-options",
                    so,
                ]
            )
            == 2
        )
        _refused(caplog, "embed-elsewhere")
    assert not storage.exists(f"{store}/manifest.json", opts)  # nothing was written by the refused job


@pytest.mark.slow
def test_build_bank_on_s3_refuses_a_second_writer_and_overwrites_under_the_lock(
    ray_local, s3out, tiny_dense_path, tmp_path, caplog
):
    from jobs.cli import main

    root, opts, so = s3out
    out = f"{root}/bank"
    ex = tmp_path / "exemplars"
    for i, name in enumerate(["cat", "dog"]):
        _images(ex / name, 2, seed=10 * i)
    vocab = tmp_path / "names.txt"
    vocab.write_text("cat\ndog\n")
    cfg = tmp_path / "bank.yaml"
    cfg.write_text("bank:\n  image_size: 64\n  context_elimination: false\n")
    args = [
        "build-bank",
        "--vocab",
        str(vocab),
        "--exemplars",
        str(ex),
        "--out",
        out,
        "--config",
        str(cfg),
        "--actors",
        "1",
        "--dense-encoder",
        "dino_vits16",
        "--dense-weights",
        str(tiny_dense_path),
        "--dense-kwargs",
        json.dumps(TINY_VIT),
        "--storage-options",
        so,
    ]
    _refused_then_overwritten(main, args, out, opts, caplog, "build-bank", "build.json", "parts", ".safetensors")


@pytest.mark.slow
def test_pseudo_label_on_s3_refuses_a_second_writer_and_overwrites_under_the_lock(
    ray_local, s3out, tiny_dense_path, tmp_path, caplog
):
    from jobs.cli import main
    from reco import BankConfig, ConceptBank, ConceptBuilder
    from reco.encoders import create_dense_encoder

    root, opts, so = s3out
    dense = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
    imgs = [make_image(i, (64, 64)) for i in range(4)]
    bank = ConceptBank.build(
        {"cat": imgs[:2], "dog": imgs[2:]},
        ConceptBuilder(dense, None, BankConfig(image_size=64, context_elimination=False)),
    )
    bank_dir = storage.save_bank(bank, str(tmp_path / "bank"))
    src = _images(tmp_path / "src", 2, seed=40)
    out = f"{root}/labels"
    args = [
        "pseudo-label",
        str(src),
        "--bank",
        str(bank_dir),
        "--out",
        out,
        "--dense-weights",
        str(tiny_dense_path),
        "--dense-kwargs",
        json.dumps(TINY_VIT),
        "--storage-options",
        so,
    ]
    _refused_then_overwritten(
        main, args, out, opts, caplog, "pseudo-label", "pseudo_label.json", "manifest", ".parquet"
    )
