"""Helpers shared by the benchmarks: results files, matmul-rate probe, peak RSS in a subprocess."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> Dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Measured dense matmul rate of this machine (GFLOP/s), the yardstick for efficiency."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_isolated(code: str) -> Dict[str, Any]:
    """Run ``code`` (which prints one JSON line last) in a fresh interpreter: clean peak RSS."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_note(results: Dict[str, Any]) -> str:
    """The 1/5/15-min load average now, recorded in ``results`` and as a markdown paragraph (the
    machine is shared: a high load makes timing ratios unreliable)."""
    load = os.getloadavg()
    results["load_average_end"] = load
    return (
        f"\nLoad average (1/5/15 min) at the end: {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on "
        f"{os.cpu_count()} cores; above ~2 the machine was shared and the ratios are not reliable.\n"
    )


def write_results(name: str, results: Dict[str, Any], markdown: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **results}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=2))
    md = RESULTS_DIR / f"{name}.md"
    md.write_text(f"# {name}\n\n_{results['date']}, {results['machine']}_\n\n{markdown}\n")
    return md
