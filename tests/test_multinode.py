"""Faults survived on a two-node Ray cluster on loopback (#9 item 4).

The test makes the cluster itself: a head (``ray start --head``: GCS, dashboard, state and Jobs
API, no CPUs, so it runs only the job drivers, like the launcher config's ``CPU: 0`` head) and a
worker node (``ray start --address``: 2 CPUs, a temp dir of its own), both on 127.0.0.1 with
token auth, each ``ray start --block`` in a process group of its own. Every job runs as a
subprocess (``python -m jobs.cli JOB ...`` with ``RAY_ADDRESS`` and the token, or ``reco
submit``), so the test process's own Ray is never touched. In the middle of each job -- once it
has committed something and while its actors are alive on the worker (checked with the state
API) -- the worker node is killed (SIGKILL of its raylet, workers and agents: its whole process
tree) and a replacement worker is started (what an autoscaler does). The job must finish (Ray
Data actor restarts and task retries, bank actors with ``max_restarts``) or, failing as a whole,
finish on rerun; afterwards every input id is committed exactly once and nothing partial is
visible. Ray's own retries (actor restarts, task attempts) are read from the state API and
printed with the figures (``pytest -s``). Never ``ray stop``: it would stop other people's Ray on
this machine. The four jobs run in pipeline order (embed, build-bank, pseudo-label with that bank,
train on those pseudo-labels); each test also runs alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from conftest import REPO, TINY_VIT, free_port, make_image, process_tree, write_corrupt_files

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
#: the longest any single wait of these tests may take (a node start, a job, a poll)
WAIT_S = 150
#: Ray's own CLI entry point, for a worker node that stays on 127.0.0.1. On Linux, `ray start`
#: swaps 127.0.0.1 for the machine's network address, and its only switch against that
#: (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which every process here gets, as the embedded Ray of
#: cluster/runtime.py does) also refuses to join a cluster; here the join is allowed and the
#: address kept, in this one process. Everything else is plain `ray start`.
RAY_START_ON_LOOPBACK = (
    "import sys\n"
    "from ray._private import ray_constants, services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "ray_constants.ENABLE_RAY_CLUSTER = True\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "sys.exit(main())\n"
)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc``, its process group and every process below it, all at once (a lost
    machine gets no chance to clean up). Returns how many processes were killed."""
    pids = process_tree(proc.pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return len(pids)


def wait_for(
    what: str,
    check: Callable[[], object],
    timeout: float = WAIT_S,
    every: float = 0.25,
    fail: Optional[Callable[[], str]] = None,
):
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{fail()}" if fail else ""))
        time.sleep(every)


class LoopbackCluster:
    """A Ray cluster of several nodes on 127.0.0.1 with token auth, made of ``ray start --block``
    processes (one process group each) and taken down by killing them, never with ``ray stop``."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="rcm", dir="/tmp"))  # short: unix socket paths are limited
        self.token = secrets.token_hex(32)
        self.token_file = self.root / "auth_token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.gcs_port = free_port()
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.nodes: Dict[str, subprocess.Popen] = {}
        self.node_ids: Dict[str, str] = {}
        self._logs: List = []

    # -- processes -----------------------------------------------------------------------
    def env(self, **extra: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            HF_HUB_OFFLINE="1",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # node IPs stay on loopback
            PYTHONPATH=str(REPO),
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        env.update(extra)
        return env

    def _start(self, name: str, args: List[str], head: bool = False, **env: str) -> subprocess.Popen:
        temp = self.root / name
        temp.mkdir()
        log = open(self.root / f"{name}.log", "w")
        self._logs.append(log)
        ray = [str(RAY)] if head else [sys.executable, "-c", RAY_START_ON_LOOPBACK]
        cmd = [
            *ray,
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(temp),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--object-store-memory",
            str(80 * 2**20),
            "--disable-usage-stats",
            *args,
        ]
        proc = subprocess.Popen(
            cmd, env=self.env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
        )
        self.nodes[name] = proc
        return proc

    def log(self, name: str, tail: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.root / f"{name}.log").read_text()[-tail:]
        return ""

    def start_head(self) -> None:
        """The head: GCS, dashboard + state API + Jobs API on loopback, no CPU (drivers only).
        Fast node-death detection (health checks every 0.5 s, dead after 3 misses)."""
        port = self.dashboard.rsplit(":", 1)[1]
        proc = self._start(
            "head",
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--num-cpus",
                "0",
                "--num-gpus",
                "0",
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                port,
                "--ray-client-server-port",
                str(free_port()),
            ],
            head=True,
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="500",
            RAY_health_check_timeout_ms="500",
            RAY_health_check_failure_threshold="3",
        )
        wait_for("the Ray head's API", lambda: proc.poll() is not None or self._api_ok(), fail=lambda: self.log("head"))
        assert proc.poll() is None, "ray start --head failed:\n" + self.log("head")

    def add_worker(self, name: str, cpus: int = 2) -> str:
        """A worker node with ``cpus`` CPUs and a resource named after it; returns its node id."""
        self.start_worker(name, cpus)
        return self.joined(name)

    def start_worker(self, name: str, cpus: int = 2) -> None:
        self._start(
            name,
            [
                "--address",
                f"127.0.0.1:{self.gcs_port}",
                "--num-cpus",
                str(cpus),
                "--num-gpus",
                "0",
                "--resources",
                json.dumps({name: 1}),
            ],
        )

    def joined(self, name: str) -> str:
        """Wait until worker ``name`` is alive in the GCS; returns its node id."""
        proc = self.nodes[name]

        def joined():
            if proc.poll() is not None:
                raise AssertionError(f"ray start ({name}) exited:\n" + self.log(name))
            return next(
                (
                    n["node_id"]
                    for n in self.list("nodes")
                    if n.get("state") == "ALIVE" and name in (n.get("resources_total") or {})
                ),
                None,
            )

        self.node_ids[name] = wait_for(f"node {name} to join", joined, fail=lambda: self.log(name))
        return self.node_ids[name]

    def kill(self, name: str) -> int:
        return _kill_tree(self.nodes.pop(name))

    def node_state(self, name: str) -> Optional[str]:
        node_id = self.node_ids[name]
        return next((n.get("state") for n in self.list("nodes") if n["node_id"] == node_id), None)

    def close(self) -> None:
        for name in list(self.nodes)[::-1]:  # workers first, the head last
            self.kill(name)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the state API (plain HTTP with the token: the test process never joins this cluster) --
    def _get(self, path: str, timeout: float = 10):
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def _api_ok(self) -> bool:
        try:
            self._get("/api/version", timeout=5)
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def list(self, kind: str, detail: bool = False) -> List[dict]:
        """Rows of the state API (``nodes``, ``actors``, ``tasks``, ...); [] while it does not answer."""
        try:
            data = self._get(f"/api/v0/{kind}?limit=10000&detail={str(detail).lower()}", timeout=30)
        except (urllib.error.URLError, OSError, ValueError):
            return []
        return data.get("data", {}).get("result", {}).get("result", []) or []

    def job_env(self, **extra: str) -> Dict[str, str]:
        """The environment of a job driver joining this cluster (as `reco submit` gives its jobs)."""
        return self.env(RAY_ADDRESS=f"127.0.0.1:{self.gcs_port}", **extra)


# -- the cluster, the inputs and one job run -------------------------------------------------

#: per-stage settings of the jobs on the two-node cluster: actors small enough that a 2-CPU worker
#: holds a stage, and each actor holds its work long enough to be killed in the middle of it (the
#: test-only fault hooks of tests/fault_hooks.py, loaded in every worker through RECO_FAULT_HOOKS)
#: the env_vars entry that loads tests/fault_hooks.py in every worker
HOOKS = f"RECO_FAULT_HOOKS: '{REPO / 'tests' / 'fault_hooks.py'}'"
CLUSTER_YAML = f"""\
ray:
  env_vars:
    HF_HUB_OFFLINE: "1"
    {HOOKS}
    RECO_TEST_EMBED_DELAY_S: "0.5"
    RECO_TEST_BANK_DELAY_S: "0.7"
    RECO_TEST_SEGMENT_DELAY_S: "0.5"
bank: {{num_actors: 2, cpus_per_actor: 0.5}}
segment: {{num_actors: 1, cpus_per_actor: 0.5, batch_size: 2}}
embed: {{num_actors: 1, cpus_per_actor: 0.5, batch_size: 4}}
"""
#: figures of every kill test, printed at the end of the module (pytest -s) for the closing note
FIGURES: List[dict] = []
#: outputs handed down the pipeline: the bank of the build-bank test (the pseudo-label test labels
#: with it) and those pseudo-labels (the train test trains on them); run alone, a test makes small
#: ones of its own
BUILT: Dict[str, Path] = {}


class Workers:
    """The cluster with one live worker node at a time: ``current`` is killed by a test and
    replaced by the next (``w1``, ``w2``, ...), as an autoscaler replaces a lost machine."""

    def __init__(self, cluster: LoopbackCluster):
        self.cluster = cluster
        self.count = 0
        self.current: Optional[str] = None

    def ensure(self) -> str:
        """The live worker node (a new one when the last is gone)."""
        if self.current is None or self.cluster.node_state(self.current) != "ALIVE":
            self.replace()
            self.joined()
        return self.current

    def replace(self) -> str:
        """Start the next worker node (without waiting for it: see :meth:`joined`)."""
        self.count += 1
        self.current = f"w{self.count}"
        self.cluster.start_worker(self.current)
        return self.current

    def joined(self) -> str:
        return self.cluster.joined(self.current)


@pytest.fixture(scope="module")
def workers():
    cluster = LoopbackCluster()
    try:
        t0 = time.monotonic()
        cluster.start_head()
        w = Workers(cluster)
        w.ensure()
        print(f"\ntwo-node loopback cluster up in {time.monotonic() - t0:.1f}s", flush=True)
        yield w
    finally:
        cluster.close()
    if FIGURES:
        print("\nMULTINODE FIGURES\n" + "\n".join(json.dumps(f) for f in FIGURES), flush=True)


@pytest.fixture(scope="module")
def ray_config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("mncfg") / "cluster.yaml"
    p.write_text(CLUSTER_YAML)
    return p


class Job:
    """``python -m jobs.cli ARGS`` as a driver on the cluster's head (a process group of its own)."""

    def __init__(self, cluster: LoopbackCluster, args: List[str], log: Path):
        self.cluster, self.args, self.log = cluster, [str(a) for a in args], log
        self.proc: Optional[subprocess.Popen] = None
        self.exit_codes: List[int] = []

    def start(self) -> "Job":
        with open(self.log, "a") as fh:
            fh.write(f"\n=== attempt {len(self.exit_codes) + 1}: reco {' '.join(self.args)}\n")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", *self.args],
                cwd=REPO,
                env=self.cluster.job_env(),
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"job did not finish in {timeout:.0f}s:\n{self.tail()}") from None
        self.exit_codes.append(rc)
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _kill_tree(self.proc)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def ray_retries(cluster: LoopbackCluster, job_id: Optional[str]) -> dict:
    """Ray's own retries in one job: actor restarts and task attempts after the first."""
    actors = [a for a in cluster.list("actors", detail=True) if a.get("job_id") == job_id]
    tasks = [t for t in cluster.list("tasks", detail=True) if t.get("job_id") == job_id]
    retried = [t for t in tasks if int(t.get("attempt_number") or 0) > 0]
    return {
        "actor_restarts": sum(int(a.get("num_restarts") or 0) for a in actors),
        "actors_restarted": sorted({a["class_name"] for a in actors if int(a.get("num_restarts") or 0)}),
        "task_retries": len(retried),
        "tasks_retried": len({t["task_id"] for t in retried}),
        "retried": sorted({t["name"] for t in retried}),
    }


