"""Parameter-name mapping between checkpoint formats and the libraries' models.

* ``module.`` prefixes (DataParallel) are stripped on load and written on save.
* RegNetY checkpoints use pycls names; timm's ``regnety_*`` use others (table: docs/gfnet.md, "Checkpoints").
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import torch

# (pycls pattern, timm replacement); applied in order to each key.
_PYCLS_TO_TIMM: List[Tuple[str, str]] = [
    (r"^(s\d+\.b\d+)\.proj\.", r"\1.downsample.conv."),
    (r"^(s\d+\.b\d+)\.bn\.", r"\1.downsample.bn."),
    (r"\.f\.a\.", ".conv1.conv."),
    (r"\.f\.a_bn\.", ".conv1.bn."),
    (r"\.f\.b\.", ".conv2.conv."),
    (r"\.f\.b_bn\.", ".conv2.bn."),
    (r"\.f\.c\.", ".conv3.conv."),
    (r"\.f\.c_bn\.", ".conv3.bn."),
    (r"\.f\.se\.f_ex\.0\.", ".se.fc1."),
    (r"\.f\.se\.f_ex\.2\.", ".se.fc2."),
    (r"^fc\.", "head.fc."),
]
_TIMM_TO_PYCLS: List[Tuple[str, str]] = [
    (r"^(s\d+\.b\d+)\.downsample\.conv\.", r"\1.proj."),
    (r"^(s\d+\.b\d+)\.downsample\.bn\.", r"\1.bn."),
    (r"\.conv1\.conv\.", ".f.a."),
    (r"\.conv1\.bn\.", ".f.a_bn."),
    (r"\.conv2\.conv\.", ".f.b."),
    (r"\.conv2\.bn\.", ".f.b_bn."),
    (r"\.conv3\.conv\.", ".f.c."),
    (r"\.conv3\.bn\.", ".f.c_bn."),
    (r"\.se\.fc1\.", ".f.se.f_ex.0."),
    (r"\.se\.fc2\.", ".f.se.f_ex.2."),
    (r"^head\.fc\.", "fc."),
]

StateDict = Dict[str, torch.Tensor]


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    """Removes ``prefix`` from every key that has it (DataParallel checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def add_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    return {prefix + k: v for k, v in sd.items()}


def _apply(sd: Mapping[str, torch.Tensor], rules: List[Tuple[str, str]]) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def is_pycls(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when a RegNet state dict uses pycls names (``s1.b1.f.a.weight`` ...)."""
    return any(".f.a." in k or ".f.a_bn." in k for k in sd)


def pycls_to_timm(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return _apply(sd, _PYCLS_TO_TIMM)


def timm_to_pycls(sd: Mapping[str, torch.Tensor]) -> StateDict:
    return _apply(sd, _TIMM_TO_PYCLS)
