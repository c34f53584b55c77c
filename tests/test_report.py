"""The uniform job report (JSON + one-screen summary) and the metrics helper outside Ray."""

import json
import os

import pytest

from cluster.report import REPORT_FORMAT, JobMetrics, JobReport, peak_memory, reason_kind


def _report():
    r = JobReport("embed", config={"store": "runs/s", "storage_options": {"key": "AK", "secret": "hush-hush"}})
    r.seen(10)
    r.already_done(2)
    with r.stage("list"):
        pass
    r.add_stage("embed", 4.0, items=6)
    r.add_stage("embed", 2.0, items=0)  # stages add up
    r.processed(6)
    r.skip("a/bad.jpg", "not an image: cannot identify image file '/data/a/bad.jpg'")
    r.skip("b/empty.jpg", "not an image: empty file")
    r.skip(None, "too large: 12000x12000 pixels")
    r.fail_transient("c/slow.jpg", "transient: s3 timeout after 5 attempts")
    r.retry("s3 throttled: SlowDown", 3)
    r.retry("actor restarted")
    r.actor_memory("Embedder-0", {"rss": 900 * 2**20})
    r.actor_memory("Embedder-0", {"rss": 700 * 2**20, "cuda": 3 * 2**30})  # the maxima are kept
    r.actor_memory("Embedder-1", {"rss": 800 * 2**20})
    r.extra["shards_committed"] = 2
    return r.finish()


def test_report_counts_reasons_stages_and_memory(tmp_path):
    r = _report()
    d = r.as_dict()
    assert d["format"] == REPORT_FORMAT and d["job"] == "embed" and d["status"] == "incomplete"
    assert d["inputs"] == {"seen": 10, "processed": 6, "already_done": 2, "skipped": 3, "failed_transient": 1}
    assert d["skipped_by_reason"] == {"not an image": 2, "too large": 1}
    assert d["skipped_examples"]["not an image"] == ["a/bad.jpg", "b/empty.jpg"]
    assert d["failed_by_reason"] == {"transient": 1}
    assert d["retries"] == {"total": 4, "by_reason": {"s3 throttled": 3, "actor restarted": 1}}
    embed = [s for s in d["stages"] if s["name"] == "embed"][0]
    assert embed == {"name": "embed", "seconds": 6.0, "items": 6, "items_per_second": 1.0}
    assert d["peak_memory_bytes"]["Embedder-0"] == {"rss": 900 * 2**20, "cuda": 3 * 2**30}
    assert d["config"]["storage_options"] == {"key": "<redacted>", "secret": "<redacted>"}
    assert d["throughput_per_second"] > 0 and d["extra"] == {"shards_committed": 2}
    path = r.write(str(tmp_path / "out"))
    assert json.loads(open(path).read()) == json.loads(json.dumps(d))
    text = (tmp_path / "out" / "embed_report.txt").read_text()
    assert "hush-hush" not in open(path).read() + text
    assert text == r.summary() + "\n"


def test_summary_fits_one_screen():
    r = _report()
    for i in range(30):  # many reasons and actors still fit
        r.skip(f"x{i}", f"reason {i}: detail")
        r.actor_memory(f"Actor-{i}", {"rss": i * 2**20})
    s = r.summary()
    lines = s.splitlines()
    assert len(lines) <= 30 and max(map(len, lines)) <= 100
    assert lines[0].startswith("embed: incomplete in ")
    assert "10 seen, 6 processed, 2 already done, 33 skipped, 1 failed transiently" in lines[1]
    assert "more skipped reasons in the JSON report" in s and "more actors in the JSON report" in s
    assert "Embedder-0" in s and "cuda 3.0 GiB" in s and "retries: 4" in s


def test_report_to_a_storage_uri(s3_server):
    import boto3
    import fsspec

    boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="reports-bucket")
    fs = fsspec.filesystem("s3", **s3_server)
    uri = _report().write("s3://reports-bucket/run1", s3_server)
    assert uri == "s3://reports-bucket/run1/embed_report.json"
    assert json.loads(fs.cat(uri))["inputs"]["processed"] == 6
    assert fs.cat("s3://reports-bucket/run1/embed_report.txt").decode().startswith("embed: ")


def test_reason_kind_peak_memory_and_metrics_without_ray():
    assert reason_kind("not an image: x") == "not an image"
    assert reason_kind("") == "unknown" and reason_kind("plain") == "plain"
    mem = peak_memory()
    assert mem["rss"] > 10 * 2**20
    m = JobMetrics("test")  # no Ray here: every call is a no-op, never an error
    m.processed(3)
    m.error("boom: x")
    m.throughput(2.0)


@pytest.mark.parametrize("n", [0, 1])
def test_empty_report_is_ok(n, tmp_path):
    r = JobReport("build-index")
    r.seen(n)
    r.processed(n)
    d = r.finish().as_dict()
    assert d["status"] == "ok" and d["retries"]["total"] == 0 and d["stages"] == []
    assert r.summary().startswith("build-index: ok")


def test_ray_actor_restarts_are_counted_in_the_job_report(ray_local, tmp_path):
    """An actor killed and restarted by Ray shows up as a retry of the job, by class."""
    import os
    import signal
    import time

    import ray

    from cluster.report import job_report, ray_actor_restarts, write_job_report

    @ray.remote(max_restarts=1, max_task_retries=1, num_cpus=0)
    class Flaky:
        def pid(self):
            return os.getpid()

    a = Flaky.remote()
    before = ray_actor_restarts().get("Flaky", 0)
    os.kill(ray.get(a.pid.remote()), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while ray_actor_restarts().get("Flaky", 0) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.get(a.pid.remote(), timeout=60) > 0  # restarted and serving again
    assert ray_actor_restarts()["Flaky"] == before + 1
    rep = job_report(
        "demo-job",
        unit="concepts",
        seen=3,
        processed=2,
        skipped={"ghost": "no usable image: x"},
        stages={"job": (2.0, 3)},
        memory={"actor 0": 2**20},
        retries={"read retry": 2},
    )
    d = rep.as_dict()
    assert d["inputs"]["seen"] == 3 and d["inputs"]["skipped"] == 1
    assert d["retries"]["by_reason"]["actor restart (Flaky)"] == before + 1
    assert d["retries"]["by_reason"]["read retry"] == 2
    assert d["peak_memory_bytes"] == {"actor 0": {"rss": 2**20}}
    path = write_job_report(rep, str(tmp_path))
    assert path.endswith("job_report.json") and (tmp_path / "job_report.txt").read_text().startswith("demo-job: ok")
    ray.kill(a)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_peak_memory_is_per_task_after_a_reset():
    """A Ray worker runs many tasks: after reset_peak_memory the peak is the next task's, not the
    largest of every task the process ran before (the index build's per-task RSS rows)."""
    import numpy as np

    from cluster.report import reset_peak_memory

    if not reset_peak_memory():  # earlier tests in this process may have peaked higher
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = peak_memory()["rss"]
    big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
    assert peak_memory()["rss"] >= before + 350 * 2**20
    del big
    assert reset_peak_memory() is True
    small = np.ones(20 * 2**20 // 8)
    after = peak_memory()["rss"]
    assert after < before + 200 * 2**20, (before, after)  # the 400 MiB task is forgotten
    assert small.sum() > 0
