"""`reco submit | status | logs | stop | list` against a real Ray head with token auth, started by
the test on 127.0.0.1 (its own temp dir, ports and token) and stopped by its process group."""

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, process_tree

from cluster.submit import (
    WORKING_DIR_EXCLUDES,
    JobClient,
    SubmitError,
    Token,
    entrypoint,
    job_api_address,
    load_token,
    parse_env,
)
from jobs.cli import main

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


def _descendants(root: int) -> set:
    return process_tree(root) - {root}


@contextlib.contextmanager
def ray_head(token: str):
    """A Ray head on 127.0.0.1 with token auth, the dashboard / Jobs API on a free port, 1 CPU and
    a small object store. Stopped by killing its process group and every process it started (never
    `ray stop`, which would stop other people's Ray on this machine)."""
    temp = tempfile.mkdtemp(prefix="rch", dir="/tmp")  # short: unix socket paths are length-limited
    token_file = Path(temp) / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        HOME=temp,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep the node IP on loopback
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    dash = free_port()
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--port",
        "0",
        "--node-ip-address",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
        "--num-cpus",
        "1",
        "--object-store-memory",
        str(100 * 2**20),
        "--temp-dir",
        temp,
        "--disable-usage-stats",
    ]
    log = open(Path(temp) / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ray start failed:\n" + (Path(temp) / "head.log").read_text()[-3000:])
            req = urllib.request.Request(address + "/api/version", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "the Ray head did not answer in 120 s:\n" + (Path(temp) / "head.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield address, token_file
    finally:
        procs = _descendants(proc.pid) | {proc.pid}  # job drivers run in sessions of their own
        for pid in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in procs):
            time.sleep(0.2)
        for pid in procs | _descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


TOKEN = "f" * 16 + os.urandom(24).hex()


@pytest.fixture(scope="module")
def head():
    with ray_head(TOKEN) as h:
        yield h


@pytest.fixture
def with_token(head, monkeypatch):
    address, token_file = head
    for k in ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    # only the token path: this process's RAY_AUTH_MODE (Ray caches it process-wide) is left alone
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    return address


def _errors(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.slow
def test_submit_status_logs_list(with_token, capsys, caplog):
    address = with_token
    assert main(["submit", "--address", address, "--no-wait", "--entrypoint-num-cpus", "0.1", "search", "--help"]) == 0
    sub_id = capsys.readouterr().out.strip().splitlines()[0]
    assert sub_id.startswith("raysubmit_")
    info = JobClient(address).wait(sub_id, timeout=120)
    assert info.status == "SUCCEEDED", JobClient(address).logs(sub_id)[-2000:]
    assert info.entrypoint == "python -m jobs.cli search --help"
    wd = info.runtime_env["working_dir"]
    assert wd.startswith("gcs://") and info.runtime_env["excludes"] == WORKING_DIR_EXCLUDES
    assert main(["status", "--address", address, sub_id]) == 0
    out = capsys.readouterr().out
    assert sub_id in out and "SUCCEEDED" in out and "search" in out
    assert main(["logs", "--address", address, sub_id]) == 0
    assert "usage: reco search" in capsys.readouterr().out
    assert main(["logs", "--address", address, sub_id, "--follow"]) == 0  # a finished job: all, then return
    assert "usage: reco search" in capsys.readouterr().out
    assert main(["list", "--address", address]) == 0
    assert sub_id in capsys.readouterr().out
    assert main(["status", "--address", address]) == 0
    assert "job(s)" in capsys.readouterr().out
    caplog.clear()
    assert main(["status", "--address", address, "raysubmit_nosuchjob"]) == 2
    assert "no job 'raysubmit_nosuchjob'" in _errors(caplog)[0]
    assert TOKEN not in capsys.readouterr().out + caplog.text


@pytest.mark.slow
def test_failed_job_shows_its_exit_status_and_last_log_lines(with_token, capsys):
    # `reco search` without its query: argparse exits 2 on the cluster
    rc = main(["submit", "--address", with_token, "search"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "FAILED" in out and "FAILED with exit code 2" in err
    assert "--- last" in err and "the following arguments are required" in err


@pytest.mark.slow
def test_a_submitted_job_joins_the_cluster_with_its_token_and_can_be_stopped(with_token, capsys):
    """Inside a submitted job, init_ray joins the cluster (RAY_ADDRESS from the Jobs API) instead of
    starting a Ray of its own, with the job's runtime env vars merged without conflict."""
    client = JobClient(with_token)
    code = (
        "from cluster.config import resolve_cluster_config; from cluster.runtime import init_ray; "
        "ray = init_ray(resolve_cluster_config(None).ray); import os; "
        "print('NODES', len(ray.nodes()), ray.get_runtime_context().gcs_address, os.environ['RAY_AUTH_MODE'])"
    )
    sub = client._client.submit_job(
        entrypoint=f'python -c "{code}"',
        runtime_env={"working_dir": str(REPO), "excludes": WORKING_DIR_EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1"}},
    )
    long = client._client.submit_job(entrypoint="python -c 'import time; time.sleep(300)'")
    info = client.wait(sub, timeout=120)
    logs = client.logs(sub)
    assert info.status == "SUCCEEDED", logs[-2000:]
    line = [ln for ln in logs.splitlines() if ln.startswith("NODES")][0].split()
    assert line[1] == "1" and line[2].startswith("127.0.0.1:") and line[3] == "token"
    # stop a running job
    assert main(["stop", "--address", with_token, long]) == 0
    assert "STOPPED" in capsys.readouterr().out
    assert client.info(long).status == "STOPPED"
    assert main(["stop", "--address", with_token, long]) == 0
    assert "already ended" in capsys.readouterr().out


@pytest.mark.slow
def test_token_missing_or_wrong_is_refused_with_one_clear_line(head, tmp_path, monkeypatch, caplog):
    address, _ = head
    for k in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    assert main(["list", "--address", address]) == 2
    (msg,) = _errors(caplog)
    assert "rejected the token from RAY_AUTH_TOKEN" in msg and "0" * 64 not in msg
    # no token at all, in a fresh process (Ray caches tokens per process): refused before anything runs
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "submit", "--address", address, "search", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and "requires a token and none was found" in errors[0], r.stderr[-2000:]
    assert r.stdout.strip() == ""  # nothing was submitted


def test_unreachable_address_is_one_clear_line(caplog, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()  # nothing listens there
    assert main(["list", "--address", f"127.0.0.1:{port}"]) == 2
    (msg,) = _errors(caplog)
    assert f"cannot reach the Ray job API at http://127.0.0.1:{port}" in msg
    caplog.clear()
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["status"]) == 2
    assert "no cluster address" in _errors(caplog)[0]
    caplog.clear()
    assert main(["submit", "--address", "http://127.0.0.1:1", "no-such-job"]) == 2
    assert "unknown job 'no-such-job'" in _errors(caplog)[0]
    caplog.clear()
    assert main(["submit", "--address", "http://127.0.0.1:1", "--env", "AWS_SECRET_ACCESS_KEY=x", "embed"]) == 2
    assert "credentials are not sent with a job" in _errors(caplog)[0]


def test_address_token_and_entrypoint_rules(tmp_path, monkeypatch):
    env = {}
    with pytest.raises(SubmitError, match="no cluster address"):
        job_api_address(None, env)
    assert job_api_address("head", env) == "http://head:8265"
    assert job_api_address("10.0.0.1:8266/", env) == "http://10.0.0.1:8266"
    assert job_api_address("https://ray.example.com", env) == "https://ray.example.com:8265"
    assert job_api_address(None, {"RAY_ADDRESS": "http://a:1", "RAY_API_SERVER_ADDRESS": "http://b:2"}) == "http://b:2"
    assert job_api_address("http://c:3", {"RAY_ADDRESS": "http://a:1"}) == "http://c:3"  # the flag wins
    for bad in ("auto", "ray://head:10001", "ftp://x"):
        with pytest.raises(SubmitError):
            job_api_address(bad, env)
    # tokens: the environment value, then the file it names, then ~/.ray/auth_token; never shown
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    assert load_token({"HOME": str(home)}) is None
    (home / ".ray" / "auth_token").write_text("tok-default\n")
    assert load_token({"HOME": str(home)}) == Token("tok-default", str(home / ".ray" / "auth_token"))
    f = tmp_path / "tok"
    f.write_text("tok-file")
    assert load_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(f)}).value == "tok-file"
    t = load_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(f), "RAY_AUTH_TOKEN": "tok-env"})
    assert t.value == "tok-env" and "tok-env" not in repr(t)
    assert load_token({"HOME": str(home), "RAY_AUTH_TOKEN": "x", "RAY_AUTH_MODE": "disabled"}).value == "x"
    assert load_token({"HOME": str(home), "RAY_AUTH_MODE": "disabled"}) is None  # not the default file then
    with pytest.raises(SubmitError, match="cannot read the token file"):
        load_token({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    assert (
        entrypoint("embed", ["s3://b/x y", "--store", "runs/s"])
        == "python -m jobs.cli embed 's3://b/x y' --store runs/s"
    )
    assert parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    for bad in ("NOEQUALS", "MY_TOKEN=1", "DB_PASSWORD=x", "AWS_ACCESS_KEY_ID=x"):
        with pytest.raises(SubmitError):
            parse_env([bad])


def test_working_dir_excludes_keep_the_code_and_drop_the_rest(tmp_path):
    """The excludes are applied by Ray's own packaging code: what a job would upload."""
    from ray._private.runtime_env.packaging import _get_excludes

    match = _get_excludes(REPO, WORKING_DIR_EXCLUDES)
    for keep in (
        "jobs/cli.py",
        "jobs/data/voc_exemplars.yaml",
        "configs/cluster.yaml",
        "cluster/submit.py",
        "pyproject.toml",
        "index/data",
    ):
        assert not match(REPO / keep), keep
    for drop in (
        ".venv/bin/python",
        ".git/HEAD",
        "outputs/demo/index.html",
        "runs/store/manifest.json",
        "data/corpus/a.jpg",
        "cluster/__pycache__/x.pyc",
        "reco_cluster.egg-info/PKG-INFO",
        "weights/model.safetensors",
    ):
        assert match(REPO / drop), drop


def test_submit_retries_while_the_head_has_no_job_agent_and_nothing_else(monkeypatch, caplog):
    """A head that is starting (or loaded) answers 500 "No available agent to submit job": nothing
    was submitted, so `reco submit` waits for the agent (bounded) instead of failing; any other
    refusal is one error at once."""
    import cluster.submit as sub

    class FakeRayClient:
        def __init__(self, failures, message):
            self.calls, self.failures, self.message = 0, failures, message

        def submit_job(self, **kwargs):
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError(f"Request failed with status code 500: {self.message}")
            return "raysubmit_ok"

    monkeypatch.setattr(sub.time, "sleep", lambda s: None)
    client = object.__new__(sub.JobClient)
    client.address = "http://127.0.0.1:8265"
    client._client = FakeRayClient(2, "No available agent to submit job, please try again later.")
    with caplog.at_level("WARNING"):
        assert client._submit_retrying({"entrypoint": "true"}) == "raysubmit_ok"
    assert client._client.calls == 3 and "no job agent yet" in caplog.text
    client._client = FakeRayClient(99, "No available agent to submit job, please try again later.")
    with pytest.raises(sub.SubmitError, match="No available agent"):
        client._submit_retrying({"entrypoint": "true"}, wait_s=5.0)  # bounded: gives up after the wait
    client._client = FakeRayClient(1, "runtime_env working_dir is too large")
    with pytest.raises(sub.SubmitError, match="too large"):
        client._submit_retrying({"entrypoint": "true"})
    assert client._client.calls == 1
