"""The GRU / Linear heads of a bundle (``heads.npz``), bound to the extension's kernels."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Dict

import numpy as np

from ..errors import InputError
from ..model_desc import ModelDesc, as_desc

#: Storage of the head weights in the extension (``Runtime(head_dtype=...)``, ``--head-dtype``).
HEAD_DTYPES = ("float32", "float16")


#: Largest ``heads.npz`` content read, once decompressed (ResNet-50's heads are about 50 MiB).
MAX_HEAD_BYTES = 1 << 30


def load_head_arrays(path: Path) -> Dict[str, np.ndarray]:
    """Reads ``heads.npz`` without allowing pickled objects, nor more than
    :data:`MAX_HEAD_BYTES` of arrays once decompressed (judged from the archive's directory
    before anything is decompressed)."""
    try:
        with zipfile.ZipFile(path) as zf:
            size = sum(info.file_size for info in zf.infolist())
        if size > MAX_HEAD_BYTES:
            raise InputError(f"{path}: head weights of {size / 2 ** 20:.0f} MiB once decompressed, more than "
                             f"{MAX_HEAD_BYTES >> 20} MiB (not a gfnet-edge heads.npz)")
        with np.load(path, allow_pickle=False) as z:
            return {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot read head weights ({exc})") from exc
    except Exception as exc:  # a corrupt archive raises many more types (numpy's header parser, zipfile)
        raise InputError(f"{path}: cannot read head weights ({type(exc).__name__}: {exc})") from exc


def _need(arrays: Dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in arrays:
        raise InputError(f"head weights lack {key!r}")
    return arrays[key]


def actor_head(arrays: Dict[str, np.ndarray], weight_dtype: str = "float32", device: str = "cpu"):
    """The policy head (:class:`gfnet_edge.ops.ActorHead`) of ``heads.npz`` arrays."""
    from .. import ops

    return ops.ActorHead(*(_need(arrays, k) for k in ("pol.w_ih", "pol.w_hh", "pol.b_ih", "pol.b_hh",
                                                      "pol.actor.w", "pol.actor.b")),
                         weight_dtype=weight_dtype, device=device)


class HeadSet:
    """Classifier and policy heads for one model.

    Args:
        arrays: from :func:`load_head_arrays`.
        model: the model description (classifier kind, sizes); a manifest ``model`` dict is parsed.
        device: ``"cpu"`` (numpy steps) or ``"cuda"`` (weights uploaded once; the device loop
            uses the heads' ``step_device``).
    """

    def __init__(self, arrays: Dict[str, np.ndarray], model: "ModelDesc | Dict[str, Any]", device: str = "cpu",
                 weight_dtype: str = "float32") -> None:
        from .. import ops

        if weight_dtype not in HEAD_DTYPES:
            raise InputError(f"head weight dtype must be one of {', '.join(HEAD_DTYPES)}, got {weight_dtype!r}")
        self.weight_dtype = weight_dtype

        self.device = device
        model = as_desc(model)
        self.kind = model.classifier
        self.steps = model.steps
        self.image_size = model.image_size
        self.patch_size = model.patch_size

        def need(k: str) -> np.ndarray:
            return _need(arrays, k)

        if self.kind == "gru":
            self.cls = ops.GRUHead(need("cls.w_ih"), need("cls.w_hh"), need("cls.b_ih"), need("cls.b_hh"),
                                   need("cls.fc.w"), need("cls.fc.b"), weight_dtype=weight_dtype,
                                   device=device)
            self.cls_hidden = int(arrays["cls.w_hh"].shape[1])
        else:
            self.cls = ops.CascadedHead([(need(f"cls.fc_{k}.w"), need(f"cls.fc_{k}.b")) for k in range(2, self.steps + 1)],
                                        weight_dtype=weight_dtype, device=device)
            self.cls_hidden = 0
        self.actor = actor_head(arrays, weight_dtype, device)
        self.pol_hidden = int(arrays["pol.w_hh"].shape[1])

    def host_loop(self, model: ModelDesc):
        """The extension's per-step engine of the host loop (:class:`gfnet_edge._C.HostLoop`) over
        these heads (CPU only): heads, exit test, compaction, policy and crop in one call."""
        from .. import ops

        if self.device != "cpu":
            raise ValueError("the host loop needs heads built with device='cpu'")
        return ops.host_loop(self.actor, self.cls, self.steps, self.image_size, self.patch_size,
                             model.step0_backbone, model.mean, model.std)
