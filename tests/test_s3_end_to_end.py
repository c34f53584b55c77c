"""S3 end to end (#9 item 5): the jobs against the moto server on 127.0.0.1, faults injected once.

The corpus lives in S3; ``reco embed`` reads it into an embedding store in S3 (resumed after more
images are added, a crashed commit's orphan cleaned), ``reco build-index`` builds the FAISS index
from that store into S3, and the index is read back from S3 (FAISS agrees with exact search over
the S3 store; ``reco search`` queries it); ``reco build-bank`` writes its parts and the bank to S3, ``reco pseudo-label`` reads the corpus and the bank from S3
and writes labels, overlays and its manifest there, ``reco train`` reads those pseudo-labels and
writes its checkpoints, model and report there; everything is read back. Every S3 request goes
through :class:`FaultProxy`, a small HTTP proxy in front of moto that answers chosen requests
once with a real S3 fault -- ``503 SlowDown`` (throttling) or silence past the client's read
timeout -- and records every request, so the test sees the fault happen and the retry that
followed, and checks that the input concerned was processed, not skipped. The jobs run through
the ``reco`` entry point in this process, on the session's local Ray (its workers reach the proxy
over TCP like any S3 endpoint). Credentials are given once, in ``--storage-options``, and must not
appear in anything written.
"""

from __future__ import annotations

import http.client
import io
import json
import posixpath
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Tuple

import numpy as np
import pytest
from conftest import TINY_VIT, make_bucket, make_image

from jobs.cli import main

pytestmark = pytest.mark.slow

