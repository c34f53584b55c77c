"""Tuning an index's search parameters (nprobe / efSearch, and k_factor for re-ranking indexes) to a
recall target on tuning queries: called by :func:`index.faiss_index.evaluate_index`."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import faiss_index as fi

#: after the doubling search hits the target at v, nprobe / efSearch is bisected down to v / BISECT_STEPS
# between the last miss and v (at 10M the doubling grid's 1024 was where 640-768 would have done)
BISECT_STEPS = 16
# a bisected value counts as reaching the target when its tuning recall exceeds it by z standard
# errors of the difference of two sample means (the held-out queries are as many as the tuning
# ones: sqrt(2) x the tuning standard error), so that a value picked close to the target does not
# fail the held-out check by sampling luck; the doubling grid's own hit keeps the plain target (as
# before bisection), so some held-out misses near the target remain possible
CONFIDENCE_Z = 1.645
#: candidate settings are timed this many times (the fastest run counts) before the fastest is kept
TIMING_RUNS = 2


def tune(
    index,
    factory: str,
    queries,
    q_rows,
    truth,
    k: int,
    target: float,
    gpu: bool,
    ks: Sequence[int] = (),
    max_nprobe: Optional[int] = None,
) -> Tuple[Dict[str, int], float]:
    """Search parameters reaching ``target`` recall@k on the tuning queries (with ``ks``: the
    lowest of recall@k' over those k', each against the first k' columns of ``truth``).

    nprobe / efSearch double from small up to the cap (nlist, or ``max_nprobe``: a latency budget;
    4096 for efSearch); at the first value at which the largest k_factor reaches the target, the
    value is bisected down between it and the last miss (to 1/BISECT_STEPS of it; recall grows
    with it). Of the values seen reaching the target, each with the smallest k_factor reaching it
    there, the one whose batched searches took least time is kept. If no setting reaches the
    target, the best one seen is returned (the caller decides what a miss means). Returns (params,
    tuning recall@k).
    """
    param = fi._search_param_name(factory)
    _, refine = fi.split_refine(factory)
    values: List[Optional[int]]
    if param == "nprobe":
        cap = min(fi._nlist(factory), fi.GPU_MAX_NPROBE) if gpu else fi._nlist(factory)
        cap = min(cap, max_nprobe) if max_nprobe else cap  # a latency budget: scan at most this many lists
        values, probes = [], 1
        while probes < cap:
            values.append(probes)
            probes *= 2
        values.append(cap)
    elif param == "efSearch":
        values = [16 << i for i in range(9)]  # 16 .. 4096
    else:
        values = [None]
    kfs: Sequence[Optional[int]] = fi.K_FACTORS if refine is not None else (None,)

    def setting(v: Optional[int], kf: Optional[int]) -> Dict[str, int]:
        out: Dict[str, int] = {}
        if param is not None and v is not None:
            out[param] = v
        if kf is not None:
            out["k_factor"] = kf
        return out

    def run(params: Dict[str, int]) -> Tuple[float, float, float]:
        """(lowest recall over the ks, lowest lower confidence bound of it, seconds of the searches)."""
        for name, value in params.items():
            fi._set_search_param(index, name, value)
        means, bounds, sec = [], [], 0.0
        for kk in ks or (k,):
            found, s = fi._found(index, queries, q_rows, kk)
            per = fi.recall_per_query(found, truth[:, :kk], kk)
            sec += s
            means.append(float(per.mean()))
            se = float(per.std(ddof=1)) / np.sqrt(len(per)) if len(per) > 1 else 0.0
            bounds.append(means[-1] - CONFIDENCE_Z * np.sqrt(2.0) * se)
        return min(means), min(bounds), sec

    best: Tuple[float, Dict[str, int]] = (-1.0, {})
    for i, v in enumerate(values):
        params = setting(v, kfs[-1])
        r_max = run(params)[0]
        if r_max > best[0]:
            best = (r_max, params)
        if r_max < target:
            continue
        # below the doubling grid's hit v a value must reach the target with confidence (the lower
        # bound of its tuning recall), not by sampling luck: the held-out queries would miss it
        hits = [v]
        if i > 0 and v is not None:  # bisect between the last miss and this hit (recall grows with v)
            lo, hi = values[i - 1], v
            assert lo is not None
            while hi - lo > max(1, hi // BISECT_STEPS):
                mid = (lo + hi) // 2
                if run(setting(mid, kfs[-1]))[1] >= target:
                    hi = mid
                    hits.append(mid)
                else:
                    lo = mid
        # each value that reached the target with its smallest k_factor reaching it there (a larger
        # value needs no larger k_factor: walked downwards from the largest); the fastest is kept, as
        # re-ranking k * k_factor candidates can cost more than the probes it saves
        options: List[Tuple[float, Dict[str, int], float]] = []
        j = 0
        for pv in sorted(hits, key=lambda h: -1 if h is None else h, reverse=True):
            while j < len(kfs):
                r, low, sec = run(setting(pv, kfs[j]))
                if (r if pv == v else low) >= target:
                    options.append((sec, setting(pv, kfs[j]), r))
                    break
                j += 1
        if not options:  # (only if a repeated search changed its recall)
            return params, r_max
        # at equal k_factor fewer probes is less work: timings decide only between k_factors
        fewest = list({o[1].get("k_factor"): o for o in options}.values())  # options ran from more probes
        if len(fewest) > 1:  # one timed search is noisy: the fastest of TIMING_RUNS counts
            fewest = [(min([sec] + [run(p)[2] for _ in range(TIMING_RUNS - 1)]), p, r) for sec, p, r in fewest]
        _, chosen, r = min(fewest, key=lambda o: o[0])
        return chosen, r
    return best[1], best[0]
