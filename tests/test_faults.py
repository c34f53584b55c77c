"""cluster/faults.py: fault points do nothing unless a test fills the registry; hook modules load
only from tests/."""

import pytest

from cluster import faults
from reco.errors import ConfigError


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(faults, "_hooks", {})
    monkeypatch.setattr(faults, "_env_loaded", False)
    monkeypatch.delenv(faults.HOOKS_ENV, raising=False)


def test_points_do_nothing_until_a_test_registers_a_hook():
    faults.fire("bank.concept", "cat")  # production: nothing registered, nothing happens
    seen = []
    faults.register("bank.concept", seen.append)
    faults.fire("bank.concept", "cat")
    faults.fire("embed.batch", 4)
    assert seen == ["cat"]
    faults.clear()
    faults.fire("bank.concept", "dog")
    assert seen == ["cat"]


def test_hook_modules_load_from_tests_only(monkeypatch, tmp_path):
    evil = tmp_path / "hooks.py"
    evil.write_text("raise SystemExit('must never run')\n")
    monkeypatch.setenv(faults.HOOKS_ENV, str(evil))
    with pytest.raises(ConfigError, match="only from a .py file under"):
        faults.fire("bank.concept", "cat")
    monkeypatch.setattr(faults, "_env_loaded", False)
    monkeypatch.setenv(faults.HOOKS_ENV, str(faults.TESTS_DIR / ".." / "cluster" / "faults.py"))  # escapes tests/
    with pytest.raises(ConfigError):
        faults.fire("bank.concept", "cat")


def test_the_test_hook_module_delays_each_point(monkeypatch):
    import time

    monkeypatch.setenv(faults.HOOKS_ENV, str(faults.TESTS_DIR / "fault_hooks.py"))
    monkeypatch.setenv("RECO_TEST_BANK_DELAY_S", "0.3")
    t0 = time.perf_counter()
    faults.fire("bank.concept", "cat")
    assert time.perf_counter() - t0 >= 0.3
    assert set(faults._hooks) == {"bank.concept", "embed.batch", "segment.batch", "index.part", "exact.block"}
