"""The GFNet heads: linear layers, GRU cells, the classifier / policy steps, the cascaded
classifiers, and the host loop's per-step engine built from them.

The GRU follows ``torch.nn.GRUCell`` (gate order r, z, n), the actor
``torch.floor(sigmoid(W h + b) * (S - P)).int()``. ``weight_dtype="float16"`` halves the
weight bytes the memory-bound products stream (about 1e-3 relative error). Heads built with
``device="cuda"`` keep their weights on the GPU and run ``step_device`` on device buffers;
their ``step`` also takes numpy (copied to and from the device; convenient for tests).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ._args import INT32_MAX, Device, batch, choice, opt_weights, rows, to_int, weights
from ._ext import _C
from .cuda import (DeviceBuffer, device_pointer, from_device, optional_pointer, require_cuda, stream_handle,
                   to_device)


def linear(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray] = None, relu: bool = False) -> np.ndarray:
    """``x @ w.T + b`` (then ReLU if asked) on float32 arrays, reading ``w`` in place.

    Args:
        x: (N, in) float32 (or (in,), treated as N = 1).
        w: (out, in) float32 C-contiguous (not copied: use :class:`Linear` to convert once).
        b: optional (out,) float32.
        relu: apply ReLU.
    """
    return _C.linear(rows(x), w, b, bool(relu))


def softmax_stats(logits: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Softmax maximum probability (float32) and argmax (int32) per row of float32 (N, C)
    logits. The argmax is the first maximum; a NaN counts as larger than any number (the
    first NaN wins), the rule the CUDA kernel follows too. More than 2^31 - 1 classes (more
    than an int32 argmax indexes) raise ValueError before anything is read."""
    return _C.softmax_stats(logits)


#: Storage of head weights.
WEIGHT_DTYPES = ("float32", "float16")


def check_classifier_rows(w: Any) -> None:
    """Refuses (ValueError) classifier weights with more rows (classes) than an int32 argmax
    indexes, from their shape alone: before they are converted, copied or uploaded."""
    shape = np.shape(w)
    if len(shape) == 2 and shape[0] > 0:  # other shapes are refused by the weights' own checks
        _C.check_classes(int(shape[0]))


def _dtype(value: Any) -> str:
    return choice(value, "weight_dtype", WEIGHT_DTYPES)


class Linear:
    """A linear layer whose weights are converted once (float32 or float16 storage).

    Args:
        w: (out, in) weights (any real dtype).
        b: optional (out,) bias.
        weight_dtype: ``"float32"`` or ``"float16"``.
        device: ``"cpu"`` or ``"cuda"`` (weights uploaded once; use :meth:`forward_device`).
    """

    def __init__(self, w: Any, b: Any = None, weight_dtype: str = "float32", device: str = "cpu") -> None:
        self.device = Device.parse(device)
        native = _C.Linear if self.device is Device.CPU else _C.cuda.Linear
        self._impl = native(weights(w, "w", 2), opt_weights(b, "b", 1), _dtype(weight_dtype))
        self.weight_dtype = weight_dtype
        self.in_features = self._impl.in_features
        self.out_features = self._impl.out_features

    def __call__(self, x: np.ndarray, relu: bool = False) -> np.ndarray:
        """(N, in) float32 -> (N, out) float32 (``device="cpu"``)."""
        if self.device is not Device.CPU:
            raise RuntimeError("call a layer built with device='cuda' through forward_device")
        return self._impl.forward(rows(x), bool(relu))

    def forward_device(self, x: Any, out: Any, batch: int, relu: bool = False, x_dtype: str = "float32",
                       out_dtype: str = "float32", stream: Any = None) -> None:
        """Enqueues ``out = x @ W.T + b`` (then ReLU) on device buffers (``device="cuda"``):
        x (batch, in) in ``x_dtype``, out (batch, out) in ``out_dtype``."""
        if self.device is not Device.CUDA:
            raise RuntimeError("forward_device needs a layer built with device='cuda'")
        self._impl.forward(device_pointer(x, "x"), device_pointer(out, "out"), to_int(batch, "batch"), bool(relu),
                           x_dtype, out_dtype, stream_handle(stream))