def kill_worker_mid_job(workers: Workers, job: Job, actor: str, progress: Callable[[], int], total: int) -> dict:
    """Run ``job``; once it has committed something (``progress() > 0``, out of ``total``) and an
    actor whose class name contains ``actor`` is alive on the worker node, kill that node and
    start a replacement node (as an autoscaler does). The job must then finish, else it is rerun
    (at most twice). Returns the figures of the run."""
    cluster = workers.cluster
    victim = workers.ensure()
    t0 = time.monotonic()
    job.start()
    try:

        def started():
            if not job.running:
                raise AssertionError(f"the job ended before the kill (exit {job.proc.returncode}):\n{job.tail()}")
            return progress() > 0

        wait_for("the job's first commit", started, fail=job.tail)
        first_commit_s = time.monotonic() - t0
        on_victim = wait_for(
            f"a {actor} actor alive on {victim}",
            lambda: [
                a
                for a in cluster.list("actors", detail=True)
                if actor in a.get("class_name", "")
                and a.get("state") == "ALIVE"
                and a.get("node_id") == cluster.node_ids[victim]
            ],
            fail=job.tail,
        )
        t_kill = time.monotonic()
        killed = cluster.kill(victim)
        done_at_kill = progress()
        assert done_at_kill < total, "the job had finished its work before the node was killed: nothing proven"
        workers.replace()  # the replacement machine boots while the GCS notices the loss
        wait_for(f"the GCS to mark {victim} dead", lambda: cluster.node_state(victim) == "DEAD", timeout=60)
        dead_s = time.monotonic() - t_kill
        alive_after_kill = job.running
        workers.joined()
        join_s = time.monotonic() - t_kill
        rc = job.wait()
        while rc != 0 and len(job.exit_codes) < 3:  # failed as a whole: the rerun resumes
            job.start()
            rc = job.wait()
        assert rc == 0, job.tail()
        after_kill_s = time.monotonic() - t_kill
    finally:
        job.stop()
    job_id = on_victim[0].get("job_id")
    return {
        "killed_node": victim,
        "processes_killed": killed,
        "actors_on_it": sorted({a["class_name"] for a in on_victim}),
        "committed_at_kill": done_at_kill,
        "inputs": total,
        "driver_survived": alive_after_kill,
        "node_dead_after_s": round(dead_s, 1),
        "replacement_up_after_s": round(join_s, 1),
        "job_attempts": len(job.exit_codes),
        "exit_codes": job.exit_codes,
        "job_seconds": round(time.monotonic() - t0, 1),
        "first_commit_after_s": round(first_commit_s, 1),
        "kill_to_end_s": round(after_kill_s, 1),
        **ray_retries(cluster, job_id),
    }


