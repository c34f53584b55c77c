"""Corpus embedding throughput (issues #3, #9) on ../shared/data/imagenet-sample.

    .venv/bin/python -m bench.bench_embed [--images 1000] [--rounds 2] [--batch 32]
    .venv/bin/python -m bench.bench_embed --gpu      # one CUDA GPU, no Ray; prints JSON only

Measures, in one run: the machine's fp32 and bf16 matmul rates; JPEG read + decode + resize +
crop cost per image (one core, CPU time); the CLIP ViT-B/16 image tower alone (fp32, pure bf16)
as a fraction of the matching matmul rate (ViT-B/16 = 35.1 GFLOPs per 224 px image); and the Ray
Data pipeline (decode actors -> CLIP actor -> sharded store) against the tower alone.

Pipeline efficiency (issue #9): the machine is shared with other jobs, so the tower alone and the
pipeline are measured in the same run, interleaved: tower, pipeline round 1, tower, round 2, ...,
tower. The tower alone is the same model (``create_clip`` + ``set_precision``), precision, batch
size and torch thread count as the actor, on real decoded crops, timed around
``ClipModel.encode_image`` only, in this process and in an idle Ray actor (the faster of the two
is the yardstick); the pipeline's "inside the actor" rate is images / time in the actor's whole
``__call__`` (input conversion + tower + output conversion + bookkeeping). Each round's ratio
divides by the tower blocks before and after it. CPU seconds of every process of this run's Ray
(sampled from /proc), of the whole machine, and per image (load-independent) show where the
time goes; ``os.getloadavg()`` is recorded. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from bench.common import matmul_gflops, write_results

logging.basicConfig(level=logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = Path(os.environ.get("RECO_BENCH_ARCHIVE", ROOT.parent / "shared" / "data" / "imagenet-sample"))
VITB16_GFLOPS = 35.1
CLK = os.sysconf("SC_CLK_TCK")


def decode_cost(files) -> dict:
    """Read + decode + resize/crop per image on one core: wall ms and CPU ms (the CPU figure does not
    depend on the share of a shared machine this process gets). ``crop_uint8`` is the pipeline's
    path; ``float_crop`` the former one (``resize_center_crop`` to float, then back to uint8)."""
    from cluster.embed import crop_uint8
    from reco.image import decode_image, resize_center_crop

    wall = dict.fromkeys(("read", "decode", "crop_uint8", "float_crop"), 0.0)
    cpu = dict(wall)
    for f in files:
        for key, fn in (
            ("read", lambda: f.read_bytes()),
            ("decode", lambda: decode_image(data, str(f))),
            ("crop_uint8", lambda: crop_uint8(img, 224)),
            ("float_crop", lambda: (resize_center_crop(img, 224) * 255).round().byte()),
        ):
            t, c = time.perf_counter(), time.thread_time()
            r = fn()
            wall[key] += time.perf_counter() - t
            cpu[key] += time.thread_time() - c
            if key == "read":
                data = r
            elif key == "decode":
                img = r
    n = len(files)
    out = {"images": n, "torch_threads": torch.get_num_threads()}
    for k in wall:
        out[f"{k}_ms"], out[f"{k}_cpu_ms"] = 1000 * wall[k] / n, 1000 * cpu[k] / n
    out["total_ms"] = out["read_ms"] + out["decode_ms"] + out["crop_uint8_ms"]
    out["total_cpu_ms"] = out["read_cpu_ms"] + out["decode_cpu_ms"] + out["crop_uint8_cpu_ms"]
    return out


def model_throughput(batch: int = 32) -> dict:
    import open_clip

    torch.manual_seed(0)
    m = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    out = {}
    with torch.inference_mode():
        for name, model, inp in (("fp32", m, x), ("bf16", copy.deepcopy(m).to(torch.bfloat16), x.to(torch.bfloat16))):
            model.encode_image(inp)
            best = min(_timed(lambda: model.encode_image(inp)) for _ in range(3))
            out[name] = {"images_per_s": batch / best, "gflops": batch * VITB16_GFLOPS / best}
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- CPU accounting from /proc ------------------------------------------------------------


def _machine_jiffies() -> tuple:
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)  # busy (everything but idle + iowait), total


def _children() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _group(pid: int, root: int) -> str:
    if pid == root:
        return "driver (Ray Data executor, store writer)"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "ClipEmbedUDF" in cmd:
        return "CLIP actor"
    if "decode_batch" in cmd or "DecodeUDF" in cmd:
        return "decode actor"
    if cmd.startswith("ray::"):
        return "other Ray workers (idle, stats actors)"
    return "Ray system (raylet, GCS, agents, dashboard)"


class CpuSampler:
    """CPU seconds by process group, for this process and all its descendants (this run's local
    Ray), sampled every ``period`` s: a worker that changes role (ray::IDLE -> decode) is charged
    to the role it had at each sample. ``machine_busy_s`` is every core of the machine."""

    def __init__(self, period: float = 1.0):
        self.period, self.root = period, os.getpid()
        self.seconds: Dict[str, float] = {}
        self._last: Dict[int, int] = {}
        self._stop = threading.Event()

    def _sample(self) -> None:
        kids, todo, seen = _children(), [self.root], []
        while todo:
            p = todo.pop()
            seen.append(p)
            todo.extend(kids.get(p, []))
        for pid in seen:
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks = int(f[11]) + int(f[12])  # utime + stime
            except (OSError, IndexError, ValueError):
                continue
            prev = self._last.get(pid)
            self._last[pid] = ticks
            if prev is not None and ticks > prev:
                g = _group(pid, self.root)
                self.seconds[g] = self.seconds.get(g, 0.0) + (ticks - prev) / CLK

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> "CpuSampler":
        self._sample()
        self._m0, self._t0 = _machine_jiffies(), time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        (b1, t1), (b0, t0) = _machine_jiffies(), self._m0
        cores = os.cpu_count() or 1
        self.wall_s = time.perf_counter() - self._t0
        self.machine_busy_s = self.wall_s * cores * (b1 - b0) / max(t1 - t0, 1)
        self.ours_s = sum(self.seconds.values())


# -- tower alone vs pipeline ---------------------------------------------------------------


class Tower:
    """The actor's model, built the actor's way, timed around ``encode_image`` only."""

    def __init__(self, files, batch: int, precision: str, threads: int):
        from cluster.embed import ClipEmbedUDF
        from cluster.models import EncoderSpec
        from reco.image import decode_image, resize_center_crop

        torch.set_num_threads(threads)
        self.batch, self.threads = batch, torch.get_num_threads()
        spec = EncoderSpec(clip_model="ViT-B-16", clip_weights=None, clip_precision=precision)
        self.udf = ClipEmbedUDF(spec, threads=threads, warmup_batch=batch)
        crops = [
            (resize_center_crop(decode_image(f.read_bytes(), str(f)), 224) * 255)
            .round()
            .byte()
            .permute(1, 2, 0)
            .numpy()
            for f in files[:batch]
        ]
        with torch.inference_mode():
            self.x = self.udf._to_input(np.stack(crops))
        self.dtype = str(self.x.dtype)

    def run(self, batches: int) -> dict:
        times = []
        c0 = time.process_time()
        with torch.inference_mode():
            for _ in range(batches):
                t = time.perf_counter()
                self.udf.clip.encode_image(self.x)
                times.append(time.perf_counter() - t)
        return {
            "images_per_s": self.batch * len(times) / sum(times),
            "batches": batches,
            "seconds": sum(times),
            "cpu_s_per_image": (time.process_time() - c0) / (self.batch * batches),
            "loadavg_1m": os.getloadavg()[0],
        }


def pipeline_round(items, store, batch: int, precision: str, cpus_per_actor: float, decode_cpus: float) -> dict:
    from cluster.config import ActorConfig
    from cluster.embed import run_embed
    from cluster.models import EncoderSpec

    spec = EncoderSpec(clip_model="ViT-B-16", clip_weights=None, clip_precision=precision)
    la0 = os.getloadavg()[0]
    with CpuSampler() as cpu:
        rep = run_embed(
            items,
            store,
            spec,
            ActorConfig(num_actors=1, cpus_per_actor=cpus_per_actor, batch_size=batch),
            shard_size=max(batch, 256),
            decode_cpus=decode_cpus,
        )
    n = rep.embedded + len(rep.skipped)
    per = rep.model_seconds_per_image
    return {
        "images": rep.embedded,
        "skipped": len(rep.skipped),
        "wall_s": rep.seconds,
        "wall_images_per_s": rep.images_per_second,
        "steady_images_per_s": rep.steady_images_per_second,
        "actor_images_per_s": 1.0 / per if per else 0.0,
        "actor_ms_per_image": {
            "total": 1000 * per,
            "input": 1000 * rep.input_seconds_per_image,
            "forward": 1000 * rep.forward_seconds_per_image,
            "output": 1000 * rep.output_seconds_per_image,
            "other": 1000
            * (per - rep.input_seconds_per_image - rep.forward_seconds_per_image - rep.output_seconds_per_image),
        },
        "forward_images_per_s": 1.0 / rep.forward_seconds_per_image if rep.forward_seconds_per_image else 0.0,
        "actor_cpu_s_per_image": rep.actor_cpu_seconds_per_image,
        "decode_ms_per_image": 1000 * rep.decode_seconds_per_image,
        "batch_sizes": rep.batch_sizes,
        "actor_torch_threads": rep.actor_torch_threads,
        "actor_warmup_s": rep.actor_warmup_seconds,
        "cpu_s": {k: round(v, 2) for k, v in sorted(cpu.seconds.items())},
        "cpu_s_this_run": cpu.ours_s,
        "cpu_s_machine": cpu.machine_busy_s,
        "cpu_s_other_jobs": max(cpu.machine_busy_s - cpu.ours_s, 0.0),
        "cpu_wall_s": cpu.wall_s,
        "loadavg_1m": (la0, os.getloadavg()[0]),
        "images_total": n,
    }


def efficiency(
    n_images: int,
    rounds: int,
    batch: int,
    precision: str,
    cpus_per_actor: float,
    decode_cpus: float,
    tower_batches: int,
) -> dict:
    """Tower-alone blocks (in this process and in an idle Ray actor) interleaved with pipeline rounds;
    each round is a whole ``run_embed`` (Ray Data start-up, actors built and warmed up)."""
    import ray

    from cluster.config import ActorConfig, RayRuntimeConfig
    from cluster.runtime import init_ray
    from index.sources import list_folder
    from index.store import EmbeddingStore

    threads = ActorConfig(cpus_per_actor=cpus_per_actor).torch_threads
    files = sorted(ARCHIVE.glob("*.jpg"))
    init_ray(RayRuntimeConfig(num_cpus=2))
    tower = Tower(files, batch, precision, threads)
    # the same tower in a Ray worker process (niceness, OMP set-up, threads of a Ray worker), with
    # num_cpus=0 so that it never holds the CPUs the pipeline's actor needs; idle between blocks
    remote = ray.remote(num_cpus=0)(Tower).remote(files, batch, precision, threads)
    items = list_folder(str(ARCHIVE))[:n_images]
    per_round = batch * -(-len(items) // (rounds * batch))  # whole batches per round
    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))

    def towers_now() -> dict:
        return {"process": tower.run(tower_batches), "ray_actor": ray.get(remote.run.remote(tower_batches))}

    towers, pipes = [towers_now()], []
    try:
        store = EmbeddingStore(root)
        for r in range(rounds):
            chunk = items[r * per_round : (r + 1) * per_round]
            if not chunk:
                break
            pipes.append(pipeline_round(chunk, store, batch, precision, cpus_per_actor, decode_cpus))
            towers.append(towers_now())
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.kill(remote)
    for i, p in enumerate(pipes):
        around = {k: (towers[i][k]["images_per_s"] + towers[i + 1][k]["images_per_s"]) / 2 for k in towers[i]}
        p["tower_images_per_s_around"] = around
        best = max(around.values())  # the faster tower alone of the window: the conservative yardstick
        p["ratio_actor"] = p["actor_images_per_s"] / best
        p["ratio_forward"] = p["forward_images_per_s"] / best
        p["ratio_steady_wall"] = p["steady_images_per_s"] / best
        p["ratio_wall"] = p["wall_images_per_s"] / best
    rate = {k: sum(t[k]["batches"] * batch for t in towers) / sum(t[k]["seconds"] for t in towers) for k in towers[0]}
    tower_rate = max(rate.values())
    imgs = sum(p["images_total"] for p in pipes)
    actor_rate = imgs / sum(p["images_total"] / p["actor_images_per_s"] for p in pipes)
    wall_rate = imgs / sum(p["wall_s"] for p in pipes)
    tower_cpu = {k: statistics.mean(t[k]["cpu_s_per_image"] for t in towers) for k in towers[0]}
    actor_cpu = sum(p["actor_cpu_s_per_image"] * p["images_total"] for p in pipes) / imgs
    run_cpu = sum(p["cpu_s_this_run"] for p in pipes) / imgs
    return {
        "precision": precision,
        "batch": batch,
        "threads": tower.threads,
        "input_dtype": tower.dtype,
        "tower_cpu_s_per_image": tower_cpu,
        "actor_cpu_s_per_image": actor_cpu,
        "run_cpu_s_per_image": run_cpu,
        "cpu_ratio_actor": min(tower_cpu.values()) / actor_cpu,
        "cpus_per_actor": cpus_per_actor,
        "decode_cpus": decode_cpus,
        "tower": towers,
        "rounds": pipes,
        "tower_images_per_s_by_kind": rate,
        "tower_images_per_s": tower_rate,
        "actor_images_per_s": actor_rate,
        "wall_images_per_s": wall_rate,
        "ratio_actor": actor_rate / tower_rate,
        "ratio_actor_by_tower_kind": {k: actor_rate / v for k, v in rate.items()},
        "ratio_actor_median_round": statistics.median(p["ratio_actor"] for p in pipes),
        "ratio_steady_wall_median_round": statistics.median(p["ratio_steady_wall"] for p in pipes),
        "ratio_wall": wall_rate / tower_rate,
    }


# -- one GPU, no Ray: the numbers behind the 8-GPU layout in bench/README.md -----------------


def _gpu_batch(px: np.ndarray) -> dict:
    b = len(px)
    return {
        "id": np.arange(b).astype(str).astype(object),
        "uri": np.array(["u"] * b, object),
        "group": np.zeros(b, np.int64),
        "width": np.ones(b, np.int32),
        "height": np.ones(b, np.int32),
        "status": np.array(["ok"] * b, object),
        "error": np.array([""] * b, object),
        "decode_s": np.zeros(b),
        "pixels": px,
    }


def _gpu_udf(batch: int):
    from cluster.embed import ClipEmbedUDF
    from cluster.models import EncoderSpec

    spec = EncoderSpec(clip_model="ViT-B-16", clip_weights=None, clip_precision="bf16", device="cuda")
    return ClipEmbedUDF(spec, warmup_batch=batch)


def gpu_worker(batch: int, seconds: float, start: float) -> dict:
    """One process running the actor's ``__call__`` in a loop (several of them share one GPU)."""
    udf = _gpu_udf(batch)
    b = _gpu_batch(np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8))
    udf(b)
    torch.cuda.synchronize()
    while time.time() < start:
        time.sleep(0.01)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        udf(b)
        n += 1
    torch.cuda.synchronize()
    return {"images_per_s": batch * n / (time.perf_counter() - t)}


