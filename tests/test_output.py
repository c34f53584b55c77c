"""index/output.py: one resumable output (settings + hash, lock on any storage, overwrite under
the lock, atomic parts read back once, exactly-once named parts) and the uniform report's status."""

import json
import pickle
import secrets
import threading

import pytest
from conftest import make_bucket

from index import storage
from index.lock import LOCK_FILE, StoreLockedError
from index.output import EXIT_FAILED, EXIT_OK, EXIT_RERUN, JobReport, ResumableOutput, config_hash
from reco.errors import ConfigError

BUCKET = "reco-output-test"


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path):
    """An output URI on a local folder and on the moto S3 server, with its storage options."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    opts = request.getfixturevalue("s3_server")
    make_bucket(opts, BUCKET)
    return f"s3://{BUCKET}/{secrets.token_hex(4)}/out", dict(opts)


def _out(uri, opts, **kw):
    return ResumableOutput(uri, "test-job", "settings.json", "parts", ".bin", opts, **kw)


def test_settings_parts_and_resume(out_uri):
    uri, opts = out_uri
    out = _out(uri, opts)
    with out.open({"k": 1}, extra={"note": "x"}):
        assert list(out.parts.read_new()) == []
        first = out.commit(b"one")
        second = out.commit(b"two")
        assert [d for _, d in out.parts.read_new()] == [b"one", b"two"]
        out.commit(b"three")
        assert [d for _, d in out.parts.read_new()] == [b"three"]  # each part read back once
        assert list(out.parts.read_new()) == []
    assert first.rsplit("/", 1)[-1].startswith("part-00000-") and "part-00001-" in second
    settings = json.loads(storage.read_bytes(storage.join(uri, "settings.json"), opts))
    assert settings == {"config_hash": config_hash({"k": 1}), "k": 1, "note": "x"}
    assert not storage.exists(storage.join(uri, LOCK_FILE), opts)  # released
    again = _out(uri, opts)
    with again.open({"k": 1}):  # same configuration: resumes, numbering continues
        assert [d for _, d in again.parts.read_new()] == [b"one", b"two", b"three"]
        assert again.commit(b"four").rsplit("/", 1)[-1].startswith("part-00003-")


def test_another_configuration_is_refused_and_overwrite_forgets_parts(out_uri):
    uri, opts = out_uri
    with _out(uri, opts).open({"k": 1}) as out:
        out.commit(b"old")
    with pytest.raises(ConfigError, match="another configuration"):
        with _out(uri, opts).open({"k": 2}):
            pass
    assert len(_out(uri, opts).parts.list()) == 1  # the refusal changed nothing
    with _out(uri, opts).open({"k": 2}, overwrite=True) as out:
        assert out.parts.list() == [] and out.previous["config_hash"] == config_hash({"k": 1})
        out.commit(b"new")
    assert [d for _, d in _out(uri, opts).parts.read_new()] == [b"new"]


def test_a_second_writer_is_refused_and_overwrite_waits_for_the_lock(out_uri):
    """The lock is real on S3 too: a second writer (e.g. a concurrent --overwrite) is refused
    while the first holds it, and the first one's parts are intact."""
    uri, opts = out_uri
    with _out(uri, opts).open({"k": 1}) as first:
        first.commit(b"a")
        with pytest.raises(StoreLockedError, match="locked by another writer.*test-job"):
            with _out(uri, opts).open({"k": 2}, overwrite=True):
                pass
        first.commit(b"b")
    assert [d for _, d in _out(uri, opts).parts.read_new()] == [b"a", b"b"]


def test_a_writer_whose_lock_was_taken_commits_nothing(out_uri):
    uri, opts = out_uri
    with _out(uri, opts).open({"k": 1}) as out:
        storage.write_bytes(
            storage.join(uri, LOCK_FILE), json.dumps({"token": "0" * 16, "job": "intruder"}).encode(), opts
        )
        with pytest.raises(StoreLockedError, match="lost the writer lock.*intruder"):
            out.commit(b"late")
        storage.remove_files([storage.join(uri, LOCK_FILE)], opts)
    assert _out(uri, opts).parts.list() == []
    with pytest.raises(StoreLockedError, match="outside"):
        out.write_file("x", b"no lock")


def test_named_parts_are_created_exactly_once_by_any_worker(out_uri):
    """The distributed-build case: workers hold a pickled Parts (no lock) and create named parts;
    a retried or racing writer of the same part never replaces it."""
    uri, opts = out_uri
    parts = pickle.loads(pickle.dumps(_out(uri, opts).parts))
    wins = []
    barrier = threading.Barrier(4)

    def write(i):
        barrier.wait()
        if parts.create("shard-007", f"writer {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1
    ((part, data),) = list(_out(uri, opts).parts.read_new())
    assert part.endswith("part-shard-007.bin") and data == f"writer {wins[0]}".encode()
    assert not parts.create("shard-007", b"retry")


def test_corrupt_settings_are_refused_unless_overwrite(tmp_path):
    uri = str(tmp_path / "out")
    with _out(uri, {}).open({"k": 1}) as out:
        out.commit(b"old")
    (tmp_path / "out" / "settings.json").write_text("{garbage")
    with pytest.raises(ConfigError, match="settings.json is corrupt"):
        with _out(uri, {}).open({"k": 1}):
            pass
    with _out(uri, {}).open({"k": 1}, overwrite=True) as out:
        assert out.parts.list() == []
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["config_hash"] == config_hash({"k": 1})


def test_an_output_naming_a_file_is_one_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        with _out(str(f), {}).open({"k": 1}):
            pass


def test_report_status_failed_when_most_inputs_failed(tmp_path):
    r = JobReport("build-bank", unit="concepts", max_failed_fraction=0.5)
    r.seen(10)
    r.processed(4)
    for i in range(6):
        r.skip(f"c{i}", f"no usable image: archive {i} empty")
    assert r.status == "failed" and r.exit_code == EXIT_FAILED
    line = r.failure_line()
    assert "6 of 10 concepts failed (60.0%" in line and "max_failed_fraction 0.5" in line and "c0: no usable" in line
    d = r.finish().as_dict()
    assert d["status"] == "failed" and d["failed_fraction"] == 0.6 and d["max_failed_fraction"] == 0.5
    assert r.summary().startswith("build-bank: failed")
    assert "FAILED: 60.0% of the concepts failed for good, above jobs.max_failed_fraction 0.5" in r.summary()
    half = JobReport("x", max_failed_fraction=0.5)
    half.processed(5)
    half.skip("a", "bad: x", n=5)
    assert half.status == "ok" and half.exit_code == EXIT_OK  # exactly the threshold is not above it
    half.fail_transient("b", "io: timeout")
    assert half.status == "incomplete" and half.exit_code == EXIT_RERUN
    rerun = JobReport("x", max_failed_fraction=0.5)  # a rerun of a failed run stays failed
    rerun.already_done(10, failed=9)
    assert rerun.status == "failed"
    never = JobReport("x")  # no threshold: counts never fail a run
    never.skip("a", "bad: x")
    assert never.status == "ok"