def _no_temp_files(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(".tmp"))


def _images(root: Path, n: int, size=(48, 40), bad: bool = True) -> Path:
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        make_image(1000 + i, size).save(sub / f"{i // 2:04d}.png")
    if bad:
        write_corrupt_files(root / "bad")
    return root


# -- the tests ---------------------------------------------------------------------------


def test_submit_a_small_job_to_the_two_node_cluster(workers, tiny_clip_dir, tmp_path):
    """`reco submit` (Jobs API, token auth) runs a small embedding job on the cluster: the driver
    on the head, its actor on the worker node; the wall time from submit to the job's end is the
    closing note's figure."""
    from index.store import EmbeddingStore

    cluster = workers.cluster
    node = workers.ensure()
    src = _images(tmp_path / "src", 4, bad=False)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("embed: {num_actors: 1, cpus_per_actor: 0.5, batch_size: 4}\n")
    store = tmp_path / "store"
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "submit",
            "--address",
            cluster.dashboard,
            "embed",
            str(src),
            "--store",
            str(store),
            "--clip-model",
            f"local-dir:{tiny_clip_dir}",
            "--decode-cpus",
            "0.5",
            "--ray-config",
            str(cfg),
        ],
        cwd=REPO,
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sub_id = r.stdout.strip().splitlines()[0]
    assert sub_id.startswith("raysubmit_") and cluster.token not in r.stdout + r.stderr
    assert sorted(EmbeddingStore(store).committed_ids()) == ["a/0000.png", "a/0001.png", "b/0000.png", "b/0001.png"]
    actors = [a for a in cluster.list("actors", detail=True) if "ClipEmbedUDF" in a.get("class_name", "")]
    assert actors and {a["node_id"] for a in actors} == {cluster.node_ids[node]}
    FIGURES.append({"stage": "submit", "submission_id": sub_id, "inputs": 4, "submit_to_end_s": round(seconds, 1)})


