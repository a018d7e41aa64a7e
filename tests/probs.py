"""Hand-made probability tensors shared by the threshold / evaluation tests."""
from __future__ import annotations

import numpy as np


def two_class_probs(conf, cls) -> np.ndarray:
    """(T, N, 2) probabilities with max prob ``conf`` on class ``cls``."""
    conf, cls = np.asarray(conf, np.float32), np.asarray(cls)
    p = np.empty(conf.shape + (2,), np.float32)
    p[..., 0] = np.where(cls == 0, conf, 1 - conf)
    p[..., 1] = 1 - p[..., 0]
    return p