class GRUCell:
    """``torch.nn.GRUCell`` with packed weights.

    Args:
        w_ih: (3H, I); w_hh: (3H, H); b_ih, b_hh: (3H,) or None (gate order r, z, n).
        weight_dtype: ``"float32"`` or ``"float16"``.
    """

    def __init__(self, w_ih: Any, w_hh: Any, b_ih: Any = None, b_hh: Any = None,
                 weight_dtype: str = "float32") -> None:
        self._impl = _C.GRUCell(weights(w_ih, "w_ih", 2), weights(w_hh, "w_hh", 2), opt_weights(b_ih, "b_ih", 1),
                                opt_weights(b_hh, "b_hh", 1), _dtype(weight_dtype))
        self.weight_dtype = weight_dtype
        self.input_size = self._impl.input_size
        self.hidden_size = self._impl.hidden_size

    def step(self, x: np.ndarray, h: Optional[np.ndarray] = None) -> np.ndarray:
        """h' (N, H) from x (N, I) and h (N, H) float32 (None: zero state)."""
        return self._impl.step(rows(x), None if h is None else rows(h))


class _GruWithHead:
    """Shared construction of the GRU heads (CPU or CUDA)."""

    _expect_outputs: Optional[int] = None

    def __init__(self, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, w: Any, b: Any,
                 weight_dtype: str = "float32", device: str = "cpu") -> None:
        self.device = Device.parse(device)
        weight_dtype = _dtype(weight_dtype)
        if self._expect_outputs is None:
            check_classifier_rows(w)
        args = (weights(w_ih, "w_ih", 2), weights(w_hh, "w_hh", 2), opt_weights(b_ih, "b_ih", 1),
                opt_weights(b_hh, "b_hh", 1))
        w32, b32 = weights(w, "w", 2), opt_weights(b, "b", 1)
        if self._expect_outputs is not None and w32.shape[0] != self._expect_outputs:
            raise ValueError(f"{type(self).__name__} needs a ({self._expect_outputs}, H) head, got {w32.shape}")
        if self.device is Device.CPU:
            self._cell = _C.GRUCell(*args, weight_dtype)
            self._head = _C.Linear(w32, b32, weight_dtype)
            if self._head.in_features != self._cell.hidden_size:
                raise ValueError(f"head takes {self._head.in_features} inputs but the GRU hidden size "
                                 f"is {self._cell.hidden_size}")
            self.input_size, self.hidden_size = self._cell.input_size, self._cell.hidden_size
            self.out_features = self._head.out_features
        else:
            require_cuda()
            if w32.shape[1] * 3 != args[0].shape[0]:
                raise ValueError(f"head takes {w32.shape[1]} inputs but w_ih implies a hidden size of "
                                 f"{args[0].shape[0] // 3}")
            if b32 is None:
                b32 = np.zeros(w32.shape[0], np.float32)
            self._dev = _C.cuda.GRUHead(*args, w32, b32, weight_dtype)
            self.input_size, self.hidden_size = self._dev.input_size, self._dev.hidden_size
            self.out_features = self._dev.out_features
        self.weight_dtype = weight_dtype

    def _device_inputs(self, x: np.ndarray,
                       h: Optional[np.ndarray]) -> Tuple[int, DeviceBuffer, Optional[DeviceBuffer]]:
        """The batch size, x and h of the numpy convenience path of a CUDA head, checked (the
        kernels take pointers) and uploaded."""
        x = batch(x, "x", self.input_size)
        if h is not None:
            h = batch(h, "h", self.hidden_size)
            if h.shape[0] != x.shape[0]:
                raise ValueError(f"h has {h.shape[0]} rows but x has {x.shape[0]}")
        return x.shape[0], to_device(x), None if h is None else to_device(h)

    def _need_cuda(self) -> None:
        if self.device is not Device.CUDA:
            raise RuntimeError("step_device needs a head built with device='cuda'")