def check_job_report(out, fig: dict, kind: str = "actor restart") -> None:
    """The job's own report (job_report.json) exists, counts the inputs and, when one attempt
    finished the job, the actor restarts Ray made after the kill."""
    rep = json.loads((out / "job_report.json").read_text())
    fig["report_retries"] = rep["retries"]["total"]
    assert rep["inputs"]["failed_transient"] == 0, rep["inputs"]
    if fig.get("job_attempts") == 1:
        assert rep["retries"]["total"] >= 1, rep["retries"]
        assert any(k.startswith(kind) for k in rep["retries"]["by_reason"]), rep["retries"]


def test_embed_survives_losing_the_worker_node(workers, ray_config, tiny_clip_dir, tmp_path):
    """`reco embed` (Ray Data: decode tasks + a CLIP actor pool) loses the node running its actor
    and its decode tasks after the first shard is committed; Ray restarts the actor on the
    replacement node and retries its tasks; every listed input is in the store exactly once."""
    from index.sources import list_folder
    from index.store import EmbeddingStore

    src = _images(tmp_path / "src", 40, size=(40, 30))
    listed = [i.id for i in list_folder(str(src))]
    store_dir = tmp_path / "store"

    def shards() -> int:
        with contextlib.suppress(OSError, ValueError):
            m = json.loads((store_dir / "manifest.json").read_text())
            return sum(s["count"] + s["skipped"] for s in m["shards"])
        return 0

    job = Job(
        workers.cluster,
        [
            "embed",
            src,
            "--store",
            store_dir,
            "--clip-model",
            f"local-dir:{tiny_clip_dir}",
            "--shard-size",
            8,
            "--decode-cpus",
            1,
            "--ray-config",
            ray_config,
        ],
        tmp_path / "job.log",
    )
    fig = kill_worker_mid_job(workers, job, "ClipEmbedUDF", shards, len(listed))

    store = EmbeddingStore(store_dir)
    import pyarrow.parquet as pq

    rows = []  # every committed row, embedded or skipped: a duplicate would show here
    for s in store.shards:
        rows += pq.read_table(store._path("metadata", s), columns=["id"]).column(0).to_pylist()
        rows += pq.read_table(store._path("skipped", s), columns=["id"]).column(0).to_pylist()
    fig.update(
        stage="embed",
        lost=len(set(listed) - set(rows)),
        duplicated=len(rows) - len(set(rows)),
        unexpected=len(set(rows) - set(listed)),
    )
    FIGURES.append(fig)
    assert fig["lost"] == 0 and fig["duplicated"] == 0 and fig["unexpected"] == 0, fig
    assert set(store.skipped()) == {"bad/empty.jpg", "bad/garbage.jpg", "bad/truncated.jpg"}
    emb, ids, _ = store.load_all()
    assert emb.shape == (len(listed) - 3, 32) and sorted(ids) == sorted(set(listed) - set(store.skipped()))
    # nothing partial: no temporary file, and every shard file on disk is one the manifest names
    assert _no_temp_files(store_dir) == []
    named = {
        f"{kind}_{s.name}{'.npy' if kind == 'img_emb' else '.parquet'}"
        for s in store.shards
        for kind in ("img_emb", "metadata", "skipped")
    }
    on_disk = {f.name for sub in ("img_emb", "metadata", "skipped") for f in (store_dir / sub).iterdir()}
    assert on_disk == named
    report = json.loads((store_dir / "embed_report.json").read_text())
    assert report["failed_transient_count"] == 0 and report["embedded"] + report["skipped_count"] == len(listed)
    assert not (store_dir / "writer.lock").exists()
    assert fig["actor_restarts"] >= 1, fig  # the actor really was on the killed node
    check_job_report(store_dir, fig)


