"""`reco search` (#16 bad input, #17.1 --store): every bad argument or unreadable index is one
line and exit 2; --store searches the store exactly and agrees with --index --exact."""

import logging

import numpy as np
import pytest
from test_exact_pass import store_of
from test_faiss import clustered

from index.catalog import build_index_dir
from jobs.cli import main


@pytest.fixture()
def clip_store(tmp_path, tiny_clip_dir):
    def make(dim=32, name="s"):
        return store_of(
            tmp_path / name, clustered(60, dim, seed=dim), [30, 30], {"clip_model": f"local-dir:{tiny_clip_dir}"}
        )

    return make


def _one_line_error(argv, caplog):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="reco"):
        rc = main(argv)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2 and len(errors) == 1, (rc, [r.getMessage() for r in errors])
    msg = errors[0].getMessage()
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_search_bad_arguments_and_files_are_one_line_exit_2(clip_store, tmp_path, caplog, ray_local):
    st = clip_store()
    build_index_dir(st, tmp_path / "ix", "Flat", num_queries=10)
    q = ["search", "a photo of a dog", "--index", str(tmp_path / "ix")]
    assert "-k must be >= 1" in _one_line_error(q + ["-k", "0"], caplog)
    assert "-k must be >= 1" in _one_line_error(q + ["-k", "-5"], caplog)
    assert "contact-sheet" in _one_line_error(q + ["--contact-sheet", str(tmp_path)], caplog)
    assert "one of --index" in _one_line_error(["search", "dog"], caplog)

    narrow = clip_store(dim=16, name="narrow")  # a CLIP of another width than the store's
    build_index_dir(narrow, tmp_path / "nx", "Flat", num_queries=10)
    for extra in ([], ["--exact"]):
        msg = _one_line_error(["search", "dog", "--index", str(tmp_path / "nx"), *extra], caplog)
        assert "32-d text embeddings" in msg and "16-d" in msg
    assert "16-d" in _one_line_error(["search", "dog", "--store", str(narrow.root)], caplog)

    (tmp_path / "ix" / "index.json").write_text("{not json")
    assert "index.json is not valid JSON" in _one_line_error(q, caplog)
    build_index_dir(st, tmp_path / "ix", "Flat", num_queries=10)
    f = tmp_path / "ix" / "index.faiss"
    f.write_bytes(f.read_bytes()[:100])
    assert "cannot be read by FAISS" in _one_line_error(q, caplog)


def test_search_store_is_exact_and_agrees_with_index_exact(clip_store, tmp_path, capsys, ray_local):
    st = clip_store()
    build_index_dir(st, tmp_path / "ix", "Flat", num_queries=10)
    assert main(["search", "a photo of a dog", "-k", "7", "--store", str(st.root)]) == 0
    by_store = capsys.readouterr().out.splitlines()
    assert main(["search", "a photo of a dog", "-k", "7", "--index", str(tmp_path / "ix"), "--exact"]) == 0
    by_index = capsys.readouterr().out.splitlines()
    assert len(by_store) == 8 and "Ray Data pass" in by_store[0]
    assert [line.split()[2:] for line in by_store[1:]] == [line.split()[2:] for line in by_index[1:]]
    np.testing.assert_allclose(
        [float(x.split()[1]) for x in by_store[1:]], [float(x.split()[1]) for x in by_index[1:]], atol=1e-4
    )


def test_build_bank_store_retrieves_exact_archives(ray_local, tiny_clip_dir, tiny_dense_path, tmp_path):
    """`reco build-bank --store`: archives are the exact top-k of each concept's text embedding."""
    import json

    from conftest import TINY_VIT, make_image

    from index.retriever import ExactRetriever
    from index.store import EmbeddingStore
    from reco.encoders import create_clip
    from reco.text import text_embeddings

    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        make_image(500 + i, (48, 40)).save(src / f"{i:02d}.png")
    clip = f"local-dir:{tiny_clip_dir}"
    store = tmp_path / "store"
    assert main(["embed", str(src), "--store", str(store), "--clip-model", clip, "--shard-size", "4"]) == 0
    (tmp_path / "v.txt").write_text("cat\ndog\n")
    (tmp_path / "b.yaml").write_text("bank:\n  image_size: 64\n  context_elimination: false\n")
    out = tmp_path / "bank"
    assert (
        main(
            [
                "build-bank",
                "--vocab",
                str(tmp_path / "v.txt"),
                "--store",
                str(store),
                "--k",
                "3",
                "--clip-model",
                clip,
                "--out",
                str(out),
                "--config",
                str(tmp_path / "b.yaml"),
                "--dense-encoder",
                "dino_vits16",
                "--dense-weights",
                str(tiny_dense_path),
                "--dense-kwargs",
                json.dumps(TINY_VIT),
            ]
        )
        == 0
    )
    import pyarrow.parquet as pq

    rows = {r["name"]: r for r in pq.read_table(out / "concepts.parquet").to_pylist()}
    emb, ids, uris = EmbeddingStore(store).load_all()
    model = create_clip(clip, None)
    import torch

    for name in ("cat", "dog"):
        q = torch.nn.functional.normalize(text_embeddings(model.encode_text, [name]).mean(0), dim=0).numpy()
        want = ExactRetriever(emb, uris).search(q[None], 3)[0].ids
        assert rows[name]["source"] == "retrieval" and list(rows[name]["archive"]) == want, (name, rows[name])
