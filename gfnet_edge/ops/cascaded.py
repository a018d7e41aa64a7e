"""Cascaded classifiers of the MobileNet / EfficientNet families, and the host loop's
per-step engine over the CPU heads."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import numpy as np

from ._args import Device, choice, ndarray, opt_weights, to_int, triple, weights
from ._ext import _C
from .cuda import DeviceBuffer, device_pointer, from_device, optional_pointer, require_cuda, stream_handle, to_device
from .heads import WEIGHT_DTYPES, ActorHead, GRUHead, check_classifier_rows

_LAYOUTS = ("ntf", "tnf")


class CascadedHead:
    """Cascaded classifiers: the layer taking k step features ``[f_0, ..., f_{k-1}]``
    (in_features = k * F) is used for ``step(features, k)``; the concatenation is never
    materialised.

    Args:
        layers: ``[(W, b), ...]`` (e.g. fc_2 ... fc_T) or a mapping ``{k: (W, b)}``.
        weight_dtype: ``"float32"`` or ``"float16"``.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, layers: Union[Sequence[Tuple[Any, Any]], Mapping[Any, Tuple[Any, Any]]],
                 weight_dtype: str = "float32", device: str = "cpu") -> None:
        self.device = Device.parse(device)
        weight_dtype = choice(weight_dtype, "weight_dtype", WEIGHT_DTYPES)
        items = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
        if not items:
            raise ValueError("layers must not be empty")
        if self.device is Device.CUDA:
            require_cuda()
        native = _C.Linear if self.device is Device.CPU else _C.cuda.Linear
        self._layers: Dict[int, Any] = {}
        for i, pair in enumerate(items):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"layers[{i}] must be a (W, b) pair")
            check_classifier_rows(pair[0])
            w = weights(pair[0], f"layers[{i}].W", 2)
            b = opt_weights(pair[1], f"layers[{i}].b", 1)
            if w.shape[1] in self._layers:
                raise ValueError(f"two layers take {w.shape[1]} inputs")
            self._layers[w.shape[1]] = native(w, b, weight_dtype)
        classes = {impl.out_features for impl in self._layers.values()}
        if len(classes) != 1:
            raise ValueError(f"all layers must have the same number of outputs, got {sorted(classes)}")
        self.weight_dtype = weight_dtype
        self.out_features = classes.pop()

    @property
    def feature_dim(self) -> int:
        """F, the width of one step feature (half the input width of the k = 2 layer)."""
        return min(self._layers) // 2

    def layer(self, k: int, feature_dim: int) -> Any:
        """The extension's layer that takes ``k`` step features of width ``feature_dim``."""
        found = self._layers.get(k * feature_dim)
        if found is None:
            raise ValueError(f"no layer takes k={k} features of size {feature_dim} "
                             f"(layers take {sorted(self._layers)} inputs)")
        return found

    def step(self, features: np.ndarray, k: int, layout: str = "ntf") -> Tuple[np.ndarray, ...]:
        """Logits from the first k step features on numpy arrays.

        Args:
            features: (N, T, F) (``layout="ntf"``) or (T, N, F) (``"tnf"``) float32.
            k: number of step features to use (1 <= k <= T).

        Returns:
            ``(logits (N, C), maxprob (N,) float32, argmax (N,) int32)``.
        """
        features = ndarray(features, "features")
        k = to_int(k, "k")
        if features.ndim != 3:  # the feature width picks the layer
            raise ValueError(f"features must have 3 dimensions (N, T, F or T, N, F), got {features.shape}")
        found = self.layer(k, features.shape[2])
        if self.device is Device.CPU:
            return found.cascaded_step(features, k, layout)
        layout = choice(layout, "layout", _LAYOUTS)
        if features.dtype != np.float32:
            raise TypeError(f"features must be float32, got {features.dtype}")
        if not features.flags.c_contiguous:
            raise ValueError("features must be C-contiguous")
        steps, n = (features.shape[1], features.shape[0]) if layout == "ntf" else features.shape[:2]
        lb, mb, ab = DeviceBuffer(n * self.out_features * 4), DeviceBuffer(n * 4), DeviceBuffer(n * 4)
        self.step_device(to_device(features), steps, n, features.shape[2], k, lb, mb, ab, layout=layout)
        return (from_device(lb, (n, self.out_features), np.float32), from_device(mb, (n,), np.float32),
                from_device(ab, (n,), np.int32))

    def step_device(self, features: Any, steps: int, batch: int, feature_dim: int, k: int, logits: Any,
                    maxprob: Any = None, argmax: Any = None, layout: str = "ntf",
                    x_dtype: str = "float32", logits_dtype: str = "float32", stream: Any = None) -> None:
        """Enqueues one cascaded step on device buffers (``device="cuda"`` only)."""
        if self.device is not Device.CUDA:
            raise RuntimeError("step_device needs a head built with device='cuda'")
        k, feature_dim = to_int(k, "k"), to_int(feature_dim, "feature_dim")
        self.layer(k, feature_dim).cascaded_step(
            device_pointer(features, "features"), layout, to_int(steps, "steps"), to_int(batch, "batch"),
            feature_dim, k, device_pointer(logits, "logits"), optional_pointer(maxprob, "maxprob"),
            optional_pointer(argmax, "argmax"), x_dtype, logits_dtype, stream_handle(stream))


def host_loop(actor: ActorHead, classifier: Union[GRUHead, CascadedHead], steps: int, image_size: int,
              patch_size: int, step0_backbone: bool, mean: Sequence[float], std: Sequence[float],
              feature_dim: int = 0) -> Any:
    """The extension's per-step engine of the host loop over CPU heads.

    One call per step does the classifier step (a :class:`GRUHead`, or a :class:`CascadedHead`
    with its ``feature_dim``, by default :attr:`CascadedHead.feature_dim`), the exit test, the
    compaction of the images still running, the policy step and the next crop (uint8 frames
    normalised with ``mean`` / ``std`` as patches are cut). The returned object has
    ``begin(images, feature, state, logits, thresholds)`` and ``next(feature, state)`` (each
    returns the next patches, or None when the batch is done), ``outputs()`` (predictions,
    confidences, exit steps, coordinates), ``logits()``, ``active()``, and ``profile`` /
    ``part_seconds()``.
    """
    if actor.device is not Device.CPU or getattr(classifier, "device", Device.CPU) is not Device.CPU:
        raise ValueError("the host loop runs CPU heads (device='cpu')")
    if isinstance(classifier, GRUHead):
        cls_cell, cls_head, cascaded = classifier._cell, classifier._head, {}
    else:
        cls_cell = cls_head = None
        feature_dim = feature_dim or classifier.feature_dim
        cascaded = {k: classifier.layer(k, feature_dim) for k in range(2, int(steps) + 1)}
    return _C.HostLoop(actor._cell, actor._head, cls_cell, cls_head, cascaded, int(steps), int(image_size),
                       int(patch_size), bool(step0_backbone), triple(mean, "mean"), triple(std, "std"))