BUCKET = "reco-e2e"
#: how long the proxy stays silent on a "timeout" fault; the client's read timeout is shorter
SILENCE_S = 4.0
READ_TIMEOUT_S = 1.5
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}
#: a tiny ReCo+ run (1 Ray Train worker, 4 steps, a checkpoint every 2)
TRAIN_YAML = """\
train:
  encoder: tu-mobilenetv3_small_050
  output_stride: 16
  decoder_channels: 32
  iterations: 4
  batch_size: 2
  crop_size: 32
  base_size: 40
  checkpoint_every: 2
  log_every: 2
  num_workers: 1
  loader_workers: 0
  cpus_per_worker: 0.5
"""
_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy(ThreadingHTTPServer):
    """127.0.0.1 HTTP proxy to ``upstream`` (the moto server). :meth:`fail_once` arms one fault
    for the next request whose method matches and whose path contains a given string:
    ``"throttle"`` answers ``503 SlowDown`` (S3's throttling error), ``"timeout"`` says nothing for
    :data:`SILENCE_S` and drops the connection. ``log`` holds (method, path, outcome) of every
    request, outcome being the status code forwarded or the fault."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        u = urllib.parse.urlsplit(upstream)
        self.upstream = (u.hostname, u.port)
        self.faults: List[Tuple[str, str, str]] = []
        self.log: List[Tuple[str, str, object]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, name="s3-fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fail_once(self, method: str, path_part: str, fault: str) -> int:
        """Arm one fault; returns the log position from which its request will be recorded."""
        assert fault in ("throttle", "timeout")
        with self.lock:
            self.faults.append((method, path_part, fault))
            return len(self.log)

    def take_fault(self, method: str, path: str):
        with self.lock:
            for i, (m, part, fault) in enumerate(self.faults):
                if m == method and part in urllib.parse.unquote(path):
                    del self.faults[i]
                    return fault
        return None

    def seen(self, method: str, path_part: str, since: int = 0) -> List[object]:
        """Outcomes of the requests ``method`` whose path contains ``path_part`` (from log
        position ``since`` on), in order."""
        with self.lock:
            return [o for m, p, o in self.log[since:] if m == method and path_part in urllib.parse.unquote(p)]


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _forward(self) -> None:
        body = self._body()
        fault = self.server.take_fault(self.command, self.path)
        if fault == "timeout":
            with self.server.lock:
                self.server.log.append((self.command, self.path, "timeout"))
            time.sleep(SILENCE_S)
            self.close_connection = True
            return
        if fault == "throttle":
            with self.server.lock:
                self.server.log.append((self.command, self.path, "throttle"))
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOWDOWN)))
            self.end_headers()
            self.wfile.write(_SLOWDOWN)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            with self.server.lock:
                self.server.log.append((self.command, self.path, resp.status))
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            if self.command == "HEAD":  # no body: the object's size is the header's to tell
                self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


@pytest.fixture
def s3(s3_server):
    """(storage options through the fault proxy, the proxy, an s3fs client on moto directly)."""
    import s3fs

    proxy = FaultProxy(s3_server["endpoint_url"])
    proxy.thread.start()

    make_bucket(s3_server, BUCKET)
    direct = s3fs.S3FileSystem(**s3_server)
    opts = {
        "endpoint_url": proxy.url,
        "key": "AKIAE2ETEST",
        "secret": "e2e-" + secrets.token_hex(12),
        "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"read_timeout": READ_TIMEOUT_S, "connect_timeout": READ_TIMEOUT_S},
    }
    try:
        yield opts, proxy, direct
    finally:
        proxy.shutdown()
        proxy.server_close()


def _png(img) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def test_corpus_bank_labels_and_training_through_s3_with_faults_retried(
    ray_local, s3, tiny_clip_dir, tiny_dense_path, tmp_path, monkeypatch, capsys
):
    from cluster.bank_parts import PARTS_DIR, committed
    from cluster.pseudo_label import committed_rows
    from index.labels import decode_labels
    from index.sources import list_folder
    from index.storage import join, list_files, load_bank, read_bytes, write_bytes
    from index.store import EmbeddingStore

    opts, proxy, direct = s3
    run = secrets.token_hex(4)  # a prefix of this run's own (the moto server lives for the session)
    root = f"s3://{BUCKET}/{run}"
    monkeypatch.setenv("RECO_CACHE_DIR", str(tmp_path / "cache"))  # where the index is fetched to

    def add_images(rng):
        for i in rng:
            direct.pipe(f"{BUCKET}/{run}/corpus/{'ab'[i % 2]}/{i // 2:04d}.png", _png(make_image(300 + i, (48, 40))))

    add_images(range(6))
    direct.pipe(f"{BUCKET}/{run}/corpus/bad/broken.png", b"\x89PNG broken")
    corpus = f"{root}/corpus"
    first = [it.id for it in list_folder(corpus, opts)]
    assert len(first) == 7
    so = json.dumps(opts)

    # 1. corpus in S3 -> store in S3; one image read is throttled once
    mark = proxy.fail_once("GET", f"{run}/corpus/a/0001.png", "throttle")
    store_uri = f"{root}/store"
    embed_args = [
        "embed",
        corpus,
        "--store",
        store_uri,
        "--clip-model",
        f"local-dir:{tiny_clip_dir}",
        "--shard-size",
        "4",
        "--storage-options",
        so,
    ]
    assert main(embed_args) == 0
    store = EmbeddingStore(store_uri, storage_options=opts)
    assert store.committed_ids() == set(first)
    outcomes = proxy.seen("GET", f"{run}/corpus/a/0001.png", since=mark)
    assert outcomes[0] == "throttle" and outcomes[-1] in (200, 206), outcomes
    report = json.loads(read_bytes(join(store_uri, "embed_report.json"), opts))
    assert report["failed_transient_count"] == 0 and report["embedded"] == 6 and report["skipped_count"] == 1
    assert not list_files(store_uri, opts, suffix=".lock", refresh=True)  # the writer lock was released
    assert proxy.seen("PUT", f"{run}/store/writer.lock") and proxy.seen("PUT", f"{run}/store/manifest.json")
    # a commit that crashed before its manifest PUT left an orphan; more images arrive; the
    # resumed embed embeds only the new ones, removes the orphan, and every id is there once
    orphan = join(store_uri, "img_emb", "img_emb_00009.0badc0de.npy")
    write_bytes(orphan, b"left by a crashed commit", opts)
    add_images(range(6, 10))
    listed = [it.id for it in list_folder(corpus, opts)]
    assert len(listed) == 11
    assert main(embed_args) == 0
    report = json.loads(read_bytes(join(store_uri, "embed_report.json"), opts))
    assert report["embedded"] == 4 and report["already_done"] == 7 and report["failed_transient_count"] == 0
    assert orphan not in list_files(join(store_uri, "img_emb"), opts, refresh=True)
    store = EmbeddingStore(store_uri, storage_options=opts)
    assert store.committed_ids() == set(listed)
    _, ids, uris = store.load_all()
    assert "a/0001.png" in ids and "a/0001.png" not in store.skipped()  # retried, not skipped
    assert sorted(ids) == sorted(set(listed) - {"bad/broken.png"}) and all(u.startswith(corpus) for u in uris)
    assert len(ids) == len(set(ids))
    # rerun: nothing new
    assert main(embed_args) == 0
    assert EmbeddingStore(store_uri, storage_options=opts).shards == store.shards

    # 1b. FAISS index from the S3 store into S3, read back from S3: FAISS agrees with exact search
    #     over the S3 store; `reco search` queries it
    from index.catalog import open_retriever

    index_uri = f"{root}/index"
    assert (
        main(["build-index", "--store", store_uri, "--index", index_uri, "--num-queries", "5", "--storage-options", so])
        == 0
    )
    assert sorted(posixpath.basename(u) for u in list_files(index_uri, opts, refresh=True)) == [
        "index.faiss",
        "index.json",
        "job_report.json",
        "job_report.txt",
        "rows.parquet",
    ]
    faiss_r, id_uri, meta = open_retriever(index_uri, storage_options=opts)
    exact_r, _, _ = open_retriever(index_uri, exact=True, storage_options=opts)
    assert meta["store"] == store_uri and meta["store_total"] == 10 and len(faiss_r) == 10
    emb, ids, _ = store.load_all()
    for fh, eh in zip(faiss_r.search(emb, 5), exact_r.search(emb, 5)):
        assert fh.ids == eh.ids and np.allclose(fh.scores, eh.scores, atol=1e-4)
    assert all(id_uri[i].startswith(corpus) for i in ids)
    capsys.readouterr()
    assert main(["search", "a photo of a cat", "-k", "3", "--index", index_uri, "--storage-options", so]) == 0
    hits = [line for line in capsys.readouterr().out.splitlines() if line and not line.startswith("#")]
    assert len(hits) == 3 and all(corpus in h for h in hits)

    # 1c. a bank whose archives are retrieved from the S3 index (CLIP text -> image top-k), read
    #     from the S3 corpus by the bank actors
    (tmp_path / "retrieve.txt").write_text("cat\ndog\n")
    (tmp_path / "bank_small.yaml").write_text("bank:\n  image_size: 64\n")
    assert (
        main(
            [
                "build-bank",
                "--vocab",
                str(tmp_path / "retrieve.txt"),
                "--index",
                index_uri,
                "--k",
                "3",
                "--clip-model",
                f"local-dir:{tiny_clip_dir}",
                "--out",
                f"{root}/bank_retrieved",
                "--config",
                str(tmp_path / "bank_small.yaml"),
                "--dense-encoder",
                "dino_vits16",
                "--dense-weights",
                str(tiny_dense_path),
                "--dense-kwargs",
                json.dumps(TINY_VIT),
                "--storage-options",
                so,
            ]
        )
        == 0
    )
    rows, _, _ = committed(f"{root}/bank_retrieved", opts)
    assert {r["name"] for r in rows.values() if r["kind"] == "target"} == {"cat", "dog"}
    # the default's context concepts are retrieved from the index too (the paper's retrieval mode)
    assert {r["name"] for r in rows.values() if r["kind"] == "context"} == {"tree", "sky", "building", "road", "person"}
    for r in rows.values():
        assert r["status"] == "ok" and r["source"] == "retrieval" and len(r["archive"]) == 3, r
        assert all(u.startswith(corpus) for u in r["archive"])

    # 2. bank written to S3 (exemplars on local disk); the first part's PUT is throttled once
    ex = tmp_path / "exemplars"
    names = ["cat", "dog", "sky"]
    for i, n in enumerate(names):
        (ex / n).mkdir(parents=True)
        for k in range(2):
            make_image(40 + 2 * i + k, (64, 64)).save(ex / n / f"{k}.png")
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "bank.yaml").write_text("bank:\n  image_size: 64\n  context_elimination: false\n")
    bank_uri = f"{root}/bank"
    mark = proxy.fail_once("PUT", f"{run}/bank/{PARTS_DIR}/part-00000-", "throttle")
    bank_args = [
        "build-bank",
        "--vocab",
        str(tmp_path / "names.txt"),
        "--exemplars",
        str(ex),
        "--out",
        bank_uri,
        "--config",
        str(tmp_path / "bank.yaml"),
        "--dense-encoder",
        "dino_vits16",
        "--dense-weights",
        str(tiny_dense_path),
        "--dense-kwargs",
        json.dumps(TINY_VIT),
        "--commit-every",
        "2",
        "--storage-options",
        so,
    ]
    assert main(bank_args) == 0
    outcomes = proxy.seen("PUT", f"{run}/bank/{PARTS_DIR}/part-00000-", since=mark)
    assert outcomes[0] == "throttle" and outcomes[-1] == 200, outcomes
    rows, _, _ = committed(bank_uri, opts)
    assert sorted(r["name"] for r in rows.values()) == names and all(r["status"] == "ok" for r in rows.values())
    parts = list_files(join(bank_uri, PARTS_DIR), opts, suffix=".safetensors")
    assert len(parts) == 2  # 3 concepts, 2 per commit
    bank = load_bank(bank_uri, opts)
    assert list(bank.names) == names and bank.references.shape[0] == 3
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(read_bytes(join(bank_uri, "concepts.parquet"), opts)))
    assert sorted(table.column("name").to_pylist()) == names
    assert json.loads(read_bytes(join(bank_uri, "bank.json"), opts))
    assert main(bank_args) == 0  # rerun: every concept already committed, no new part
    assert list_files(join(bank_uri, PARTS_DIR), opts, suffix=".safetensors") == parts
    again = load_bank(bank_uri, opts)  # rewritten by the rerun, still naming its encoder
    assert again.metadata["dense_encoder"] == bank.metadata["dense_encoder"] == "dino_vits16"

    # 3. pseudo-labels: corpus and bank read from S3, labels + overlays + manifest written there;
    #    one image read times out once
    out = f"{root}/labels"
    mark = proxy.fail_once("GET", f"{run}/corpus/b/0002.png", "timeout")
    pl_args = [
        "pseudo-label",
        corpus,
        "--bank",
        bank_uri,
        "--out",
        out,
        "--overlays",
        "2",
        "--commit-every",
        "4",
        "--dense-weights",
        str(tiny_dense_path),
        "--dense-kwargs",
        json.dumps(TINY_VIT),
        "--storage-options",
        so,
    ]
    assert main(pl_args) == 0
    outcomes = proxy.seen("GET", f"{run}/corpus/b/0002.png", since=mark)
    assert outcomes[0] == "timeout" and outcomes[-1] in (200, 206), outcomes
    got = committed_rows(out, opts)
    ids = [r["id"] for r in got]
    assert sorted(ids) == sorted(listed) and len(ids) == len(set(ids))  # every id exactly once
    by_id = {r["id"]: r for r in got}
    assert by_id["b/0002.png"]["status"] == "ok" and by_id["bad/broken.png"]["status"] == "skipped"
    for r in got:
        if r["status"] == "ok":
            lab = decode_labels(read_bytes(join(out, r["label"]), opts))
            assert lab.shape == (40, 48) and lab.max() < 3
    assert sum(1 for r in got if r["overlay"]) == 2
    assert "Legend" in read_bytes(join(out, "index.html"), opts).decode()
    settings = json.loads(read_bytes(join(out, "pseudo_label.json"), opts))
    assert settings["classes"] == names
    assert main(pl_args) == 0  # rerun: nothing twice
    assert len(committed_rows(out, opts)) == len(listed)

    # 4. ReCo+ training on those pseudo-labels, checkpoints + model + report to S3 (Ray Train's
    #    storage filesystem carries the same options); a checkpoint upload is throttled once
    (tmp_path / "train.yaml").write_text(TRAIN_YAML)
    runs = f"{root}/runs"
    mark = proxy.fail_once("PUT", f"{run}/runs/e2e/checkpoint_00000002/model.safetensors", "throttle")
    assert (
        main(
            [
                "train",
                out,
                "--name",
                "e2e",
                "--storage",
                runs,
                "--config",
                str(tmp_path / "train.yaml"),
                "--storage-options",
                so,
            ]
        )
        == 0
    )
    outcomes = proxy.seen("PUT", f"{run}/runs/e2e/checkpoint_00000002/model.safetensors", since=mark)
    assert outcomes[0] == "throttle" and outcomes[-1] == 200, outcomes
    rep = json.loads(read_bytes(join(runs, "e2e", "train_report.json"), opts))
    assert rep["steps"] == 4 and [c["name"] for c in rep["checkpoints"]] == [
        "checkpoint_00000002",
        "checkpoint_00000004",
    ]
    for c in rep["checkpoints"]:  # read back from S3
        state = json.loads(read_bytes(join(runs, "e2e", c["name"], "state.json"), opts))
        assert state["step"] == int(c["name"].split("_")[1]) and state["classes"] == names
    from index.outputs import load_segmodel

    model = load_segmodel(f"{runs}/e2e", opts)
    pred, classes = model.predict(make_image(9, (48, 40)))
    assert pred.shape == (40, 48) and list(classes) == names

    # credentials were given once, in --storage-options: nothing written holds the secret
    secret = opts["secret"]
    for uri in [*list_files(store_uri, opts, refresh=True), *list_files(index_uri, opts, refresh=True)]:
        if uri.endswith((".json", ".yaml", ".txt", ".lock")):
            assert secret not in read_bytes(uri, opts).decode(errors="replace"), uri
    assert any(u.endswith("embed_config.yaml") for u in list_files(store_uri, opts))
    for name in ("build.json", "bank.json"):
        assert secret not in read_bytes(join(bank_uri, name), opts).decode()
    for name in ("pseudo_label.json", "report.json", "index.html"):
        assert secret not in read_bytes(join(out, name), opts).decode()
    for name in ("train_settings.json", "train_config.yaml", "train_report.json", "model/model.json"):
        assert secret not in read_bytes(join(runs, "e2e", name), opts).decode()
