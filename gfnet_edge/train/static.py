"""The static baseline checkpoint: one timm backbone on full S x S images.

Format (a plain dict of tensors and built-in values, readable with ``weights_only=True``)::

    {"format": "gfnet_edge_static_v1", "model_name", "backbone", "backbone_kwargs",
     "num_classes", "image_size", "mean", "std", "state_dict" (fp16 or fp32 tensors),
     "macs" (multiply-adds per image), "test_accuracy", ...}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..models.backbones import _create_timm
from ..models.checkpoint import (CheckpointError, atomic_torch_save, is_gfnet_checkpoint,  # noqa: F401
                                  is_stage_checkpoint, read_checkpoint_dict, read_torch_file)  # (re-exported errors)
from ..models.macs import count_static_macs
from ..variants import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "gfnet_edge_static_v1"


def save_static(path: os.PathLike, net: nn.Module, backbone: str, backbone_kwargs: Dict[str, Any], num_classes: int,
                image_size: int = 224, metadata: Optional[Dict[str, Any]] = None, half: bool = True) -> Path:
    """Writes the static baseline (atomically); ``macs`` is counted unless given in ``metadata``."""
    sd = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    macs = (metadata or {}).get("macs")
    if macs is None:
        was = net.training
        net.eval()
        macs = count_static_macs(net, image_size)
        net.train(was)
    ck: Dict[str, Any] = {
        "format": FORMAT, "model_name": f"static_{backbone}", "backbone": backbone,
        "backbone_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in backbone_kwargs.items()},
        "num_classes": int(num_classes), "image_size": int(image_size),
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "state_dict": sd, "macs": int(macs),
    }
    ck.update(metadata or {})
    return atomic_torch_save(ck, path)


def load_static(path: os.PathLike) -> Tuple[nn.Module, Dict[str, Any]]:
    """Reads a static baseline: ``(model in eval mode, float32; metadata without the weights)``.

    Raises:
        CheckpointError: unreadable file or not a static-baseline checkpoint.
    """
    ck = _read_static(Path(path))
    net = _create_timm(ck["backbone"], ck["num_classes"], **ck["backbone_kwargs"])
    net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in ck["state_dict"].items()})
    net.eval()
    return net, _meta(ck)


def load_static_meta(path: os.PathLike) -> Dict[str, Any]:
    """A static baseline's metadata (:func:`load_static`'s second value), without building the
    network or reading its weights (their storage is mapped, not read)."""
    return _meta(_read_static(Path(path), mmap=True))


def _read_static(p: Path, mmap: bool = False) -> Dict[str, Any]:
    ck = read_torch_file(p, "static checkpoint", mmap=mmap)
    if is_stage_checkpoint(ck) or is_gfnet_checkpoint(ck):
        what = "a stage checkpoint of gfnet-edge train" if is_stage_checkpoint(ck) else "a GFNet checkpoint"
        raise CheckpointError(f"{p}: {what}, not a static baseline: {static_baseline_hint(p.parent)}")
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a gfnet-edge static baseline (format {FORMAT!r})")
    return ck


def _meta(ck: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in ck.items() if k != "state_dict"}


def static_baseline_hint(folder: Path) -> str:
    """Where a static baseline is wanted (``train --pretrained``, ``calibrate --static``) and a
    file of ``folder`` (or the folder) was given that is none: the run's baseline, or how to
    train one."""
    baseline = folder / "static.pth.tar"
    if baseline.is_file():
        return f"pass its static baseline {baseline}"
    if (folder / "data_index.json").is_file():  # a gfnet-edge train run folder
        return (f"pass a run's static baseline RUN/static.pth.tar ({folder} has none: `gfnet-edge train -o {folder} "
                "--resume --stage static --static-epochs N` trains one)")
    return "pass a static baseline, RUN/static.pth.tar of a gfnet-edge train run (--static-epochs N writes it)"