def gpu_probe(files, batches=(256, 512), procs=(1, 2, 3), seconds: float = 12.0) -> dict:
    """CLIP ViT-B/16 bf16 on one CUDA GPU: the tower alone vs the actor's ``__call__`` (pageable
    uint8 batch in, float32 embeddings out), 1..N actor processes sharing the GPU, nvJPEG decode
    (batched and one image per call, as ``_decode_on_device`` does) and the host's CPU decode."""
    import json
    import subprocess
    import sys

    from torchvision.io import decode_jpeg

    from cluster.embed import _crop_tensor, crop_uint8
    from reco.image import decode_image

    raw = [f.read_bytes() for f in files]
    out: dict = {"gpu": torch.cuda.get_device_name(0), "cpu_count": os.cpu_count()}
    c = time.thread_time()
    px = np.stack([crop_uint8(decode_image(r, "x"), 224) for r in raw])
    out["cpu_decode_crop_cpu_ms"] = 1000 * (time.thread_time() - c) / len(raw)
    for bs in batches:
        udf = _gpu_udf(bs)
        p = np.concatenate([px] * (bs // len(px) + 1))[:bs]
        with torch.inference_mode():
            x = udf._to_input(p)
            udf.clip.encode_image(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                udf.clip.encode_image(x)
            torch.cuda.synchronize()
            tower = 20 * bs / (time.perf_counter() - t)
        b = _gpu_batch(p)
        udf(b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        last = [udf(b) for _ in range(10)][-1]
        torch.cuda.synchronize()
        actor = 10 * bs / (time.perf_counter() - t)
        out[f"batch_{bs}"] = {
            "tower_images_per_s": tower,
            "actor_images_per_s": actor,
            "ratio": actor / tower,
            **{f"{k}_ms_per_batch": 1000 * bs * float(last[f"{k}_s"][0]) for k in ("input", "forward", "output")},
            "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        }
        del udf, x
        torch.cuda.empty_cache()
    bs = max(batches)
    for n in procs:  # actor processes sharing the GPU, started together
        start = time.time() + 15 + 5 * n  # after every process has built its model
        cmd = [sys.executable, "-m", "bench.bench_embed", "--gpu-worker", str(bs), str(seconds), str(start)]
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(n)]
        rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in ps]
        out[f"actors_{n}_images_per_s"] = sum(rates)
    data = [torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raw]
    decode_jpeg(data[:8], device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    imgs = decode_jpeg(data, device="cuda")
    torch.cuda.synchronize()
    out["nvjpeg_batched_images_per_s"] = len(data) / (time.perf_counter() - t)
    t = time.perf_counter()
    for d in data[:128]:
        decode_jpeg(d, device="cuda")
    torch.cuda.synchronize()
    out["nvjpeg_one_per_call_images_per_s"] = 128 / (time.perf_counter() - t)
    t = time.perf_counter()
    for im in imgs:
        _crop_tensor(im if im.shape[0] == 3 else im.expand(3, -1, -1), 224)
    torch.cuda.synchronize()
    out["gpu_crop_one_per_call_images_per_s"] = len(imgs) / (time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tower-batches", type=int, default=4, help="tower-alone batches per block and kind")
    ap.add_argument("--cpus-per-actor", type=float, default=1.5)
    ap.add_argument("--decode-cpus", type=float, default=0.5)
    ap.add_argument("--skip-rates", action="store_true", help="skip matmul, decode and fp32/bf16 tower tables")
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="one CUDA GPU, no Ray: tower vs actor __call__, actors per GPU, nvJPEG (prints JSON only)",
    )
    ap.add_argument("--gpu-procs", default="1,2,3", help="--gpu: numbers of actor processes sharing the GPU")
    ap.add_argument("--gpu-worker", nargs=3, type=float, metavar=("BATCH", "SECONDS", "START"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpu_worker:
        import json

        print(json.dumps(gpu_worker(int(args.gpu_worker[0]), args.gpu_worker[1], args.gpu_worker[2])))
        return
    if args.gpu:
        import json

        procs = tuple(int(n) for n in args.gpu_procs.split(",") if n)
        print(json.dumps(gpu_probe(sorted(ARCHIVE.glob("*.jpg"))[:512], procs=procs), indent=1))
        return
    from cluster.embed import reuse_freed_memory

    # the allocator policy of the CPU actors, for every measurement of this process (without it a
    # fresh process's tower runs ~1.45x slower, and a figure depends on what ran before it)
    malloc_tuned = reuse_freed_memory()
    load0 = os.getloadavg()
    extra: Dict[str, object] = {"malloc_tuned": malloc_tuned}
    md: List[str] = []
    model: dict = {}
    if not args.skip_rates:
        rates = {"fp32": matmul_gflops(), "bf16": matmul_gflops(dtype=torch.bfloat16)}
        files = sorted(ARCHIVE.glob("*.jpg"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, as a decode task has
        dec = decode_cost(files[:300])
        torch.set_num_threads(threads)
        model = model_throughput(args.batch)
        extra.update(matmul_gflops=rates, decode=dec, model=model)
        md += [
            f"Matmul rate (2048^3, this machine): fp32 **{rates['fp32']:.0f} GFLOP/s**, bf16 "
            f"**{rates['bf16']:.0f} GFLOP/s** (AMX). ViT-B/16 = 35.1 GFLOPs / 224 px image.",
            "",
            f"## Decode (one core, {dec['images']} archive JPEGs, median 400x300)",
            "",
            f"CPU ms per image: read {dec['read_cpu_ms']:.2f} + decode {dec['decode_cpu_ms']:.2f} + resize/crop to "
            f"uint8 {dec['crop_uint8_cpu_ms']:.2f} = **{dec['total_cpu_ms']:.2f} ms** "
            f"({1000 / dec['total_cpu_ms']:.0f} img/s per core); the former float resize/crop: "
            f"{dec['float_crop_cpu_ms']:.2f} ms. Wall: {dec['total_ms']:.2f} ms per image.",
            "",
            f"## CLIP ViT-B/16 image tower alone (batch {args.batch}, {torch.get_num_threads()} threads, "
            "best of 3, random input, open_clip model)",
            "",
            "| precision | img/s | GFLOP/s | fraction of matmul rate |",
            "|---|---|---|---|",
        ]
        for p, r in model.items():
            md.append(f"| {p} | {r['images_per_s']:.1f} | {r['gflops']:.0f} | {r['gflops'] / rates[p]:.0%} |")
        md.append("")
    eff = efficiency(
        args.images, args.rounds, args.batch, "bf16", args.cpus_per_actor, args.decode_cpus, args.tower_batches
    )
    load1 = os.getloadavg()
    md += [
        f"## Pipeline efficiency: Ray Data pipeline vs the same tower alone (bf16, batch {eff['batch']}, "
        f"{eff['threads']} torch threads), interleaved",
        "",
        f"Decode actors ({eff['decode_cpus']} CPU each) -> 1 CLIP actor ({eff['cpus_per_actor']} CPU, "
        f"{eff['threads']} threads) -> store, in {len(eff['rounds'])} rounds, each between two blocks of "
        "tower-alone batches. Load average (1 min) at start / end of the run: "
        f"{load0[0]:.2f} / {load1[0]:.2f}.",
        "",
        "Tower alone: the same model, precision, batch and threads timed around `encode_image` on real "
        "crops, in this process and in an idle Ray actor; the yardstick is the faster of the two "
        f"(over the run: process {eff['tower_images_per_s_by_kind']['process']:.1f}, Ray actor "
        f"{eff['tower_images_per_s_by_kind']['ray_actor']:.1f} img/s).",
        "",
        f"**tower alone {eff['tower_images_per_s']:.1f} img/s; pipeline inside the actor "
        f"{eff['actor_images_per_s']:.1f} img/s = {eff['ratio_actor']:.0%} of the tower "
        f"(median round {eff['ratio_actor_median_round']:.0%}); pipeline wall {eff['wall_images_per_s']:.1f} img/s "
        f"= {eff['ratio_wall']:.0%} incl. start-up of each round, steady wall median round "
        f"{eff['ratio_steady_wall_median_round']:.0%}.**",
        "",
        *(
            [
                f"Against the peak of the table above (best of 3 batches, idle machine, before Ray started): "
                f"{model['bf16']['images_per_s']:.1f} img/s, the actor is at "
                f"{eff['actor_images_per_s'] / model['bf16']['images_per_s']:.0%}; that best-of-3 is no yardstick "
                "for a mean over hundreds of batches, measured at another time.",
                "",
            ]
            if model
            else []
        ),
        "Wall includes each round's start-up (Ray Data planning, two worker processes importing torch, "
        f"the model built, a {eff['batch']}-image warm-up): a fixed ~8-10 s per `run_embed`; steady wall is "
        "images per second from the end of the first batch to the end of the last.",
        "",
        f"CPU cost per image (all threads, spin-waits included; independent of the share of the machine "
        f"this run got): tower alone {1000 * eff['tower_cpu_s_per_image']['process']:.0f} ms (process) / "
        f"{1000 * eff['tower_cpu_s_per_image']['ray_actor']:.0f} ms (Ray actor), the pipeline's actor in "
        f"`__call__` {1000 * eff['actor_cpu_s_per_image']:.0f} ms "
        f"(tower / actor = {eff['cpu_ratio_actor']:.0%}); every process of this run's Ray over the rounds, "
        f"start-up of each round included: {1000 * eff['run_cpu_s_per_image']:.0f} ms.",
        "",
        "| round | images | tower img/s (around, faster kind) | actor img/s | ratio | forward-only img/s | steady wall img/s | "
        "wall img/s (start-up incl.) | actor ms/img: input / forward / output / other | batch sizes | "
        "load 1m | CPU s: this run / other jobs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(eff["rounds"]):
        ms = p["actor_ms_per_image"]
        md.append(
            f"| {i + 1} | {p['images']} | {max(p['tower_images_per_s_around'].values()):.1f} | {p['actor_images_per_s']:.1f} | "
            f"{p['ratio_actor']:.0%} | {p['forward_images_per_s']:.1f} | {p['steady_images_per_s']:.1f} | "
            f"{p['wall_images_per_s']:.1f} | {ms['input']:.2f} / {ms['forward']:.1f} / {ms['output']:.3f} / "
            f"{ms['other']:.3f} | {p['batch_sizes']} | {p['loadavg_1m'][0]:.1f}-{p['loadavg_1m'][1]:.1f} | "
            f"{p['cpu_s_this_run']:.0f} / {p['cpu_s_other_jobs']:.0f} |"
        )
    groups = sorted({g for p in eff["rounds"] for g in p["cpu_s"]})
    tot = {g: sum(p["cpu_s"].get(g, 0.0) for p in eff["rounds"]) for g in groups}
    wall = sum(p["cpu_wall_s"] for p in eff["rounds"])
    md += [
        "",
        "Tower-alone blocks (img/s, in order; process / Ray actor): "
        + ", ".join(f"{t['process']['images_per_s']:.1f} / {t['ray_actor']['images_per_s']:.1f}" for t in eff["tower"])
        + ".",
        "",
        f"CPU seconds of this run's processes over the {wall:.0f} s of the pipeline rounds "
        f"(machine: {os.cpu_count()} cores = {wall * (os.cpu_count() or 1):.0f} core-s; other jobs used "
        f"{sum(p['cpu_s_other_jobs'] for p in eff['rounds']):.0f}):",
        "",
        "| process group | CPU s | share of this run |",
        "|---|---|---|",
    ]
    ours = sum(tot.values()) or 1.0
    for g in sorted(tot, key=tot.get, reverse=True):
        md.append(f"| {g} | {tot[g]:.1f} | {tot[g] / ours:.0%} |")
    md += [
        "",
        f"Decode inside the pipeline: {statistics.mean(p['decode_ms_per_image'] for p in eff['rounds']):.2f} "
        f"ms/img (a pool of decode actors of {eff['decode_cpus']} CPU, sharing the cores with the CLIP actor). "
        f"Actor warm-up (one batch-{eff['batch']} forward at start-up, excluded from the actor rate, "
        f"included in wall): {statistics.mean(p['actor_warmup_s'] for p in eff['rounds']):.1f} s per round.",
    ]
    path = write_results(
        "embed", {**extra, "loadavg_start": load0, "loadavg_end": load1, "efficiency": eff}, "\n".join(md)
    )
    print(path.read_text())
    print(
        f"RATIO pipeline-inside-actor / tower-alone = {eff['ratio_actor']:.3f} "
        f"(tower {eff['tower_images_per_s']:.2f} img/s, actor {eff['actor_images_per_s']:.2f} img/s, "
        f"wall {eff['wall_images_per_s']:.2f} img/s, load {load0[0]:.2f}->{load1[0]:.2f}); "
        f"CPU cost tower/actor = {eff['cpu_ratio_actor']:.3f}"
    )


if __name__ == "__main__":
    main()
