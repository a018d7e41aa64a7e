"""Latency of backbone graphs in ONNX Runtime, measured interleaved so that load drifts on a
shared machine hit every graph alike."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Mapping, Union

import numpy as np


def time_graphs(graphs: Mapping[str, Union[str, Path]], patch_size: int, batch: int = 1, threads: int = 1,
                rounds: int = 7, iters: int = 50, warmup: int = 20, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Median latency (ms) of each graph, in ``rounds`` interleaved rounds of ``iters`` runs.

    Args:
        graphs: label -> ONNX path.
        patch_size: P (input is (batch, 3, P, P)).
        batch: batch size.
        threads: ONNX Runtime intra-op threads.

    Returns:
        label -> {"median_ms", "min_round_ms", "max_round_ms", "p10_ms"}: the median over rounds
        of each round's median, the spread of round medians, and the 10th percentile of all runs
        (the least disturbed by other processes on a shared machine).
    """
    from gfnet_edge.runtime.backends.onnxruntime import load_session

    x = np.random.default_rng(seed).standard_normal((batch, 3, patch_size, patch_size)).astype(np.float32)
    sessions = {k: load_session(Path(p), threads) for k, p in graphs.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {"image": x})
    per_round: Dict[str, list] = {k: [] for k in sessions}
    every: Dict[str, list] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            ts = np.empty(iters)
            for i in range(iters):
                t0 = time.perf_counter()
                s.run(None, {"image": x})
                ts[i] = time.perf_counter() - t0
            per_round[k].append(float(np.median(ts)) * 1e3)
            every[k].append(ts * 1e3)
    return {k: {"median_ms": float(np.median(v)), "min_round_ms": float(np.min(v)), "max_round_ms": float(np.max(v)),
                "p10_ms": float(np.percentile(np.concatenate(every[k]), 10))}
            for k, v in per_round.items()}
