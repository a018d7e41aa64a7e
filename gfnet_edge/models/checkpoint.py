"""Reading and writing GFNet checkpoints (``.pth.tar``).

Two formats are read (see ``docs/gfnet.md``, section "Checkpoints"):

* released: encoders wrapped in DataParallel (``module.`` prefixes) plus metadata
  (``model_name``, ``patch_size``, ``flops``, ``dynamic_threshold`` ...);
* training-script: no prefixes, metadata possibly missing (pass ``model_name`` /
  ``patch_size`` or let them be inferred from the weights).

Files are always read with ``torch.load(weights_only=True)``. :func:`save_checkpoint` writes the
released format, atomically, with a ``gfnet_edge_config`` entry that describes custom models.
"""
from __future__ import annotations

import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch

from ..log import logger
from ..variants import VARIANTS, GFNetSpec, fmap_size, released_spec
from .gfnet import GFNet
from .keymap import add_prefix, is_pycls, pycls_to_timm, strip_prefix, timm_to_pycls

PathLike = Union[str, os.PathLike]

STATE_KEYS = ("model_prime_state_dict", "model_state_dict", "fc", "policy")
METADATA_KEYS = (
    "model_name", "patch_size", "model_flops", "policy_flops", "fc_flops", "flops",
    "anytime_classification", "dynamic_threshold", "budgeted_batch_classification",
)
CONFIG_KEY = "gfnet_edge_config"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason in the message."""


def read_torch_file(path: PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:
    """Loads a torch file with ``weights_only=True`` (tensors and plain containers only), with a
    one-line error instead of torch's advice to load untrusted pickles. ``mmap``: a file in torch's
    zip format maps its tensors' storage instead of reading it (for a caller that reads only the
    non-tensor entries).

    Raises:
        CheckpointError: missing, empty or corrupt file, or one holding other objects.
    """
    import warnings

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: {what} file not found")
    if not p.is_file():
        raise CheckpointError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: {what} file is empty")
    is_zip = zipfile.is_zipfile(p)
    if not is_zip:
        with open(p, "rb") as f:
            head = f.read(2)
        if not head.startswith(b"\x80"):  # neither torch's zip format nor a legacy pickle
            raise CheckpointError(f"{p}: not a readable torch {what} file (truncated or corrupt?): unknown file format")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles before failing or loading
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as exc:  # torch raises many types for bad files
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            import re

            named = re.search(r"GLOBAL:? ([\w.]+)", text)  # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y"
            found = f"the global {named.group(1)}" if named else "a non-tensor object"
            raise CheckpointError(
                f"{p}: refuses to unpickle objects other than tensors and plain containers ({found}); a "
                "training script's checkpoint that also holds its arguments is refused too: from a copy you trust, "
                "save the weights alone (the state_dict of tensors) with torch.save and give that file"
            ) from exc
        msg = next((ln.strip() for ln in text.splitlines() if ln.strip() and "Weights only load failed" not in ln
                    and "weights_only" not in ln and "torch.load" not in ln), type(exc).__name__)
        raise CheckpointError(f"{p}: not a readable torch {what} file (truncated or corrupt?): {msg[:200]}") from exc


def is_gfnet_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a GFNet checkpoint (it holds every section of :data:`STATE_KEYS`)."""
    return isinstance(obj, dict) and all(k in obj for k in STATE_KEYS)


def is_stage_checkpoint(obj: Any) -> bool:
    """Whether a loaded file is a stage checkpoint of ``gfnet-edge train`` (``RUN/<stage>.pt``)."""
    return isinstance(obj, dict) and {"models", "opt", "done"} <= set(obj)


def read_checkpoint_dict(path: PathLike) -> Dict[str, Any]:
    """Loads a checkpoint file as a dict (``weights_only=True``) with clear errors."""
    p = Path(path)
    obj = read_torch_file(p)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a dict checkpoint, found {type(obj).__name__}")
    missing = [k for k in STATE_KEYS if k not in obj]
    gfnet = p.with_name("gfnet.pth.tar")  # what a run folder holds at its end
    use = f"use {gfnet}" + ("" if gfnet.is_file() else ", which the run writes at its end (it holds none yet)")
    if missing and is_stage_checkpoint(obj):
        raise CheckpointError(f"{p}: a stage checkpoint of gfnet-edge train (weights and optimiser mid-training), "
                              f"not a GFNet checkpoint: {use}")
    if missing and obj.get("format") == "gfnet_edge_static_v1":
        raise CheckpointError(f"{p}: a static baseline of gfnet-edge train (one network on whole images, for "
                              f"`gfnet-edge calibrate --static`), not a GFNet checkpoint: {use}")
    if missing:
        raise CheckpointError(
            f"{p}: not a GFNet checkpoint: missing {', '.join(missing)} (found keys: {', '.join(map(str, list(obj)[:12]))})"
        )
    for k in STATE_KEYS:
        if not isinstance(obj[k], Mapping) or not all(isinstance(v, torch.Tensor) for v in obj[k].values()):
            raise CheckpointError(f"{p}: '{k}' is not a state dict of tensors")
    return obj