class GRUHead(_GruWithHead):
    """GRU classifier step fused with its Linear head (GFNet's resnet / densenet classifier).

    Args:
        w_ih, w_hh, b_ih, b_hh: the ``torch.nn.GRU`` weights (gate order r, z, n).
        w, b: the head ``Linear(H, classes)``.
        weight_dtype: ``"float32"`` or ``"float16"`` storage.
        device: ``"cpu"`` or ``"cuda"`` (weights uploaded once).
    """

    def step(self, x: np.ndarray, h: Optional[np.ndarray] = None) -> Tuple[np.ndarray, ...]:
        """One step on numpy arrays.

        Args:
            x: (N, I) float32 step feature.
            h: (N, H) float32 hidden state, or None for zeros (step 0).

        Returns:
            ``(h_new (N, H), logits (N, C), maxprob (N,) float32, argmax (N,) int32)``.
        """
        if self.device is Device.CPU:
            return _C.gru_classifier_step(self._cell, self._head, rows(x), None if h is None else rows(h))
        n, xd, hd = self._device_inputs(x, h)
        bufs = [DeviceBuffer(a) for a in (n * self.hidden_size * 4, n * self.out_features * 4, n * 4, n * 4)]
        self.step_device(xd, hd, bufs[0], n, bufs[1], bufs[2], bufs[3])
        return (from_device(bufs[0], (n, self.hidden_size), np.float32),
                from_device(bufs[1], (n, self.out_features), np.float32),
                from_device(bufs[2], (n,), np.float32), from_device(bufs[3], (n,), np.int32))

    def step_device(self, x: Any, h: Any, h_out: Any, batch: int, logits: Any, maxprob: Any = None,
                    argmax: Any = None, x_dtype: str = "float32", logits_dtype: str = "float32",
                    stream: Any = None) -> None:
        """Enqueues one step on device buffers (``device="cuda"`` only).

        Args:
            x: (batch, I) features (``x_dtype``); h: (batch, H) float32 or None (zeros);
            h_out: (batch, H) float32, must not alias h; logits: (batch, C) in ``logits_dtype``;
            maxprob: (batch,) float32 or None; argmax: (batch,) int32 or None.
        """
        self._need_cuda()
        self._dev.step_classifier(device_pointer(x, "x"), optional_pointer(h, "h"), device_pointer(h_out, "h_out"),
                                  to_int(batch, "batch"), device_pointer(logits, "logits"),
                                  optional_pointer(maxprob, "maxprob"), optional_pointer(argmax, "argmax"),
                                  x_dtype, logits_dtype, stream_handle(stream))


class ActorHead(GRUHead):
    """Policy step: GRU, then ``Linear(H, 2)`` + sigmoid -> action -> patch coordinates.

    Same arguments as :class:`GRUHead`; ``w`` must be (2, H).
    """

    _expect_outputs = 2

    def step(self, x: np.ndarray, h: Optional[np.ndarray], image_size: int,  # type: ignore[override]
             patch_size: int) -> Tuple[np.ndarray, ...]:
        """One policy step on numpy arrays.

        Returns:
            ``(h_new (N, H), action (N, 2) float32, coords (N, 2) int32)`` with
            ``coords = floor(action * (image_size - patch_size))`` computed in float32.
        """
        S, P = to_int(image_size, "image_size", 1, INT32_MAX), to_int(patch_size, "patch_size", 1, INT32_MAX)
        if self.device is Device.CPU:
            return _C.gru_actor_step(self._cell, self._head, rows(x), None if h is None else rows(h), S, P)
        if P > S:
            raise ValueError(f"patch_size {P} exceeds image_size {S}")
        n, xd, hd = self._device_inputs(x, h)
        hb, ab, cb = DeviceBuffer(n * self.hidden_size * 4), DeviceBuffer(n * 8), DeviceBuffer(n * 8)
        self.step_device(xd, hd, hb, n, ab, cb, S, P)
        return (from_device(hb, (n, self.hidden_size), np.float32), from_device(ab, (n, 2), np.float32),
                from_device(cb, (n, 2), np.int32))

    def step_device(self, x: Any, h: Any, h_out: Any, batch: int, action: Any,  # type: ignore[override]
                    coords: Any, image_size: int, patch_size: int, x_dtype: str = "float32",
                    stream: Any = None) -> None:
        """Enqueues one policy step: action (batch, 2) float32, coords (batch, 2) int32."""
        self._need_cuda()
        self._dev.step_actor(device_pointer(x, "x"), optional_pointer(h, "h"), device_pointer(h_out, "h_out"),
                             to_int(batch, "batch"), optional_pointer(action, "action"),
                             optional_pointer(coords, "coords"), to_int(image_size, "image_size", 1, INT32_MAX),
                             to_int(patch_size, "patch_size", 1, INT32_MAX), x_dtype, stream_handle(stream))
