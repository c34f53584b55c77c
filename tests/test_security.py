"""Security defaults: credentials redacted from everything written, and the embedded local Ray on
127.0.0.1 only with token auth on (checked with ``ss`` on a real Ray started in a child process)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import types

import pytest
import yaml
from conftest import REPO, make_image

from cluster.config import REDACTED, RayRuntimeConfig, is_sensitive_key, redact, redact_text
from cluster.runtime import cluster_address, local_auth_mode
from reco.errors import ConfigError

SECRET = "s3cr3t-Value-0123456789"


def test_redact_masks_storage_options_and_nested_credentials():
    opts = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIAEXAMPLE",
        "secret": SECRET,
        "token": SECRET,
        "password": SECRET,
        "anon": False,
        "client_kwargs": {
            "region_name": "us-east-1",
            "aws_secret_access_key": SECRET,
            "aws_session_token": SECRET,
            "aws_access_key_id": "AKIAEXAMPLE",
        },
        "headers": [{"Authorization": f"Bearer {SECRET}"}],
        "config_kwargs": {"signature_version": "s3v4"},
    }
    out = redact({"storage_options": opts, "env_vars": {"RAY_AUTH_TOKEN": SECRET, "HF_HUB_OFFLINE": "1"}})
    text = json.dumps(out)
    assert SECRET not in text and "AKIAEXAMPLE" in text  # an access key *id* is not a secret
    so = out["storage_options"]
    assert so["key"] == so["secret"] == so["token"] == so["password"] == REDACTED
    assert so["endpoint_url"] == "http://127.0.0.1:9000" and so["anon"] is False
    assert so["client_kwargs"]["region_name"] == "us-east-1"
    assert out["env_vars"] == {"RAY_AUTH_TOKEN": REDACTED, "HF_HUB_OFFLINE": "1"}
    assert opts["secret"] == SECRET  # the input is not modified


def test_redact_handles_cli_args_urls_and_dataclasses():
    args = types.SimpleNamespace(
        source="s3://bucket/imgs",
        store="runs/store",
        ray_config=None,
        shard_size=10,
        storage_options=json.dumps({"key": "K", "secret": SECRET, "endpoint_url": "http://h"}),
        clip_weights=f"https://user:{SECRET}@weights.example.com/w.bin",
        tags=("a", "b"),
    )
    out = redact(vars(args))
    assert SECRET not in json.dumps(out)
    assert json.loads(out["storage_options"]) == {"key": REDACTED, "secret": REDACTED, "endpoint_url": "http://h"}
    assert out["clip_weights"] == f"https://user:{REDACTED}@weights.example.com/w.bin"
    assert out["tags"] == ["a", "b"] and out["shard_size"] == 10
    yaml.safe_dump(out)  # fit for the YAML dumps the jobs write
    # empty credentials stay visible as empty: a report shows that none was given
    assert redact({"token": None, "secret": ""}) == {"token": None, "secret": ""}
    assert redact(RayRuntimeConfig(env_vars={"MY_API_KEY": SECRET}))["env_vars"] == {"MY_API_KEY": REDACTED}
    assert (
        redact_text(f"postgres://me:{SECRET}@db/x and s3://bucket/k")
        == f"postgres://me:{REDACTED}@db/x and s3://bucket/k"
    )


@pytest.mark.parametrize(
    "key, sensitive",
    [
        ("key", True),
        ("secret", True),
        ("token", True),
        ("password", True),
        ("api_key", True),
        ("aws_secret_access_key", True),
        ("secretAccessKey", True),
        ("sessionToken", True),
        ("private_key", True),
        ("RAY_AUTH_TOKEN", True),
        ("credentials", True),
        ("auth", True),
        ("Authorization", True),
        ("auth_mode", False),
        ("key_column", False),
        ("keys", False),
        ("tokenizer", False),
        ("monkey", False),
        ("endpoint_url", False),
        ("aws_access_key_id", False),
        ("region_name", False),
        (3, False),
    ],
)
def test_sensitive_key_names(key, sensitive):
    assert is_sensitive_key(key) is sensitive


def test_embed_config_written_beside_the_store_is_redacted(tiny_clip_dir, tmp_path, monkeypatch):
    """`reco embed` writes embed_config.yaml with its arguments: storage credentials never reach it."""
    import cluster.embed
    import cluster.runtime
    import index.sources
    from index.sources import list_folder
    from jobs.cli import main

    src = tmp_path / "src"
    src.mkdir()
    make_image(1).save(src / "a.jpg")
    monkeypatch.setattr(cluster.runtime, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(index.sources, "list_source", lambda source, kind, storage: list_folder(str(src)))

    def fake_run_embed(items, store, encoders, *a, **k):  # commits nothing, but leaves a valid store
        store.create_or_check(cluster.embed.model_identity(encoders), cluster.embed.clip_dims(encoders)[1])
        report = cluster.embed.EmbedReport(cluster.embed.JobReport("embed"))
        report.listed = report.embedded = 1
        return report

    monkeypatch.setattr(cluster.embed, "run_embed", fake_run_embed)
    store = tmp_path / "store"
    opts = json.dumps({"key": "AKIAEXAMPLE", "secret": SECRET, "endpoint_url": "http://127.0.0.1:9"})
    assert (
        main(
            [
                "embed",
                str(src),
                "--store",
                str(store),
                "--clip-model",
                f"local-dir:{tiny_clip_dir}",
                "--storage-options",
                opts,
            ]
        )
        == 0
    )
    written = (store / "embed_config.yaml").read_text()
    assert SECRET not in written and REDACTED in written
    dumped = yaml.safe_load(written)
    assert json.loads(dumped["args"]["storage_options"])["endpoint_url"] == "http://127.0.0.1:9"
    for name in ("job_report.json", "job_report.txt"):  # the uniform job report too
        assert SECRET not in (store / name).read_text()
    job = json.loads((store / "job_report.json").read_text())
    assert json.loads(job["config"]["storage_options"])["secret"] == REDACTED


def test_address_and_auth_mode_rules(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(RayRuntimeConfig()) is None
    assert cluster_address(RayRuntimeConfig(address="auto")) == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what the Jobs API gives a submitted job's driver
    assert cluster_address(RayRuntimeConfig()) == "10.0.0.5:6379"
    assert cluster_address(RayRuntimeConfig(address="local")) is None
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a job-API address never makes a job join
    assert cluster_address(RayRuntimeConfig()) is None
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert local_auth_mode(RayRuntimeConfig()) == "token"
    assert local_auth_mode(RayRuntimeConfig(auth_mode="disabled")) == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit environment wins, as in Ray
    assert local_auth_mode(RayRuntimeConfig()) == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "tokn")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE"):
        local_auth_mode(RayRuntimeConfig())


# The embedded Ray is started in a child process: its auth mode and token are process-wide in Ray,
# and this test session has its own Ray (the ray_local fixture).
_PROBE = textwrap.dedent("""
    import json, os, re, subprocess, sys, time, urllib.error, urllib.request
    repo, tmp, dash_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, repo)
    from cluster.config import RayRuntimeConfig
    from cluster.runtime import init_ray
    from cluster.report import JobMetrics, peak_memory

    ray = init_ray(RayRuntimeConfig(num_cpus=1, object_store_memory_mb=100, include_dashboard=True,
                                    dashboard_port=dash_port, temp_dir=tmp))

    @ray.remote(num_cpus=0.5)
    class Probe:
        def run(self):
            m = JobMetrics("security-test", "probe")
            m.processed(3); m.error("not an image: x.jpg"); m.throughput(1.5)
            return os.environ.get("RAY_AUTH_MODE"), bool(os.environ.get("RAY_AUTH_TOKEN")), peak_memory()

    probe = Probe.remote()
    mode, worker_has_token, mem = ray.get(probe.run.remote())
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    node = ray._private.worker._global_node

    def descendants():
        parent = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        out, grew = {os.getpid()}, True
        while grew:
            grew = False
            for p, pp in parent.items():
                if pp in out and p not in out:
                    out.add(p); grew = True
        return out

    listeners = None
    if len(sys.argv) > 4:
        pids = descendants()
        listeners = []
        for line in subprocess.run([sys.argv[4], "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
            if {int(x) for x in re.findall(r"pid=(\\d+)", line)} & pids:
                listeners.append([line.split()[3], re.findall(r'\\("([^"]+)"', line)])

    def get(url, tok=None):
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {tok}"} if tok else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, ""

    jobs_api = f"http://127.0.0.1:{dash_port}/api/jobs/"
    statuses = [get(jobs_api)[0], get(jobs_api, "0" * 64)[0], get(jobs_api, token)[0]]
    metrics, t1 = [], time.time()
    while time.time() - t1 < 30 and not metrics:
        code, text = get(f"http://127.0.0.1:{node.metrics_export_port}/metrics")
        metrics = [l for l in text.splitlines() if l.startswith("ray_reco_")] if code == 200 else []
        metrics or time.sleep(1)
    print("RESULT " + json.dumps({
        "node_ip": node.node_ip_address, "mode": mode, "worker_has_token": worker_has_token,
        "token_in_runtime_env": bool(token) and token in json.dumps(ray.get_runtime_context().runtime_env),
        "token_len": len(token), "listeners": listeners, "statuses": statuses, "metrics": metrics,
        "peak_rss": mem.get("rss")}), flush=True)
    ray.shutdown()
    # whatever Ray wrote (logs, session files) must not hold the token
    leaked = []
    for root, _, files in os.walk(tmp):
        for f in files:
            p = os.path.join(root, f)
            try:
                if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) < 20 * 2**20:
                    if token.encode() in open(p, "rb").read():
                        leaked.append(p)
            except OSError:
                pass
    print("LEAKED " + json.dumps(leaked), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    ss = shutil.which("ss")
    temp = tempfile.mkdtemp(prefix="rcs", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_metrics_report_interval_ms="1000", PYTHONPATH=str(REPO))
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    cmd = [sys.executable, str(script), str(REPO), temp, str(_free_port())] + ([ss] if ss else [])
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:  # never leave a Ray behind: the whole process group goes
            os.killpg(proc.pid, 9)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
    lines = {
        ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in out.splitlines() if ln.startswith(("RESULT ", "LEAKED "))
    }
    assert proc.returncode == 0 and "RESULT" in lines, out[-3000:]
    r = json.loads(lines["RESULT"])
    assert r["node_ip"] == "127.0.0.1"
    assert r["mode"] == "token" and r["worker_has_token"] and r["token_len"] == 64
    assert not r["token_in_runtime_env"]
    # the Jobs API (dashboard) refuses no token and a wrong token, accepts the cluster's
    assert r["statuses"] == [401, 403, 200]
    # Prometheus metrics from an actor through ray.util.metrics
    names = {m.split("{")[0] for m in r["metrics"]}
    assert {"ray_reco_items_total", "ray_reco_errors_total", "ray_reco_items_per_second"} <= names, r["metrics"]
    assert any('kind="not an image"' in m for m in r["metrics"])
    assert r["peak_rss"] > 10 * 2**20
    # the token was never written: not in Ray's files, not in ~/.ray
    assert json.loads(lines["LEAKED"]) == [] and not (home / ".ray" / "auth_token").exists()
    if not ss:
        pytest.skip("ss is not installed: listening sockets not checked")
    listeners = r["listeners"]
    owners = {name for _, names in listeners for name in names}
    assert {"gcs_server", "raylet"} <= owners, listeners  # the check saw Ray's servers
    loopback = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")
    assert all(addr.startswith(loopback) for addr, _ in listeners), listeners


def _sockets_of_tree(seen: dict) -> None:
    """Add the inet sockets of this process and all its descendants (Ray's GCS, raylet, workers,
    Ray Train's controller and workers) to ``seen``: (process name, kind, local, remote)."""
    import psutil  # Ray's own copy (ray/thirdparty_files), on the path once ray is imported

    me = psutil.Process()
    for p in [me] + me.children(recursive=True):
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                kind = "listen" if c.status == psutil.CONN_LISTEN else ("udp" if c.type == socket.SOCK_DGRAM else "tcp")
                seen.setdefault((name, kind, c.laddr.ip, c.raddr.ip if c.raddr else ""), c.laddr.port)
        except psutil.Error:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_training_listens_and_talks_on_loopback_only(ray_local, tmp_path, workers):
    """`reco train` on the embedded loopback-only Ray: every socket of the job's process tree,
    sampled every 0.1 s while Ray Train runs (process group, gloo pairs, checkpoints), is bound to
    127.0.0.1 and talks to 127.0.0.1 only. (It once had the torch rendezvous server on *:PORT.)"""
    import threading

    import psutil  # noqa: F401  (Ray's copy: fail here, not in the thread, if it is missing)
    import ray
    from test_train import TOY, write_pseudo_labels

    from cluster.train import TrainConfig, run_training

    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    labels = write_pseudo_labels(tmp_path, n=4)
    cfg = TrainConfig(**dict(TOY, num_workers=workers, iterations=4, checkpoint_every=2, log_every=2))
    seen: dict = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            _sockets_of_tree(seen)
            stop.wait(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        res = run_training(str(labels), str(tmp_path / "runs"), "lo", cfg)
    finally:
        stop.set()
        t.join()
    assert res.report["steps"] == 4
    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    owners = {name for name, kind, _, _ in seen if kind == "listen"}
    assert any("RayTrainWorker" in n for n in owners), owners  # the sampling saw the train workers
    if workers == 2:  # and their gloo connections to each other
        assert any("RayTrainWorker" in n and kind == "tcp" for n, kind, _, _ in seen), seen
    not_loopback = {k: port for k, port in seen.items() if k[2] not in loopback or (k[3] and k[3] not in loopback)}
    assert not not_loopback, not_loopback