def test_build_bank_survives_losing_the_worker_node(workers, ray_config, tiny_dense_path, tmp_path):
    """`reco build-bank` (a pool of 2 bank actors with max_restarts / max_task_retries) loses both
    actors with their node after its first part is committed; they are recreated on the
    replacement and the concepts in flight are built again; every concept is committed once."""
    from cluster.bank_parts import PARTS_DIR, committed
    from index.storage import load_bank

    names = [f"concept {i:02d}" for i in range(16)]
    ex = tmp_path / "exemplars"
    for i, n in enumerate(names):
        (ex / n).mkdir(parents=True)
        for k in range(2):
            make_image(10 * i + k, (64, 64)).save(ex / n / f"{k}.png")
    write_corrupt_files(ex / "ghost")  # a concept whose archive is only bad files: fails alone, once
    vocab = tmp_path / "names.txt"
    vocab.write_text("\n".join(names + ["ghost"]) + "\n")
    cfg = tmp_path / "bank.yaml"
    cfg.write_text("bank:\n  image_size: 64\n  context_elimination: false\n")
    out = tmp_path / "bank"
    listed = names + ["ghost"]

    def part_rows() -> int:
        n = 0
        for part in (out / PARTS_DIR).glob("part-*.safetensors") if (out / PARTS_DIR).is_dir() else []:
            with contextlib.suppress(OSError, ValueError, KeyError):
                from reco.bank import safetensors_metadata

                n += len(json.loads(safetensors_metadata(part.read_bytes())["reco_bank_part"]))
        return n

    job = Job(
        workers.cluster,
        [
            "build-bank",
            "--vocab",
            vocab,
            "--exemplars",
            ex,
            "--out",
            out,
            "--config",
            cfg,
            "--dense-encoder",
            "dino_vits16",
            "--dense-weights",
            tiny_dense_path,
            "--dense-kwargs",
            json.dumps(TINY_VIT),
            "--commit-every",
            2,
            "--ray-config",
            ray_config,
        ],
        tmp_path / "job.log",
    )
    fig = kill_worker_mid_job(workers, job, "BankWorker", part_rows, len(listed))

    rows, refs, _ = committed(str(out))  # raises if a concept was committed twice
    n_rows = part_rows()
    got = [r["name"] for r in rows.values() if r["kind"] == "target"]
    fig.update(
        stage="build-bank",
        lost=len(set(listed) - set(got)),
        duplicated=n_rows - len(set(got)),
        unexpected=len(set(got) - set(listed)),
    )
    FIGURES.append(fig)
    assert fig["lost"] == 0 and fig["duplicated"] == 0 and fig["unexpected"] == 0, fig
    assert rows["target:ghost"]["status"] == "failed" and rows["target:ghost"]["error"], rows["target:ghost"]
    assert all(rows[f"target:{n}"]["status"] == "ok" for n in names)
    bank = load_bank(str(out))  # the assembled bank loads: vocabulary order, one reference each
    assert list(bank.names) == names and bank.references.shape[0] == len(names)
    import pyarrow.parquet as pq

    table = pq.read_table(out / "concepts.parquet")
    assert sorted(table.column("name").to_pylist()) == sorted(listed)
    assert _no_temp_files(out) == [] and not (out / "writer.lock").exists()
    assert fig["actor_restarts"] >= 1, fig
    check_job_report(out, fig)
    BUILT["bank"] = out


