"""Issue #8/5a and /12 without Ray: the one rule that separates bad input (skipped for good)
from transient failures (retried, then left for a rerun), in fetch_bytes and the readers."""

import io
import os
import time

import pytest
from conftest import make_image

import index.sources as sources
from index.readers import ReadReport, list_images, read_images
from index.sources import BAD, TRANSIENT, RetryPolicy, classify_failure, fetch_bytes, list_folder
from reco.errors import BadInputError, ImageDecodeError, TransientIOError

FAST = RetryPolicy(attempts=3, backoff_s=0.01, max_backoff_s=0.02)


def _jpeg(path, seed=0):
    make_image(seed).save(path, format="JPEG")
    return path


class _FlakyFS:
    """An fsspec-like file system whose ``open`` raises the given errors, then serves ``data``."""

    def __init__(self, errors, data=b"bytes"):
        self.errors = list(errors)
        self.data = data
        self.opens = 0

    def open(self, path, mode="rb"):
        self.opens += 1
        if self.errors:
            raise self.errors.pop(0)
        return io.BytesIO(self.data)


class _Throttled(Exception):
    """Stands for botocore's ClientError (SlowDown / 503), which is not an OSError."""


def test_remote_transient_errors_are_retried_with_backoff(monkeypatch):
    fs = _FlakyFS([TimeoutError("read timed out"), _Throttled("SlowDown: please reduce your request rate")])
    monkeypatch.setattr(sources, "filesystem", lambda url, opts=None: (fs, url.split("://", 1)[1]))
    assert fetch_bytes("s3://bucket/a.jpg", retry=FAST) == b"bytes" and fs.opens == 3
    fs = _FlakyFS([ConnectionError("reset by peer")] * 5)
    monkeypatch.setattr(sources, "filesystem", lambda url, opts=None: (fs, url.split("://", 1)[1]))
    t0 = time.perf_counter()
    with pytest.raises(TransientIOError, match=r"s3://bucket/b.jpg.*reset by peer.*3 attempt") as info:
        fetch_bytes("s3://bucket/b.jpg", retry=FAST)
    assert fs.opens == 3 and time.perf_counter() - t0 < 1.0
    assert classify_failure(info.value)[0] == TRANSIENT


def test_local_failures_are_classified(tmp_path, monkeypatch):
    missing = tmp_path / "listed_then_gone.jpg"
    with pytest.raises(TransientIOError, match="listed_then_gone.jpg"):
        fetch_bytes(str(missing), retry=FAST)
    os.symlink(tmp_path / "no_target.jpg", tmp_path / "dangling.jpg")
    with pytest.raises(BadInputError, match="broken symlink"):
        fetch_bytes(str(tmp_path / "dangling.jpg"), retry=FAST)
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(BadInputError, match="directory"):
        fetch_bytes(str(tmp_path / "dir.jpg"), retry=FAST)
    # the retries come from the environment when not given (how workers and the CLI get them)
    monkeypatch.setenv("RECO_FETCH_ATTEMPTS", "2")
    monkeypatch.setenv("RECO_FETCH_BACKOFF_S", "0.01")
    assert RetryPolicy.from_env() == RetryPolicy(2, 0.01, 8.0)
    with pytest.raises(TransientIOError, match="2 attempt"):
        fetch_bytes(str(missing))


def test_a_file_that_appears_during_the_retries_is_read(tmp_path, monkeypatch):
    target = tmp_path / "late.jpg"
    real_sleep = time.sleep

    def sleep_then_appear(s):
        target.write_bytes(b"here now")
        real_sleep(s)

    monkeypatch.setattr(sources.time, "sleep", sleep_then_appear)
    assert fetch_bytes(str(target), retry=FAST) == b"here now"


@pytest.mark.parametrize(
    "exc, kind, prefix",
    [
        (ImageDecodeError("x: not an image"), BAD, "decode: "),
        (BadInputError("x: broken symlink"), BAD, "bad input: "),
        (ValueError("row out of range"), BAD, "bad input: "),
        (TransientIOError("x: cannot read"), TRANSIENT, "io: "),
        (FileNotFoundError("x"), TRANSIENT, "io: "),
        (TimeoutError("x"), TRANSIENT, "io: "),
        (RuntimeError("a bug"), TRANSIENT, "unexpected RuntimeError"),
    ],
)
def test_classification_table(exc, kind, prefix):
    k, reason = classify_failure(exc)
    assert k == kind and reason.startswith(prefix)


def test_read_report_separates_bad_input_from_transient_failures(tmp_path):
    good = _jpeg(tmp_path / "good.jpg")
    (tmp_path / "notes.jpg").write_text("a text file, not an image")
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    gone = tmp_path / "gone.jpg"
    uris = [str(good), str(tmp_path / "notes.jpg"), str(tmp_path / "dangling.jpg"), str(gone)]
    images, kept, rep = read_images(uris, retry=FAST)
    assert kept == [str(good)] and rep.ok == 1 and len(images) == 1
    assert set(rep.skipped) == {str(tmp_path / "notes.jpg"), str(tmp_path / "dangling.jpg")}
    assert "not an image" in rep.skipped[str(tmp_path / "notes.jpg")]
    assert "broken symlink" in rep.skipped[str(tmp_path / "dangling.jpg")]
    assert set(rep.failed) == {str(gone)} and rep.failed[str(gone)].startswith("io: ")
    d = rep.as_dict()
    assert d["failed"] == 1 and d["skipped"] == 2 and isinstance(ReadReport().failed, dict)


def test_listing_keeps_broken_symlinks_and_escapes_non_utf8_names(tmp_path):
    _jpeg(tmp_path / "ok.jpg")
    fd = os.open(os.fsencode(tmp_path) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
    buf = io.BytesIO()
    make_image(1).save(buf, format="JPEG")
    os.write(fd, buf.getvalue())
    os.close(fd)
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    items = {it.id: it for it in list_folder(str(tmp_path))}
    assert set(items) == {"ok.jpg", "caf%E9.jpg", "dangling.jpg"}
    bad = items["caf%E9.jpg"]
    assert "not valid UTF-8" in bad.problem and "caf\\xe9.jpg" in bad.problem
    assert bad.uri.endswith("caf%E9.jpg") and bad.uri.encode("utf-8")  # representable
    assert not items["ok.jpg"].problem and not items["dangling.jpg"].problem
    assert list_images(str(tmp_path)) == [items["dangling.jpg"].uri, items["ok.jpg"].uri]