def _to_float32(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def check_finite(sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuses a state dict with NaN or infinite values (a model built from it would classify every
    image as NaN), naming the first such tensor."""
    for name, t in sd.items():
        # a NaN or infinity makes the sum NaN or infinite: a finite sum clears the tensor in one pass
        # without a mask; a sum that overflows on finite values is checked value by value
        if torch.is_floating_point(t) and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: tensor {name!r} holds {bad} NaN or infinite value(s); "
                                  "the checkpoint is corrupt (or training diverged)")


def infer_model_name(sd: Mapping[str, torch.Tensor]) -> str:
    """Guesses the released variant from encoder weights (no prefixes).

    Raises:
        CheckpointError: the weights match no released variant.
    """
    keys = set(sd)
    name = None
    if "layer4.2.conv3.weight" in keys and "conv1.weight" in keys:
        name = "resnet50"
    elif any(k.startswith("features.denseblock3.") for k in keys):
        n = len({k.split(".")[2] for k in keys if k.startswith("features.denseblock3.")})
        name = {24: "densenet121", 32: "densenet169", 48: "densenet201"}.get(n)
    elif any(k.startswith("s4.") for k in keys):
        w = None
        for k in ("fc.weight", "head.fc.weight"):
            if k in sd:
                w = sd[k].shape[1]
        name = {608: "regnety_600m", 768: "regnety_800m", 888: "regnety_1.6g"}.get(w)
    elif "conv_head.weight" in keys:
        cin = sd["conv_head.weight"].shape[1]
        cout = sd["conv_head.weight"].shape[0]
        if "bn2.weight" in keys:
            name = {1408: "efficientnet_b2", 1536: "efficientnet_b3"}.get(cout)
        else:
            name = {960: "mobilenetv3_large_100", 1200: "mobilenetv3_large_125"}.get(cin)
    if name is None:
        raise CheckpointError("cannot tell the model variant from the weights; pass model_name "
                              "(--model-name on the command line)")
    return name


def infer_patch_size(policy_sd: Mapping[str, torch.Tensor], fmap_channels: int, candidates: Tuple[int, ...]) -> int:
    """Patch size from the policy's state-encoder input size (C*h*h or 32*h*h)."""
    w = policy_sd.get("state_encoder.0.weight")
    if w is None:
        raise CheckpointError("policy has no state_encoder.0.weight; cannot infer patch size")
    if w.dim() == 4:  # conv encoder: the Linear after it takes 32*h*h
        lin = policy_sd.get("state_encoder.3.weight")
        if lin is None:
            raise CheckpointError("policy has a conv encoder but no state_encoder.3.weight")
        hw = math.isqrt(lin.shape[1] // 32)
    else:
        hw = math.isqrt(w.shape[1] // max(fmap_channels, 1))
    matches = [p for p in candidates if fmap_size(p) == hw]
    if len(matches) != 1:
        raise CheckpointError(f"cannot infer the patch size (policy sees a {hw}x{hw} map); pass patch_size")
    return matches[0]


def _checked_spec(spec: GFNetSpec) -> GFNetSpec:
    """A spec read from a checkpoint, with the types and ranges of a manifest's ``model`` entry."""
    from ..manifest_schema import ManifestError, check_model

    if not isinstance(spec.backbone_kwargs, Mapping):
        raise ValueError(f"backbone_kwargs must be a dict, got {type(spec.backbone_kwargs).__name__}")
    try:
        check_model(spec.to_dict())
    except ManifestError as exc:
        raise ValueError(str(exc).replace("manifest field 'model.", "field '", 1)) from None
    return spec


def _check_fits(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, model_name: str) -> None:
    """Refuses a state dict whose keys or shapes differ from ``module``'s."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        if shape:
            parts.append(f"shape mismatches ({len(shape)}): {'; '.join(shape[:4])}")
        raise CheckpointError(f"{what} does not fit {model_name}: " + "; ".join(parts))


def _holds_unsaved_state(model: torch.nn.Module) -> bool:
    """Whether a module holds tensors its state dict does not carry (non-persistent buffers,
    tensors kept as plain attributes), which only its constructor sets."""
    for m in model.modules():
        if m._non_persistent_buffers_set or any(isinstance(v, torch.Tensor) for v in vars(m).values()):
            return True
    return False


def _own_tensors(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], seen: set) -> Dict[str, torch.Tensor]:
    """``sd``'s tensors to become a module's own (``load_state_dict(assign=True)``): in the dtype
    of the module's (``own``), and copied where one shares its storage with a tensor met before
    (``seen``: storage addresses), so that no two of the model's tensors share memory."""
    out = {}
    for k, t in sd.items():
        t = t.to(own[k].dtype)
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[k] = t
    return out


def load_checkpoint(
    path: PathLike,
    model_name: Optional[str] = None,
    patch_size: Optional[int] = None,
) -> GFNet:
    """Reads a GFNet checkpoint (released or training-script format).

    Args:
        path: ``.pth.tar`` file.
        model_name: variant name, required only when the file lacks it and it cannot be inferred;
            if the file names another variant, that is an error.
        patch_size: P, likewise: required only when the file lacks it and it cannot be inferred;
            if the file's P (stored, or fixed by its gfnet-edge config) differs, that is an error.

    Returns:
        The model in eval mode; ``model.meta`` holds the checkpoint's metadata and
        ``model.meta["missing_metadata"]`` lists the metadata keys the file lacks.

    Raises:
        CheckpointError: unreadable file, missing/unexpected keys, wrong variant.
    """
    ck = read_checkpoint_dict(path)
    enc_prime = _to_float32(strip_prefix(ck["model_prime_state_dict"]))
    enc_local = _to_float32(strip_prefix(ck["model_state_dict"]))
    fc_sd = _to_float32(strip_prefix(ck["fc"]))
    policy_sd = _to_float32(strip_prefix(ck["policy"]))
    for section, sd in (("model_prime_state_dict", enc_prime), ("model_state_dict", enc_local), ("fc", fc_sd),
                        ("policy", policy_sd)):
        check_finite(sd, f"{path}: {section}")

    if CONFIG_KEY in ck:
        try:
            spec = _checked_spec(GFNetSpec.from_dict(dict(ck[CONFIG_KEY])))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad {CONFIG_KEY}: {exc}") from exc
        if model_name and model_name != spec.model_name:
            raise CheckpointError(f"{path}: checkpoint is {spec.model_name!r}, not {model_name!r}")
        if patch_size is not None and int(patch_size) != spec.patch_size:
            raise CheckpointError(f"{path}: checkpoint patch size is {spec.patch_size}, not {patch_size}")
    else:
        file_name = ck.get("model_name")
        if file_name is not None and not isinstance(file_name, str):
            raise CheckpointError(f"{path}: model_name must be a string, got {type(file_name).__name__}")
        if file_name is not None and model_name is not None and file_name != model_name:
            raise CheckpointError(f"{path}: checkpoint is {file_name!r}, not {model_name!r}")
        name = file_name or model_name or infer_model_name(enc_local)
        if name not in VARIANTS:
            raise CheckpointError(f"{path}: unknown model_name {name!r}; released variants: {', '.join(VARIANTS)}")
        v = VARIANTS[name]
        P = ck.get("patch_size") or patch_size
        if P is not None and (isinstance(P, bool) or not isinstance(P, int)):
            raise CheckpointError(f"{path}: patch_size must be an integer, got {P!r}")
        if P is None:
            P = infer_patch_size(policy_sd, v.fmap_channels, v.patch_sizes + tuple(p for p in (96, 128, 144) if p not in v.patch_sizes))
        if patch_size is not None and int(P) != int(patch_size):
            raise CheckpointError(f"{path}: checkpoint patch size is {P}, not {patch_size}")
        clf_w = fc_sd.get("fc.weight", fc_sd.get("fc_2.weight"))
        if clf_w is None:
            raise CheckpointError(f"{path}: classifier 'fc' has neither fc.weight nor fc_2.weight")
        spec = released_spec(name, int(P), num_classes=int(clf_w.shape[0]))
    if spec.family == "regnet":
        if is_pycls(enc_prime):
            enc_prime = pycls_to_timm(enc_prime)
        if is_pycls(enc_local):
            enc_local = pycls_to_timm(enc_local)
    sections = ((lambda m: m.model_prime.net, enc_prime, "model_prime_state_dict (global encoder)"),
                (lambda m: m.model.net, enc_local, "model_state_dict (local encoder)"),
                (lambda m: m.fc, fc_sd, "fc (classifier)"), (lambda m: m.policy, policy_sd, "policy"))
    try:
        with torch.device("meta"):  # shapes only: sizes the tensors do not have fail before any allocation
            model = GFNet(spec)
        for part, sd, what in sections:
            _check_fits(part(model), sd, what, spec.model_name)
        # the file's tensors become the model's (no random initialisation, no second probe of the
        # encoder, no copy), unless the model holds state that a state dict leaves out
        assign = not _holds_unsaved_state(model)
        if not assign:
            model = GFNet(spec)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    seen: set = set()
    for part, sd, what in sections:
        module = part(model)
        if assign:
            sd = _own_tensors(sd, module.state_dict(), seen)
        module.load_state_dict(sd, strict=True, assign=assign)
    meta = {k: ck[k] for k in METADATA_KEYS if k in ck}
    meta["missing_metadata"] = [k for k in METADATA_KEYS if k not in ck]
    if isinstance(ck.get("demo_data"), dict):  # demo models record their data generator's config
        meta["demo_data"] = ck["demo_data"]
    if isinstance(ck.get("train_config"), dict):  # how gfnet-edge train made it (gfnet-edge info shows it)
        meta["train_config"] = ck["train_config"]
    names = ck.get("classes")  # a model trained on an image folder: its class folders' names
    if names is not None:
        if (isinstance(names, (list, tuple)) and len(names) == spec.num_classes and len(set(names)) == len(names)
                and all(isinstance(c, str) and 0 < len(c) <= 256 for c in names)):
            meta["classes"] = list(names)
        else:
            logger.warning("%s: its 'classes' entry is not %d distinct class names; the bundle will have no "
                           "class names", path, spec.num_classes)
    meta["source"] = str(path)
    model.meta = meta
    model.eval()
    return model


def save_checkpoint(
    path: PathLike,
    model: GFNet,
    metadata: Optional[Dict[str, Any]] = None,
    half: bool = False,
    pycls_names: bool = True,
) -> Path:
    """Writes ``model`` in the released format (atomically).

    Args:
        path: output file.
        model: the GFNet.
        metadata: extra entries (``anytime_classification``, ``dynamic_threshold``,
            ``budgeted_batch_classification`` ...). ``flops`` and the per-part costs are computed
            from the model when not given.
        half: store floating tensors as float16 (loading restores float32).
        pycls_names: write RegNet encoders with pycls names, as the reference does.

    Returns:
        The path written.
    """
    from .macs import count_step_macs

    spec = model.spec
    costs = count_step_macs(model)

    def enc(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        sd = {k: v.detach().cpu() for k, v in sd.items()}
        if spec.family == "regnet" and pycls_names:
            sd = timm_to_pycls(sd)
        return add_prefix(sd)

    def cast(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not half:
            return sd
        return {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}

    ck: Dict[str, Any] = {
        "model_name": spec.model_name,
        "patch_size": spec.patch_size,
        "model_prime_state_dict": cast(enc(model.model_prime.net.state_dict())),
        "model_state_dict": cast(enc(model.model.net.state_dict())),
        "fc": cast({k: v.detach().cpu() for k, v in model.fc.state_dict().items()}),
        "policy": cast({k: v.detach().cpu() for k, v in model.policy.state_dict().items()}),
        "model_flops": costs.backbone,
        "policy_flops": costs.policy,
        "fc_flops": costs.classifier,
        "flops": list(costs.cumulative),
        CONFIG_KEY: spec.to_dict(),
    }
    for k, v in (metadata or {}).items():
        ck[k] = v
    return atomic_torch_save(ck, path)


class _WriteRecorder:
    """A binary file for ``torch.save`` that keeps the first exception of its writes: torch
    reports any (a full disk's ``OSError``, a Ctrl-C's ``KeyboardInterrupt`` raised by a signal
    handler during the write) only as ``RuntimeError: ... unexpected pos``."""

    def __init__(self, f, name: str) -> None:
        self.f, self.name, self.error = f, name, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename (no half file).
    A write the file system refuses raises its ``OSError`` (``No space left on device``), a signal
    handler's exception during a write (Ctrl-C) that exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            out = _WriteRecorder(f, tmp)
            try:
                torch.save(obj, out)
            except RuntimeError as exc:  # torch words a failed write as a size mismatch
                if out.error is None:
                    raise
                raise out.error from exc
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's file is private; give it a plain file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