def test_pseudo_label_survives_losing_the_worker_node(workers, ray_config, tiny_dense_path, tmp_path):
    """`reco pseudo-label` (Ray Data actor pool of segmenters writing label PNGs) loses its actor
    with its node after the first manifest part; the batches in flight are segmented again on the
    replacement and rewritten under the same names; every input id has exactly one manifest row,
    and every label it names decodes."""
    from cluster.pseudo_label import MANIFEST_DIR, committed_rows
    from index.labels import decode_labels
    from index.sources import list_folder
    from index.storage import load_bank, save_bank
    from reco import BankConfig, ConceptBank, ConceptBuilder
    from reco.encoders import create_dense_encoder

    bank_dir = BUILT.get("bank")
    if bank_dir is None:  # run alone: a small bank of the same kind
        dense = create_dense_encoder("dino_vits16", tiny_dense_path, **TINY_VIT)
        imgs = [make_image(i, (64, 64)) for i in range(6)]
        bank_dir = save_bank(
            ConceptBank.build(
                {"cat": imgs[:2], "dog": imgs[2:4], "sky": imgs[4:]},
                ConceptBuilder(dense, None, BankConfig(image_size=64, context_elimination=False)),
            ),
            str(tmp_path / "bank"),
        )
    n_classes = len(load_bank(str(bank_dir)).names)
    src = _images(tmp_path / "src", 20)
    listed = [i.id for i in list_folder(str(src))]
    out = tmp_path / "labels"

    def rows() -> int:
        with contextlib.suppress(OSError, ValueError):
            return len(committed_rows(str(out)))
        return 0

    job = Job(
        workers.cluster,
        [
            "pseudo-label",
            src,
            "--bank",
            bank_dir,
            "--out",
            out,
            "--commit-every",
            4,
            "--dense-weights",
            tiny_dense_path,
            "--dense-kwargs",
            json.dumps(TINY_VIT),
            "--ray-config",
            ray_config,
        ],
        tmp_path / "job.log",
    )
    fig = kill_worker_mid_job(workers, job, "SegmentUDF", rows, len(listed))

    got = committed_rows(str(out))
    ids = [r["id"] for r in got]
    fig.update(
        stage="pseudo-label",
        lost=len(set(listed) - set(ids)),
        duplicated=len(ids) - len(set(ids)),
        unexpected=len(set(ids) - set(listed)),
    )
    FIGURES.append(fig)
    assert fig["lost"] == 0 and fig["duplicated"] == 0 and fig["unexpected"] == 0, fig
    ok = [r for r in got if r["status"] == "ok"]
    assert len(ok) == 20 and {r["id"] for r in got if r["status"] == "skipped"} == {
        "bad/empty.jpg",
        "bad/garbage.jpg",
        "bad/truncated.jpg",
    }
    for r in ok:  # every label the manifest names is whole
        lab = decode_labels((out / r["label"]).read_bytes())
        assert lab.shape == (r["height"], r["width"]) and lab.max() < n_classes
    labels_on_disk = {str(p.relative_to(out)) for p in (out / "labels").rglob("*") if p.is_file()}
    assert {r["label"] for r in ok} <= labels_on_disk
    leftovers = _no_temp_files(out)  # a write cut by the kill leaves a hidden temp file, never a label
    assert all(Path(t).name.startswith(".") for t in leftovers) and not any(
        t in {r["label"] for r in ok} for t in leftovers
    )
    fig["temp_files_left"] = len(leftovers)
    assert json.loads((out / "report.json").read_text())["failed_count"] == 0
    assert len(list((out / MANIFEST_DIR).glob("part-*.parquet"))) >= 2
    assert fig["actor_restarts"] >= 1, fig
    check_job_report(out, fig)
    BUILT["labels"] = out


#: a tiny ReCo+ run: 2 Ray Train workers (gloo, half a CPU each) on the worker node
TRAIN_YAML = """\
train:
  encoder: tu-mobilenetv3_small_050
  output_stride: 16
  decoder_channels: 32
  iterations: 40
  batch_size: 4
  crop_size: 48
  base_size: 56
  checkpoint_every: 10
  log_every: 2
  num_workers: 2
  loader_workers: 0
  cpus_per_worker: 0.5
  max_failures: 3
"""


