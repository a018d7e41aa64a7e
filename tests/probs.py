"""Hand-made probability tensors and threshold choices shared by the threshold, evaluation and
loop tests."""
from __future__ import annotations

import numpy as np


def two_class_probs(conf, cls) -> np.ndarray:
    """(T, N, 2) probabilities with max prob ``conf`` on class ``cls``."""
    conf, cls = np.asarray(conf, np.float32), np.asarray(cls)
    p = np.empty(conf.shape + (2,), np.float32)
    p[..., 0] = np.where(cls == 0, conf, 1 - conf)
    p[..., 1] = 1 - p[..., 0]
    return p


def gap_thresholds(probs: np.ndarray, margin: float = 2e-4) -> list:
    """Per-step thresholds placed, step after step, in a gap between the max probabilities of
    the images still running, as near their median as a gap wider than ``2 * margin`` allows:
    about half of them exit at every step (survivors are compacted after every step, not only
    the first) and no sample lies within ``margin`` of a threshold (exit decisions robust to
    float noise). 2.0 (nobody exits) where there is no such gap."""
    T, n = probs.shape[:2]
    running = np.arange(n)
    thr = []
    for t in range(T - 1):
        mp = probs[t, running].max(axis=1)
        v, k = np.sort(mp), running.size
        # a threshold between v[i] and v[i + 1] lets k - 1 - i images exit; middle first
        order = sorted(range(k - 1), key=lambda i: abs(2 * (i + 1) - k))
        wide = [i for i in order if v[i + 1] - v[i] > 2 * margin]
        thr.append(float(v[wide[0]] + v[wide[0] + 1]) / 2 if wide else 2.0)
        running = running[mp < thr[-1]]
    return thr + [-1e8]


def exits_mid_loop(exit_step: np.ndarray, T: int) -> bool:
    """True when, at some focus step t before the last, an image exits while one after it in
    the batch runs on: the states of a focus step were compacted, survivors moving up a row
    (a prefix of the batch surviving would let a compaction that does nothing pass)."""
    for t in range(1, T - 1):
        gone, on = np.flatnonzero(exit_step == t), np.flatnonzero(exit_step > t)
        if gone.size and on.size and gone.min() < on.max():
            return True
    return False
