"""Pretrained backbone weights for ``gfnet-edge train``: a local file, or timm's download.

A file may hold a plain state dict of the timm model, a dict wrapping one (``state_dict``,
``model``, ``model_state_dict``, ``state_dict_ema``), a gfnet-edge static baseline, or a
``.safetensors`` file; it is read with ``weights_only=True``. The classifier is re-initialised
when its class count differs; any other mismatch is an error naming the keys.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ..errors import InputError, UnavailableError
from ..models.checkpoint import CheckpointError, is_gfnet_checkpoint, is_stage_checkpoint, read_torch_file
from .static import static_baseline_hint

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema")


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_weights_file(path: str, backbone: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """The backbone state dict in ``path`` (see the module docstring) and a note for the log
    after the path: for a GFNet checkpoint, that its focus encoder is the one taken (else "").

    Raises:
        InputError: missing or unreadable file, no state dict inside, a static baseline of another backbone.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: pretrained weights file not found")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            obj = read_torch_file(p, "weights")
    except CheckpointError as exc:
        raise InputError(str(exc)) from exc
    except Exception as exc:  # safetensors raises many types for bad files
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise InputError(f"{p}: not a readable safetensors weights file (truncated or corrupt?): {first[:160]}") from exc
    if is_stage_checkpoint(obj):
        raise InputError(f"{p}: a stage checkpoint of gfnet-edge train (weights and optimiser mid-training), "
                         f"not backbone weights: {static_baseline_hint(p.parent)}")
    note = (" (a GFNet checkpoint: its focus encoder, model_state_dict, starts both encoders; its glance encoder, "
            "policy and classifier are not used)" if is_gfnet_checkpoint(obj) else "")
    if isinstance(obj, dict) and obj.get("format") == "gfnet_edge_static_v1":
        if obj.get("backbone") != backbone:
            raise InputError(f"{p}: a static baseline of {obj.get('backbone')!r}, not {backbone!r}")
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and not _tensor_dict(obj):
        obj = next((obj[k] for k in WRAPPER_KEYS if _tensor_dict(obj.get(k))), obj)
    if not _tensor_dict(obj):
        raise InputError(f"{p}: holds no state dict of tensors (looked at the top level and {', '.join(WRAPPER_KEYS)})")
    return {(k[len("module."):] if k.startswith("module.") else k): v.float() if v.is_floating_point() else v
            for k, v in obj.items()}, note


def timm_pretrained_state(backbone: str, num_classes: int, **kwargs: Any) -> Dict[str, torch.Tensor]:
    """timm's pretrained weights for ``backbone`` (downloaded by timm).

    Raises:
        UnavailableError: timm cannot fetch them here (no network, no weights for this name).
    """
    import logging

    import timm

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its per-retry warnings; a failure ends in the one line below
    try:
        net = timm.create_model(backbone, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as exc:  # network, hub and missing-weights errors all differ
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UnavailableError(
            f"cannot fetch timm's pretrained weights for {backbone!r} ({type(exc).__name__}: {first[:120]}); "
            "download them where a network is reachable and pass --pretrained FILE") from exc
    finally:
        hub_log.setLevel(level)
    return net.state_dict()


def static_kwargs_hint(path: str, backbone_kwargs: Dict[str, Any]) -> str:
    """For weights that do not fit: when ``path`` is a static baseline or a gfnet-edge GFNet
    checkpoint built with other ``backbone_kwargs`` than the run's, the option that builds the
    backbone it fits (else "")."""
    from .static import load_static_meta

    try:
        what, theirs = "a static baseline", load_static_meta(path).get("backbone_kwargs") or {}
    except (CheckpointError, OSError):
        try:  # a GFNet checkpoint records its model's settings (the weights are mapped, not read)
            config = read_torch_file(Path(path), "weights", mmap=True).get("gfnet_edge_config")
        except (CheckpointError, OSError, AttributeError):
            return ""
        if not isinstance(config, dict):
            return ""
        what, theirs = "a GFNet checkpoint", config.get("backbone_kwargs") or {}
    theirs, ours = (json.loads(json.dumps(k)) for k in (theirs, backbone_kwargs))
    if theirs == ours:
        return ""
    return (f"; it is {what} built with --set 'backbone_kwargs={json.dumps(theirs)}' "
            f"(this run: {json.dumps(ours)})")


def _classifier_prefix(net: nn.Module) -> str:
    clf = net.get_classifier() if hasattr(net, "get_classifier") else None
    for name, mod in net.named_modules():
        if mod is clf and name:
            return name + "."
    return "\0"  # no classifier found: nothing is exempt


def load_backbone(net: nn.Module, sd: Dict[str, torch.Tensor], source: str) -> List[str]:
    """Copies ``sd`` into the timm model ``net``; returns the re-initialised classifier keys.

    Raises:
        InputError: keys or shapes that do not fit, outside the classifier.
    """
    own = net.state_dict()
    head = _classifier_prefix(net)
    fresh = [k for k in own if k.startswith(head) and (k not in sd or sd[k].shape != own[k].shape)]
    missing = [k for k in own if k not in sd and k not in fresh]
    unexpected = [k for k in sd if k not in own and not k.startswith(head)]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and k not in fresh and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shape)):
            if keys:
                parts.append(f"{what} ({len(keys)}): {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
        raise InputError(f"{source} does not fit this backbone: " + "; ".join(parts))
    net.load_state_dict({k: v for k, v in sd.items() if k in own and k not in fresh}, strict=False)
    return fresh