def _toy_pseudo_labels(root: Path, n: int = 8) -> Path:
    """A `reco pseudo-label` output of n images with 3 classes (for the train test run alone)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.pseudo_label import COLUMNS
    from index.labels import encode_labels

    rows = []
    for i in range(n):
        iid = f"{i:04d}.png"
        img = root / "images" / iid
        img.parent.mkdir(parents=True, exist_ok=True)
        make_image(500 + i, (48, 40)).save(img)
        (root / "out" / "labels").mkdir(parents=True, exist_ok=True)
        (root / "out" / "labels" / iid).write_bytes(encode_labels(np.random.default_rng(i).integers(0, 3, (40, 48))))
        rows.append(
            {c: "" for c in COLUMNS}
            | {
                "id": iid,
                "uri": str(img),
                "status": "ok",
                "label": f"labels/{iid}",
                "width": 48,
                "height": 40,
                "classes": "[0, 1, 2]",
                "shares": "[]",
                "mean_confidence": 0.5,
                "seconds": 0.0,
            }
        )
    (root / "out" / "manifest").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "out" / "manifest" / "part-00000-00000000.parquet")
    (root / "out" / "pseudo_label.json").write_text(json.dumps({"classes": ["a", "b", "c"], "config_hash": "toy"}))
    return root / "out"


def test_train_survives_losing_the_worker_node(workers, ray_config, tmp_path):
    """`reco train` (Ray Train: a controller on the head, 2 DDP workers on the worker node,
    FailureConfig(max_failures)) loses both workers with their node after its first checkpoint;
    Ray Train restarts the worker group on the replacement from the latest checkpoint; every step
    is trained and logged exactly once, and the exported model loads. Trained on the pseudo-labels
    of the test above (a toy set when run alone)."""
    from index.outputs import load_segmodel

    labels = BUILT.get("labels") or _toy_pseudo_labels(tmp_path / "pl")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(TRAIN_YAML)
    iterations, log_every, every = 40, 2, 10
    run = tmp_path / "runs" / "mn"

    def checkpointed_step() -> int:
        """The step of the latest checkpoint Ray Train has registered (a checkpoint folder alone is
        not one: the controller takes it once every rank has reported it)."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
            return int(snap["latest_checkpoint_result"]["metrics"]["step"])
        return 0

    job = Job(
        workers.cluster,
        ["train", labels, "--name", "mn", "--storage", tmp_path / "runs", "--config", cfg, "--ray-config", ray_config],
        tmp_path / "job.log",
    )
    fig = kill_worker_mid_job(workers, job, "TrainWorker", checkpointed_step, iterations)

    rep = json.loads((run / "train_report.json").read_text())
    logged = [h["step"] for h in rep["history"]]
    want = list(range(log_every, iterations + 1, log_every))
    fig.update(
        stage="train",
        inputs=f"{iterations} steps",
        lost=len(set(want) - set(logged)),
        duplicated=len(logged) - len(set(logged)),
        unexpected=len(set(logged) - set(want)),
        train_attempts=[a["start_step"] for a in rep["attempts"]],
        worker_group_restarts=job.tail(10**7).count("[FailurePolicy] RETRY"),
    )
    FIGURES.append(fig)
    assert fig["lost"] == 0 and fig["duplicated"] == 0 and fig["unexpected"] == 0, fig
    assert rep["steps"] == iterations and logged == want
    starts = [a["start_step"] for a in rep["attempts"]]
    # resumed from the checkpoint registered at the kill (or one reported just before it), not from 0
    at_kill = fig["committed_at_kill"]
    assert len(starts) >= 2 and starts[0] == 0 and at_kill <= starts[-1] <= at_kill + every, starts
    assert fig["worker_group_restarts"] >= 1
    check_job_report(run, fig, kind="restart from checkpoint")
    for c in rep["checkpoints"]:  # every checkpoint the report names is whole
        assert {"model.safetensors", "state.json"} <= {p.name for p in (run / c["name"]).iterdir()}, c
    model = load_segmodel(str(run))
    labels_out, names = model.predict(make_image(7, (48, 40)))
    assert labels_out.shape == (40, 48) and len(names) == len(
        json.loads((Path(labels) / "pseudo_label.json").read_text())["classes"]
    )
    assert _no_temp_files(run) == []


# -- #17.7: the index in parts and the exact retrieval pass lose the worker node -----------------


def _kill_when_task_on_worker(workers: Workers, job: Job, task: str, progress: Callable[[], int]) -> dict:
    """Start ``job``; once ``progress() > 0`` and a task whose name contains ``task`` runs on the
    worker node, kill that node and start a replacement. The job must finish, else it is rerun
    (at most twice); returns what happened."""
    cluster = workers.cluster
    victim = workers.ensure()
    job.start()
    try:

        def on_victim():
            if not job.running:
                raise AssertionError(f"the job ended before the kill (exit {job.proc.returncode}):\n{job.tail()}")
            return progress() > 0 and [
                t
                for t in cluster.list("tasks", detail=True)
                if task in t.get("name", "")
                and t.get("state") == "RUNNING"
                and t.get("node_id") == cluster.node_ids[victim]
            ]

        running = wait_for(f"a {task} task running on {victim}", on_victim, fail=job.tail)
        at_kill = progress()
        cluster.kill(victim)
        workers.replace()
        wait_for(f"{victim} dead", lambda: cluster.node_state(victim) == "DEAD", timeout=60)
        workers.joined()
        rc = job.wait()
        while rc != 0 and len(job.exit_codes) < 3:
            job.start()
            rc = job.wait()
        assert rc == 0, job.tail()
    finally:
        job.stop()
    return {
        "killed_node": victim,
        "progress_at_kill": at_kill,
        "job_attempts": len(job.exit_codes),
        **ray_retries(cluster, running[0].get("job_id")),
    }


def _small_store(root: Path, shards: int, rows: int, dim: int = 32, model=None):
    import numpy as np

    from index.store import EmbeddingStore

    rng = np.random.default_rng(5)
    x = rng.normal(size=(shards * rows, dim)).astype(np.float32)
    st = EmbeddingStore(root)
    st.create_or_check(model or {"clip_model": "test"}, dim)
    for i in range(shards):
        ids = [f"id{j}" for j in range(i * rows, (i + 1) * rows)]
        st.commit_shard(i, ids, [f"u/{j}" for j in ids], x[i * rows : (i + 1) * rows], [1] * rows, [1] * rows)
    return st


def test_index_build_in_parts_survives_losing_the_worker_node(workers, tmp_path):
    """`reco build-index --parts`: part tasks on the worker node are lost with it after the first
    part is written; Ray retries them on the replacement (or the rerun builds only the missing
    parts); the index holds every store row exactly once and each part file once."""
    import faiss
    import numpy as np

    from index.faiss_index import load_index

    store = _small_store(tmp_path / "store", 12, 300)
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(
        f"ray:\n  env_vars: {{HF_HUB_OFFLINE: '1', {HOOKS}, RECO_TEST_INDEX_PART_DELAY_S: '1.5'}}\n"
        "index: {part_rows: 300, workers: 2, cpus_per_task: 0.5}\n"
    )
    out = tmp_path / "index"
    job = Job(
        workers.cluster,
        [
            "build-index",
            "--store",
            store.root,
            "--index",
            out,
            "--parts",
            "--factory",
            "IVF16,Flat",
            "--num-queries",
            50,
            "--train-size",
            1000,
            "--ray-config",
            cfg,
        ],
        tmp_path / "job.log",
    )

    def parts() -> int:
        return len(list((out / "parts").glob("part-*.faiss"))) if (out / "parts").is_dir() else 0

    fig = _kill_when_task_on_worker(workers, job, "_part_task", parts)
    index, meta = load_index(out)
    ivf = faiss.extract_index_ivf(index)
    ids = np.concatenate(
        [
            faiss.rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i)).copy()
            for i in range(ivf.nlist)
            if ivf.invlists.list_size(i)
        ]
    )
    fig.update(stage="build-index --parts", rows=int(len(ids)), distinct=int(len(set(ids.tolist()))), parts=parts())
    FIGURES.append(fig)
    assert sorted(ids.tolist()) == list(range(3600)), fig  # every store row exactly once
    assert parts() == 12 and len(meta["parts"]) == 12 and _no_temp_files(out) == []
    assert fig["progress_at_kill"] < 12
    assert fig["task_retries"] >= 1 or fig["job_attempts"] > 1, fig  # the kill really cost work


def test_exact_retrieval_pass_survives_losing_the_worker_node(workers, tiny_clip_dir, tmp_path):
    """`reco search --store` (one Ray Data pass, a task per shard) loses the worker node while
    shards are being scored; Ray Data retries them on the replacement; the top-k equals
    ExactRetriever's (every row seen exactly once: a lost or doubled shard would change it)."""
    from index.retriever import ExactRetriever
    from jobs.search import concept_name
    from reco.encoders import create_clip
    from reco.text import text_embeddings

    clip = f"local-dir:{tiny_clip_dir}"
    store = _small_store(tmp_path / "store", 10, 200, model={"clip_model": clip})
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"ray:\n  env_vars: {{HF_HUB_OFFLINE: '1', {HOOKS}, RECO_TEST_EXACT_DELAY_S: '1.5'}}\n")
    log = tmp_path / "job.log"
    job = Job(
        workers.cluster, ["search", "a photo of a dog", "-k", 20, "--store", store.root, "--ray-config", cfg], log
    )
    started = []

    def progress() -> int:  # the pass is under way once Ray Data has scheduled its scoring tasks
        started.append(1)
        return len(started) > 3

    fig = _kill_when_task_on_worker(workers, job, "_score_batch", progress)
    import re

    hit = re.compile(r"^\s*\d+\s+-?\d+\.\d{4}\s+(\S+)\s")  # "  1  0.1234  id  uri" result lines
    got = [m.group(1) for m in map(hit.match, log.read_text().split("=== attempt")[-1].splitlines()) if m]
    emb, ids, _ = store.load_all()
    q = text_embeddings(create_clip(clip, None).encode_text, [concept_name("a photo of a dog")]).numpy()
    want = ExactRetriever(emb, ids).search(q, 20)[0].ids
    fig.update(stage="search --store (exact pass)", hits=len(got))
    FIGURES.append(fig)
    assert got == want, fig
    assert fig["task_retries"] >= 1 or fig["job_attempts"] > 1, fig  # a shard really was re-scored
