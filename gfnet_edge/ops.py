"""Per-step kernels around the GFNet backbones: a thin, validating wrapper over ``gfnet_edge._C``.

Everything here takes and returns numpy arrays (CPU) or device pointers (CUDA) and never
imports torch. Shapes use N for the batch, S for the full input size, P for the patch /
glance size, H for a GRU hidden size and F for a feature size.

CPU (float32, numpy in / numpy out)::

    preprocess(frames, image_size, crop_pct=0.875, interpolation="bilinear", bgr=False,
               mean=IMAGENET_MEAN, std=IMAGENET_STD, glance_size=None,
               glance_interpolation="bicubic", out=None, glance_out=None)
        -> images (N, 3, S, S)  or  (images, glance (N, 3, P, P)) when glance_size is given
    resize_crop(frames, image_size, crop_pct=0.875, interpolation="bilinear", out=None)
        -> uint8 (N, S, S, 3): preprocess's resize + centre crop without the normalisation
    glance(images, patch_size, interpolation="bicubic", out=None, mean=None, std=None, bgr=False)
        -> (N, 3, P, P); images float32 (N, 3, S, S), or uint8 frames (N, S, S, 3) with mean/std
    crop_patches(images, coords, patch_size, out=None, mean=None, std=None, bgr=False, index=None)
        -> (M, 3, P, P); images as for glance (uint8 frames are normalised while cropping);
        patch i from image index[i] (default i)
    linear(x, w, b=None, relu=False) -> (N, out)
    softmax_stats(logits) -> (maxprob float32 (N,), argmax int32 (N,))
    Linear(w, b=None, weight_dtype="float32")(x, relu=False) -> (N, out)
    GRUCell(w_ih, w_hh, b_ih=None, b_hh=None, weight_dtype="float32").step(x, h=None) -> h'
    GRUHead(w_ih, w_hh, b_ih, b_hh, w, b, weight_dtype="float32", device="cpu")
        .step(x, h=None) -> (h', logits, maxprob, argmax)
    ActorHead(w_ih, w_hh, b_ih, b_hh, w, b, weight_dtype="float32", device="cpu")
        .step(x, h, image_size, patch_size) -> (h', action (N, 2), coords int32 (N, 2))
    CascadedHead([(W_2, b_2), (W_3, b_3), ...], weight_dtype="float32", device="cpu")
        .step(features, k, layout="ntf") -> (logits, maxprob, argmax)

``preprocess`` reproduces torchvision exactly: ``resize(frame_uint8_tensor, int(S / crop_pct),
interpolation, antialias=True)`` (PyTorch's PIL-equivalent uint8 kernel), ``center_crop(S)``,
``/ 255``, ``normalize(mean, std)``; the glance is ``F.interpolate(images, (P, P), mode,
align_corners=True)``. The GRU follows ``torch.nn.GRUCell`` (gate order r, z, n), the actor
``torch.floor(sigmoid(W h + b) * (S - P)).int()``. ``weight_dtype="float16"`` halves the
weight bytes the memory-bound products stream (about 1e-3 relative error).

CUDA (device pointers as ints or objects exposing one, a ``stream`` that is a
:class:`Stream`, an int handle, a torch / CuPy stream, or None for the default stream;
every call only enqueues work unless noted)::

    has_cuda_build(), cuda_device_count(), cuda_device_properties(index=0)
    DeviceBuffer(nbytes): .ptr .nbytes .copy_from_host(a, stream) .copy_to_host(a, stream) .zero()
    Stream(): .handle .synchronize()
    to_device(array, stream=None) -> DeviceBuffer;  from_device(buf, shape, dtype, stream=None)
    cuda_preprocess(frame_ptr, height, width, image_size, out_ptr, crop_pct=0.875, ...)
    cuda_glance(images_ptr, n, image_size, out_ptr, patch_size, ...)
    cuda_crop_patches(images_ptr, n, image_size, coords_ptr, out_ptr, patch_size, ...)
    cuda_gather_rows(src_ptr, src_rows, idx, dst_ptr, row_bytes, n=None, error_flag=None, stream=None)
    cuda_copy(dst_ptr, src_ptr, nbytes, stream=None)
    cuda_softmax_stats(logits_ptr, n, classes, maxprob_ptr, argmax_ptr, logits_out=None, ...)
    CudaGraph(): .begin_capture(stream) .end_capture() .launch(stream) .nodes
    CudaEvent(): .record(stream) .wait(stream) .elapsed_ms(start_event)
    pinned_empty(shape, dtype) -> numpy array in page-locked host memory
    GRUHead(..., device="cuda").step_device(x_ptr, h_ptr, h_out_ptr, batch, logits_ptr, ...)
    ActorHead(..., device="cuda").step_device(x_ptr, h_ptr, h_out_ptr, batch, action_ptr, ...)
    CascadedHead(..., device="cuda").step_device(features_ptr, steps, batch, feature_dim, k, ...)

The heads built with ``device="cuda"`` also accept numpy in ``step`` (copied to and from the
device; convenient for tests). Float16 device buffers are allowed for the kernels' inputs
and outputs where a ``*_dtype`` argument says so; GRU hidden states are always float32.

Errors: a wrong dtype (uint8 frames without mean and std included) raises TypeError; a wrong
shape, a non-contiguous array, an out-of-range coordinate or size, or a size mismatch raises
ValueError; a CUDA call without a usable GPU (or in a build without CUDA) raises RuntimeError.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "gfnet_edge._C (the native extension) is not built: run `pip install -e .` "
        f"in the repository ({exc})"
    ) from exc

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "resize_size", "preprocess", "resize_crop", "glance", "crop_patches",
    "linear", "softmax_stats", "Linear", "GRUCell", "GRUHead", "ActorHead", "CascadedHead",
    "get_num_threads", "set_num_threads", "simd_level", "has_cuda_build", "cuda_device_count",
    "cuda_device_properties", "DeviceBuffer", "Stream", "to_device", "from_device",
    "cuda_preprocess", "cuda_glance", "cuda_crop_patches", "cuda_gather_rows", "cuda_copy",
    "cuda_softmax_stats",
]

IMAGENET_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("bilinear", "bicubic")
_DTYPES = ("float32", "float16")

ArrayPair = Tuple[np.ndarray, np.ndarray]


# ------------------------------------------------------------------ validation helpers ----
def _int(value: Any, name: str, minimum: int = 1) -> int:
    if type(value) is int and value >= minimum:  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _triple(value: Any, name: str) -> Tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in value)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of 3 numbers") from exc
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite")
    return vals  # type: ignore[return-value]


def _ndarray(value: Any, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(value).__name__}")
    return value


def _weights(value: Any, name: str, ndim: int) -> np.ndarray:
    """Converts weights (any real array-like) once to contiguous float32."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return arr


def _opt_weights(value: Any, name: str, ndim: int) -> Optional[np.ndarray]:
    return None if value is None else _weights(value, name, ndim)


def _batch(x: Any, name: str, width: int) -> np.ndarray:
    """A float32 (N, width) C-contiguous batch; a 1-D vector of `width` is promoted to N = 1."""
    x = _ndarray(x, name)
    if x.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {x.dtype}")
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != width or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, {width}), got {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    return x


def resize_size(image_size: int, crop_pct: float) -> int:
    """The shorter-side resize before the centre crop: ``int(image_size / crop_pct)``."""
    image_size = _int(image_size, "image_size")
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, numbers.Real):
        raise TypeError(f"crop_pct must be a number, got {type(crop_pct).__name__}")
    if not 0.0 < float(crop_pct) <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(image_size / float(crop_pct))


# ------------------------------------------------------------------------ CPU kernels ----
def get_num_threads() -> int:
    """Threads the CPU kernels use (default: the number of hardware threads)."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the number of threads of the CPU kernels (>= 1)."""
    _C.set_num_threads(_int(n, "n"))


def simd_level() -> str:
    """``"avx2"`` or ``"generic"``: the CPU code path in use (results are identical)."""
    return _C.simd_level()


def _frame_list(frames: Any) -> List[np.ndarray]:
    """One frame, an (N, H, W, 3) array or a list of frames -> a non-empty list of arrays."""
    if isinstance(frames, np.ndarray):
        if frames.ndim == 4:
            frame_list = [frames[i] for i in range(frames.shape[0])]
        else:
            frame_list = [frames]
    elif isinstance(frames, (list, tuple)):
        frame_list = list(frames)
    else:
        raise TypeError(f"frames must be a numpy array or a list of arrays, got {type(frames).__name__}")
    if not frame_list:
        raise ValueError("frames must not be empty")
    for i, f in enumerate(frame_list):
        _ndarray(f, f"frames[{i}]")
    return frame_list


def preprocess(
    frames: Union[np.ndarray, Sequence[np.ndarray]],
    image_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    bgr: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    glance_size: Optional[int] = None,
    glance_interpolation: str = "bicubic",
    out: Optional[np.ndarray] = None,
    glance_out: Optional[np.ndarray] = None,
) -> Union[np.ndarray, ArrayPair]:
    """Pre-processes uint8 HWC frames into normalised (N, 3, S, S) float32 images.

    Resize (antialiased, shorter side to ``int(S / crop_pct)``), centre crop, scale and
    normalise in one pass per frame, plus the glance in a second pass when ``glance_size``
    is given. Bit-identical to torchvision's uint8 path (see the module docstring).

    Args:
        frames: one (H, W, 3) uint8 frame, an (N, H, W, 3) array, or a list of frames of
            any sizes; each C-contiguous.
        image_size: S, the crop size.
        crop_pct: resize the shorter side to ``int(S / crop_pct)``; in (0, 1].
        interpolation: ``"bilinear"`` or ``"bicubic"`` (PIL-style antialiased filters).
        bgr: the frames are B, G, R (output channels are always R, G, B).
        mean: per-channel mean (R, G, B) subtracted after scaling to [0, 1].
        std: per-channel standard deviation (non-zero).
        glance_size: P; also return the glance (align_corners=True resize of the images).
        glance_interpolation: ``"bilinear"`` or ``"bicubic"`` (a = -0.75).
        out: optional (N, 3, S, S) float32 C-contiguous array to write into (e.g. a slice
            of a larger batch).
        glance_out: optional (N, 3, P, P) float32 array for the glance.

    Returns:
        The images, or ``(images, glance)`` when ``glance_size`` is given.
    """
    frame_list = _frame_list(frames)
    size = resize_size(image_size, crop_pct)
    interp = _choice(interpolation, "interpolation", _INTERPOLATIONS)
    ginterp = _choice(glance_interpolation, "glance_interpolation", _INTERPOLATIONS)
    g = 0 if glance_size is None else _int(glance_size, "glance_size")
    if g == 0 and glance_out is not None:
        raise ValueError("glance_out given without glance_size")
    images, gl = _C.preprocess(frame_list, int(image_size), size, interp, bool(bgr),
                               list(_triple(mean, "mean")), list(_triple(std, "std")), out, g,
                               ginterp, glance_out)
    return images if glance_size is None else (images, gl)


def resize_crop(
    frames: Union[np.ndarray, Sequence[np.ndarray]],
    image_size: int,
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The resize and centre crop of :func:`preprocess` without the normalisation.

    Returns uint8 (N, S, S, 3) frames in the input's channel order: the levels
    :func:`preprocess` normalises (``preprocess(resize_crop(f, S, c), S, crop_pct=1.0)`` equals
    ``preprocess(f, S, c)`` bit for bit). Keeping images as uint8 until a patch is cut (see
    :func:`glance` and :func:`crop_patches`) moves a quarter of the bytes.

    Args:
        frames: as for :func:`preprocess`.
        image_size: S.
        crop_pct: resize the shorter side to ``int(S / crop_pct)``; in (0, 1].
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        out: optional (N, S, S, 3) uint8 C-contiguous array to write into.
    """
    frame_list = _frame_list(frames)
    return _C.resize_crop(frame_list, int(image_size), resize_size(image_size, crop_pct),
                          _choice(interpolation, "interpolation", _INTERPOLATIONS), out)


def _normalisation(images: np.ndarray, mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                   bgr: bool) -> Optional[Tuple[list, list, bool]]:
    """``(mean, std, bgr)`` for uint8 frames (which need them), None for float images (which
    must not have them)."""
    if images.dtype == np.uint8:
        if mean is None or std is None:
            raise TypeError("images have dtype uint8: uint8 frames (N, S, S, 3) need mean and std (they are "
                            "normalised on the fly); normalised images must be float32")
        return list(_triple(mean, "mean")), list(_triple(std, "std")), bool(bgr)
    if mean is not None or std is not None or bgr:
        raise ValueError("mean, std and bgr apply to uint8 frames only; these images are "
                         f"{images.dtype} (already normalised)")
    return None


def glance(images: np.ndarray, patch_size: int, interpolation: str = "bicubic",
           out: Optional[np.ndarray] = None, mean: Optional[Sequence[float]] = None,
           std: Optional[Sequence[float]] = None, bgr: bool = False) -> np.ndarray:
    """Resizes square images to (N, C, P, P), align_corners=True.

    Matches ``torch.nn.functional.interpolate(images, (P, P), mode=interpolation,
    align_corners=True)`` within 1e-5 (bicubic uses a = -0.75 and clamped borders).

    Args:
        images: normalised float32 (N, C, S, S); or uint8 frames (N, S, S, 3) with ``mean`` and
            ``std``, whose glance is returned normalised (the glance of the normalised images
            up to float rounding: the levels are resampled, then normalised).
        patch_size: P.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        out: optional (N, C, P, P) float32 output.
        mean, std: per-channel normalisation of uint8 frames (R, G, B).
        bgr: the uint8 frames are B, G, R (the output is R, G, B).
    """
    _ndarray(images, "images")
    P = _int(patch_size, "patch_size")
    interp = _choice(interpolation, "interpolation", _INTERPOLATIONS)
    norm = _normalisation(images, mean, std, bgr)
    if norm is not None:
        return _C.glance_u8(images, P, interp, *norm, out)
    return _C.glance(images, P, interp, out)


def crop_patches(images: np.ndarray, coords: np.ndarray, patch_size: int,
                 out: Optional[np.ndarray] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, bgr: bool = False,
                 index: Optional[np.ndarray] = None) -> np.ndarray:
    """Cuts ``images[k, :, r:r+P, c:c+P]`` for each ``(r, c) = coords[i]``, with ``k = i`` or
    ``k = index[i]``.

    Args:
        images: (N, C, S, S) float32, C-contiguous; or uint8 frames (N, S, S, 3) with ``mean``
            and ``std``, cut and normalised in one pass (bit-identical to cutting the
            normalised images of :func:`preprocess`).
        coords: (M, 2) int32 (row, col), each in [0, S - P]; anything else raises ValueError.
            M = N without ``index``.
        patch_size: P.
        out: optional (M, C, P, P) float32 output.
        mean, std, bgr: as for :func:`glance`.
        index: optional (M,) int64 image of each patch, each in [0, N) (the images still
            running, without compacting the batch).
    """
    _ndarray(images, "images")
    _ndarray(coords, "coords")
    P = _int(patch_size, "patch_size")
    norm = _normalisation(images, mean, std, bgr)
    if norm is not None:
        return _C.crop_patches_u8(images, coords, P, *norm, out, index)
    return _C.crop_patches(images, coords, P, out, index)


def linear(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray] = None, relu: bool = False) -> np.ndarray:
    """``x @ w.T + b`` (then ReLU if asked) on float32 arrays, reading ``w`` in place.

    Args:
        x: (N, in) float32 (or (in,), treated as N = 1).
        w: (out, in) float32 C-contiguous (not copied: use :class:`Linear` to convert once).
        b: optional (out,) float32.
        relu: apply ReLU.
    """
    _ndarray(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must have shape (out, in), got {w.shape}")
    return _C.linear(_batch(x, "x", w.shape[1]), w, b, bool(relu))


def softmax_stats(logits: np.ndarray) -> ArrayPair:
    """Softmax maximum probability (float32) and argmax (int32, first maximum) per row."""
    _ndarray(logits, "logits")
    return _C.softmax_stats(logits)


class Linear:
    """A linear layer whose weights are converted once (float32 or float16 storage).

    Args:
        w: (out, in) weights (any real dtype).
        b: optional (out,) bias.
        weight_dtype: ``"float32"`` or ``"float16"``.
    """

    def __init__(self, w: Any, b: Any = None, weight_dtype: str = "float32") -> None:
        self.weight_dtype = _choice(weight_dtype, "weight_dtype", _DTYPES)
        self._impl = _C.Linear(_weights(w, "w", 2), _opt_weights(b, "b", 1), self.weight_dtype)
        self.in_features = self._impl.in_features
        self.out_features = self._impl.out_features

    def __call__(self, x: np.ndarray, relu: bool = False) -> np.ndarray:
        """(N, in) float32 -> (N, out) float32."""
        return self._impl.forward(_batch(x, "x", self.in_features), bool(relu))


class GRUCell:
    """``torch.nn.GRUCell`` with packed weights.

    Args:
        w_ih: (3H, I); w_hh: (3H, H); b_ih, b_hh: (3H,) or None (gate order r, z, n).
        weight_dtype: ``"float32"`` or ``"float16"``.
    """

    def __init__(self, w_ih: Any, w_hh: Any, b_ih: Any = None, b_hh: Any = None,
                 weight_dtype: str = "float32") -> None:
        self.weight_dtype = _choice(weight_dtype, "weight_dtype", _DTYPES)
        self._impl = _C.GRUCell(_weights(w_ih, "w_ih", 2), _weights(w_hh, "w_hh", 2),
                                _opt_weights(b_ih, "b_ih", 1), _opt_weights(b_hh, "b_hh", 1),
                                self.weight_dtype)
        self.input_size = self._impl.input_size
        self.hidden_size = self._impl.hidden_size

    def step(self, x: np.ndarray, h: Optional[np.ndarray] = None) -> np.ndarray:
        """h' (N, H) from x (N, I) and h (N, H) float32 (None: zero state)."""
        x = _batch(x, "x", self.input_size)
        if h is not None:
            h = _batch(h, "h", self.hidden_size)
            if h.shape[0] != x.shape[0]:
                raise ValueError(f"h has {h.shape[0]} rows but x has {x.shape[0]}")
        return self._impl.step(x, h)


class _GruWithHead:
    """Shared construction of the GRU heads (CPU or CUDA)."""

    _expect_outputs: Optional[int] = None

    def __init__(self, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any, w: Any, b: Any,
                 weight_dtype: str = "float32", device: str = "cpu") -> None:
        self.weight_dtype = _choice(weight_dtype, "weight_dtype", _DTYPES)
        self.device = _choice(device, "device", ("cpu", "cuda"))
        args = (_weights(w_ih, "w_ih", 2), _weights(w_hh, "w_hh", 2), _opt_weights(b_ih, "b_ih", 1),
                _opt_weights(b_hh, "b_hh", 1))
        w32, b32 = _weights(w, "w", 2), _opt_weights(b, "b", 1)
        if self._expect_outputs is not None and w32.shape[0] != self._expect_outputs:
            raise ValueError(f"{type(self).__name__} needs a ({self._expect_outputs}, H) head, got {w32.shape}")
        if self.device == "cpu":
            self._cell = _C.GRUCell(*args, self.weight_dtype)
            self._head = _C.Linear(w32, b32, self.weight_dtype)
            if self._head.in_features != self._cell.hidden_size:
                raise ValueError(f"head takes {self._head.in_features} inputs but the GRU hidden size "
                                 f"is {self._cell.hidden_size}")
            self.input_size, self.hidden_size = self._cell.input_size, self._cell.hidden_size
            self.out_features = self._head.out_features
        else:
            _require_cuda()
            if w32.shape[1] * 3 != args[0].shape[0]:
                raise ValueError(f"head takes {w32.shape[1]} inputs but w_ih implies a hidden size of "
                                 f"{args[0].shape[0] // 3}")
            if b32 is None:
                b32 = np.zeros(w32.shape[0], np.float32)
            self._dev = _C.cuda.GRUHead(*args, w32, b32, self.weight_dtype)
            self.input_size, self.hidden_size = self._dev.input_size, self._dev.hidden_size
            self.out_features = self._dev.out_features

    def _check_step(self, x: np.ndarray, h: Optional[np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        x = _batch(x, "x", self.input_size)
        if h is not None:
            h = _batch(h, "h", self.hidden_size)
            if h.shape[0] != x.shape[0]:
                raise ValueError(f"h has {h.shape[0]} rows but x has {x.shape[0]}")
        return x, h


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
        x, h = self._check_step(x, h)
        if self.device == "cpu":
            return _C.gru_classifier_step(self._cell, self._head, x, h)
        n = x.shape[0]
        bufs = [DeviceBuffer(a) for a in (n * self.hidden_size * 4, n * self.out_features * 4, n * 4, n * 4)]
        xd = to_device(x)
        hd = to_device(h) if h is not None else None
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
        self._dev.step_classifier(_ptr(x, "x"), _opt_ptr(h), _ptr(h_out, "h_out"), _int(batch, "batch"),
                                  _ptr(logits, "logits"), _opt_ptr(maxprob), _opt_ptr(argmax),
                                  _choice(x_dtype, "x_dtype", _DTYPES),
                                  _choice(logits_dtype, "logits_dtype", _DTYPES), _stream(stream))

    def _need_cuda(self) -> None:
        if self.device != "cuda":
            raise RuntimeError("step_device needs a head built with device='cuda'")


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
        x, h = self._check_step(x, h)
        S, P = _int(image_size, "image_size"), _int(patch_size, "patch_size")
        if P > S:
            raise ValueError(f"patch_size {P} exceeds image_size {S}")
        if self.device == "cpu":
            return _C.gru_actor_step(self._cell, self._head, x, h, S, P)
        n = x.shape[0]
        hb, ab, cb = DeviceBuffer(n * self.hidden_size * 4), DeviceBuffer(n * 8), DeviceBuffer(n * 8)
        self.step_device(to_device(x), to_device(h) if h is not None else None, hb, n, ab, cb, S, P)
        return (from_device(hb, (n, self.hidden_size), np.float32), from_device(ab, (n, 2), np.float32),
                from_device(cb, (n, 2), np.int32))

    def step_device(self, x: Any, h: Any, h_out: Any, batch: int, action: Any,  # type: ignore[override]
                    coords: Any, image_size: int, patch_size: int, x_dtype: str = "float32",
                    stream: Any = None) -> None:
        """Enqueues one policy step: action (batch, 2) float32, coords (batch, 2) int32."""
        self._need_cuda()
        self._dev.step_actor(_ptr(x, "x"), _opt_ptr(h), _ptr(h_out, "h_out"), _int(batch, "batch"),
                             _opt_ptr(action), _opt_ptr(coords), _int(image_size, "image_size"),
                             _int(patch_size, "patch_size"), _choice(x_dtype, "x_dtype", _DTYPES),
                             _stream(stream))


class CascadedHead:
    """Cascaded classifiers of the MobileNet / EfficientNet families.

    The layer taking k step features ``[f_0, ..., f_{k-1}]`` (in_features = k * F) is used
    for ``step(features, k)``; the concatenation is never materialised.

    Args:
        layers: ``[(W, b), ...]`` (e.g. fc_2 ... fc_T) or a mapping ``{k: (W, b)}``.
        weight_dtype: ``"float32"`` or ``"float16"``.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, layers: Union[Sequence[Tuple[Any, Any]], Mapping[Any, Tuple[Any, Any]]],
                 weight_dtype: str = "float32", device: str = "cpu") -> None:
        self.weight_dtype = _choice(weight_dtype, "weight_dtype", _DTYPES)
        self.device = _choice(device, "device", ("cpu", "cuda"))
        items = list(layers.values()) if isinstance(layers, Mapping) else list(layers)
        if not items:
            raise ValueError("layers must not be empty")
        if self.device == "cuda":
            _require_cuda()
        self._layers = {}
        for i, pair in enumerate(items):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"layers[{i}] must be a (W, b) pair")
            w = _weights(pair[0], f"layers[{i}].W", 2)
            b = _opt_weights(pair[1], f"layers[{i}].b", 1)
            if w.shape[1] in self._layers:
                raise ValueError(f"two layers take {w.shape[1]} inputs")
            impl = _C.Linear(w, b, self.weight_dtype) if self.device == "cpu" else \
                _C.cuda.Linear(w, b, self.weight_dtype)
            self._layers[w.shape[1]] = impl
        classes = {impl.out_features for impl in self._layers.values()}
        if len(classes) != 1:
            raise ValueError(f"all layers must have the same number of outputs, got {sorted(classes)}")
        self.out_features = classes.pop()

    def _layer(self, k: int, feature_dim: int):
        layer = self._layers.get(k * feature_dim)
        if layer is None:
            raise ValueError(f"no layer takes k={k} features of size {feature_dim} "
                             f"(layers take {sorted(self._layers)} inputs)")
        return layer

    def step(self, features: np.ndarray, k: int, layout: str = "ntf") -> Tuple[np.ndarray, ...]:
        """Logits from the first k step features on numpy arrays.

        Args:
            features: (N, T, F) (``layout="ntf"``) or (T, N, F) (``"tnf"``) float32.
            k: number of step features to use (1 <= k <= T).

        Returns:
            ``(logits (N, C), maxprob (N,) float32, argmax (N,) int32)``.
        """
        features = _ndarray(features, "features")
        layout = _choice(layout, "layout", ("ntf", "tnf"))
        k = _int(k, "k")
        if features.dtype != np.float32:
            raise TypeError(f"features must be float32, got {features.dtype}")
        if features.ndim != 3:
            raise ValueError(f"features must have 3 dimensions ({layout.upper()}), got {features.shape}")
        layer = self._layer(k, features.shape[2])
        if self.device == "cpu":
            return layer.cascaded_step(features, k, layout)
        if not features.flags.c_contiguous:
            raise ValueError("features must be C-contiguous")
        steps, n = (features.shape[1], features.shape[0]) if layout == "ntf" else features.shape[:2]
        if not 1 <= k <= steps:
            raise ValueError(f"k must be in [1, {steps}], got {k}")
        lb, mb, ab = DeviceBuffer(n * self.out_features * 4), DeviceBuffer(n * 4), DeviceBuffer(n * 4)
        self.step_device(to_device(features), steps, n, features.shape[2], k, lb, mb, ab, layout=layout)
        return (from_device(lb, (n, self.out_features), np.float32), from_device(mb, (n,), np.float32),
                from_device(ab, (n,), np.int32))

    def step_device(self, features: Any, steps: int, batch: int, feature_dim: int, k: int, logits: Any,
                    maxprob: Any = None, argmax: Any = None, layout: str = "ntf",
                    x_dtype: str = "float32", logits_dtype: str = "float32", stream: Any = None) -> None:
        """Enqueues one cascaded step on device buffers (``device="cuda"`` only)."""
        if self.device != "cuda":
            raise RuntimeError("step_device needs a head built with device='cuda'")
        layer = self._layer(_int(k, "k"), _int(feature_dim, "feature_dim"))
        layer.cascaded_step(_ptr(features, "features"), _choice(layout, "layout", ("ntf", "tnf")),
                            _int(steps, "steps"), _int(batch, "batch"), feature_dim, k,
                            _ptr(logits, "logits"), _opt_ptr(maxprob), _opt_ptr(argmax),
                            _choice(x_dtype, "x_dtype", _DTYPES),
                            _choice(logits_dtype, "logits_dtype", _DTYPES), _stream(stream))


# ------------------------------------------------------------------------------ CUDA ----
def has_cuda_build() -> bool:
    """True when the CUDA kernels were compiled into the extension."""
    return bool(_C.has_cuda_build())


def cuda_device_count() -> int:
    """Usable CUDA devices (0 without a build, a driver or a device; never raises)."""
    return int(_C.cuda_device_count())


def cuda_device_error() -> str:
    """Why :func:`cuda_device_count` is 0 (``""`` when it is not)."""
    return str(_C.cuda_device_error())


def stream_handle(stream: Any) -> int:
    """A ``cudaStream_t`` as an int, from None (the legacy default stream, 0), an int, a
    :class:`Stream`, or a torch / CuPy stream."""
    return _stream(stream)


def stream_synchronize(stream: Any) -> None:
    """Waits for the work enqueued on ``stream``."""
    _stream_sync(stream)


def host_loop(actor: "ActorHead", classifier: Any, steps: int, image_size: int, patch_size: int,
              step0_backbone: bool, mean: Sequence[float], std: Sequence[float], feature_dim: int = 0):
    """The extension's per-step engine of the host loop (``_C.HostLoop``) over CPU heads: the
    classifier step (a :class:`GRUHead`, or a :class:`CascadedHead` with its ``feature_dim``), the
    exit test, the compaction of the images still running, the policy step and the next crop
    (uint8 frames normalised with ``mean`` / ``std`` as patches are cut), in one call per step.
    A cascaded head's feature width defaults to half the input width of its k = 2 layer."""
    if isinstance(classifier, GRUHead):
        cls_cell, cls_head, cascaded = classifier._cell, classifier._head, {}
    else:
        cls_cell = cls_head = None
        feature_dim = feature_dim or min(classifier._layers, default=2) // 2
        cascaded = {k: classifier._layer(k, feature_dim) for k in range(2, int(steps) + 1)}
    return _C.HostLoop(actor._cell, actor._head, cls_cell, cls_head, cascaded, int(steps), int(image_size),
                       int(patch_size), bool(step0_backbone), [float(v) for v in mean], [float(v) for v in std])


def cuda_device_properties(index: int = 0) -> dict:
    """``{"name", "major", "minor", "total_memory", "multiprocessors", "integrated"}``."""
    _require_cuda()
    return dict(_C.cuda.device_properties(_int(index, "index", 0)))


def _require_cuda() -> None:
    if not _C.has_cuda_build():
        raise RuntimeError("gfnet_edge._C was built without CUDA (nvcc not found or GFNET_EDGE_CUDA=0)")
    if _C.cuda_device_count() < 1:
        raise RuntimeError(f"no usable CUDA device ({_C.cuda_device_error()})")


def _ptr(obj: Any, name: str) -> int:
    """A device address from an int, DeviceBuffer, torch tensor, CuPy array or pycuda allocation."""
    if obj is None:
        raise ValueError(f"{name} must be a device pointer, got None")
    if isinstance(obj, bool):
        raise TypeError(f"{name} must be a device pointer, got bool")
    if isinstance(obj, numbers.Integral):
        value = int(obj)
    elif isinstance(obj, DeviceBuffer):
        value = obj.ptr
    elif hasattr(obj, "__cuda_array_interface__"):
        value = int(obj.__cuda_array_interface__["data"][0])
    elif hasattr(obj, "data_ptr"):
        value = int(obj.data_ptr())
    elif hasattr(obj, "ptr"):
        value = int(obj.ptr)
    else:
        try:
            value = int(obj)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a device pointer (int or buffer), got {type(obj).__name__}") from exc
    if value <= 0:
        raise ValueError(f"{name} must be a non-null device pointer")
    return value


def _opt_ptr(obj: Any) -> int:
    return 0 if obj is None else _ptr(obj, "pointer")


def _stream(stream: Any) -> int:
    """A cudaStream_t as an int from None, an int, a :class:`Stream`, or a torch / CuPy stream."""
    if stream is None:
        return 0
    if isinstance(stream, bool):
        raise TypeError("stream must be a stream or an int handle, got bool")
    if isinstance(stream, numbers.Integral):
        return int(stream)
    for attr in ("handle", "cuda_stream", "ptr"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    try:
        return int(stream)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"stream must be a stream or an int handle, got {type(stream).__name__}") from exc


class DeviceBuffer:
    """Owning device allocation; ``ptr`` is its address as an int.

    Args:
        nbytes: size in bytes, or a numpy array to allocate for and copy in.
    """

    def __init__(self, nbytes: Union[int, np.ndarray]) -> None:
        _require_cuda()
        if isinstance(nbytes, np.ndarray):
            arr = np.ascontiguousarray(nbytes)
            self._buf = _C.cuda.DeviceBuffer(max(arr.nbytes, 1))
            self.copy_from_host(arr)
        else:
            self._buf = _C.cuda.DeviceBuffer(_int(nbytes, "nbytes", 0))

    @property
    def ptr(self) -> int:
        return self._buf.ptr

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes

    def __int__(self) -> int:
        return self._buf.ptr

    def copy_from_host(self, array: np.ndarray, stream: Any = None, offset: int = 0) -> None:
        """Copies a C-contiguous array in (asynchronous; the array may be reused at once)."""
        self._buf.copy_from_host(_host(array), _stream(stream), _int(offset, "offset", 0))

    def copy_to_host(self, array: np.ndarray, stream: Any = None, offset: int = 0) -> None:
        """Fills a C-contiguous writeable array from the buffer; synchronizes ``stream``."""
        self._buf.copy_to_host(_host(array), _stream(stream), _int(offset, "offset", 0))

    def zero(self, stream: Any = None) -> None:
        self._buf.zero(_stream(stream))


def _host(array: Any) -> np.ndarray:
    array = _ndarray(array, "array")
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous (use numpy.ascontiguousarray)")
    return array


class Stream:
    """Owning non-blocking CUDA stream; ``handle`` is the cudaStream_t as an int."""

    def __init__(self) -> None:
        _require_cuda()
        self._stream = _C.cuda.Stream()

    @property
    def handle(self) -> int:
        return self._stream.handle

    def __int__(self) -> int:
        return self._stream.handle

    def synchronize(self) -> None:
        self._stream.synchronize()


def to_device(array: np.ndarray, stream: Any = None) -> DeviceBuffer:
    """Allocates a buffer and copies ``array`` (C-contiguous) into it."""
    array = _host(array)
    buf = DeviceBuffer(max(array.nbytes, 1))
    buf.copy_from_host(array, stream)
    return buf


def from_device(buf: DeviceBuffer, shape: Sequence[int], dtype: Any, stream: Any = None) -> np.ndarray:
    """Copies a buffer's leading bytes into a new array (synchronizes ``stream``)."""
    out = np.empty(tuple(shape), dtype=dtype)
    if out.nbytes > buf.nbytes:
        raise ValueError(f"buffer holds {buf.nbytes} bytes, {out.nbytes} requested")
    buf.copy_to_host(out, stream)
    return out


def cuda_preprocess(frame: Any, height: int, width: int, image_size: int, out: Any,
                    crop_pct: float = 0.875, interpolation: str = "bilinear", bgr: bool = False,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    out_dtype: str = "float32", glance: Any = None, glance_size: int = 0,
                    glance_interpolation: str = "bicubic", glance_dtype: str = "float32",
                    stream: Any = None) -> None:
    """Enqueues the pre-processing of one device-resident uint8 HWC frame.

    Writes (3, S, S) to ``out`` (offset the pointer for a batch slot) in ``out_dtype`` and,
    when ``glance`` is given, the (3, P, P) glance computed from the float32 values. The
    resize is bit-identical to the CPU path.
    """
    _require_cuda()
    g = 0 if glance is None else _int(glance_size, "glance_size")
    _C.cuda.preprocess(_ptr(frame, "frame"), _int(height, "height"), _int(width, "width"),
                       _int(image_size, "image_size"), resize_size(image_size, crop_pct),
                       _choice(interpolation, "interpolation", _INTERPOLATIONS), bool(bgr),
                       list(_triple(mean, "mean")), list(_triple(std, "std")), _ptr(out, "out"),
                       _choice(out_dtype, "out_dtype", _DTYPES), _opt_ptr(glance), g,
                       _choice(glance_interpolation, "glance_interpolation", _INTERPOLATIONS),
                       _choice(glance_dtype, "glance_dtype", _DTYPES), _stream(stream))


def cuda_glance(images: Any, n: int, image_size: int, out: Any, patch_size: int,
                interpolation: str = "bicubic", in_dtype: str = "float32", out_dtype: str = "float32",
                channels: int = 3, stream: Any = None) -> None:
    """Enqueues the glance (n, C, S, S) -> (n, C, P, P) on device buffers."""
    _require_cuda()
    _C.cuda.glance(_ptr(images, "images"), _choice(in_dtype, "in_dtype", _DTYPES), _int(n, "n"),
                   _int(channels, "channels"), _int(image_size, "image_size"), _ptr(out, "out"),
                   _choice(out_dtype, "out_dtype", _DTYPES), _int(patch_size, "patch_size"),
                   _choice(interpolation, "interpolation", _INTERPOLATIONS), _stream(stream))


def cuda_crop_patches(images: Any, n: int, image_size: int, coords: Any, out: Any, patch_size: int,
                      dtype: str = "float32", channels: int = 3, error_flag: Any = None,
                      stream: Any = None, rows: Any = None, image_rows: Optional[int] = None) -> None:
    """Gathers patches at device int32 (n, 2) coordinates.

    ``coords`` may also be a host numpy array: it is then validated before the launch.
    Without ``error_flag`` the call synchronizes and raises ValueError on an out-of-range
    coordinate; with a zeroed device int32 ``error_flag`` it stays asynchronous and sets the
    flag to 1 instead (bad samples get zero patches; nothing is read out of bounds).

    With ``rows`` (a device int32 array (n,)), patch i is cut from image ``rows[i]`` of the
    ``image_rows`` images at ``images`` (so survivors of an early exit need not be moved); a
    row outside ``[0, image_rows)`` is handled like a bad coordinate.
    """
    _require_cuda()
    n, S, P = _int(n, "n"), _int(image_size, "image_size"), _int(patch_size, "patch_size")
    keep = None
    if isinstance(coords, np.ndarray):
        if coords.dtype != np.int32:
            raise TypeError(f"coords must be int32, got {coords.dtype}")
        if coords.shape != (n, 2):
            raise ValueError(f"coords must have shape ({n}, 2), got {coords.shape}")
        if P > S or coords.min() < 0 or coords.max() > S - P:
            raise ValueError(f"patch coordinates must lie in [0, {S - P}]")
        keep = to_device(coords, stream)
        coords = keep
    _C.cuda.crop_patches(_ptr(images, "images"), _choice(dtype, "dtype", _DTYPES), n,
                         _int(channels, "channels"), S, _ptr(coords, "coords"), _ptr(out, "out"), P,
                         _opt_ptr(error_flag), _stream(stream), _opt_ptr(rows),
                         0 if rows is None else _int(image_rows, "image_rows"))
    if keep is not None:
        _stream_sync(stream)  # the temporary coordinate buffer must outlive the kernel


class CudaGraph:
    """A CUDA graph captured from the work enqueued on a stream, replayed with one launch
    (``cudaStreamBeginCapture`` / ``EndCapture`` / ``GraphInstantiate`` / ``GraphLaunch``).

    Every address the captured work used is baked into the graph: the buffers must stay
    allocated, at the same addresses, for as long as the graph is replayed.
    """

    def __init__(self) -> None:
        _require_cuda()
        self._g = _C.cuda.Graph()

    def begin_capture(self, stream: Any) -> None:
        self._g.begin_capture(_stream(stream))

    def end_capture(self) -> None:
        self._g.end_capture()

    def abort_capture(self) -> None:
        self._g.abort_capture()

    def launch(self, stream: Any) -> None:
        self._g.launch(_stream(stream))

    @property
    def nodes(self) -> int:
        return int(self._g.nodes)


class CudaEvent:
    """A timing CUDA event: :meth:`record` on a stream, :meth:`elapsed_ms` between two."""

    def __init__(self) -> None:
        _require_cuda()
        self._e = _C.cuda.Event()

    def record(self, stream: Any) -> None:
        self._e.record(_stream(stream))

    def wait(self, stream: Any) -> None:
        """Makes the work enqueued on ``stream`` from now on wait for this event (no host wait)."""
        self._e.wait(_stream(stream))

    def elapsed_ms(self, start: "CudaEvent") -> float:
        """Milliseconds from ``start`` to this event (waits for this one to complete)."""
        return float(self._e.elapsed_since(start._e))


def pinned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A numpy array in page-locked host memory (device -> host copies into it need no
    staging); it keeps its allocation alive."""
    _require_cuda()
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) if len(shape) else 1
    raw = _C.cuda.PinnedBuffer(max(count * dtype.itemsize, 1)).array()
    return raw[:count * dtype.itemsize].view(dtype).reshape(tuple(shape))


def _stream_sync(stream: Any) -> None:
    _C.cuda.stream_synchronize(_stream(stream))


def cuda_gather_rows(src: Any, src_rows: int, idx: Any, dst: Any, row_bytes: int, n: Optional[int] = None,
                     error_flag: Any = None, stream: Any = None) -> None:
    """Enqueues the row gather ``dst[i] = src[idx[i]]`` (``numpy`` fancy indexing on rows).

    Used to compact the surviving samples of a batch on the device. Rows are ``row_bytes``
    bytes (any size; copied 16 or 4 bytes at a time when sizes and pointers allow it).

    Args:
        src: device pointer to ``src_rows`` rows.
        src_rows: number of rows in ``src`` (indices must lie in ``[0, src_rows)``).
        idx: a host integer numpy array (n,) -- validated here, converted to int32 and uploaded
            on ``stream`` into stream-ordered scratch memory, so the call stays asynchronous --
            or a device pointer to n int32 indices.
        dst: device pointer to n rows; must not overlap ``src``.
        row_bytes: bytes per row.
        n: number of rows to gather; required with device indices, ``len(idx)`` by default with
            host indices.
        error_flag: with device indices, a zeroed device int32 that is set to 1 when an index
            is out of range (that row of ``dst`` is zero-filled, nothing is read out of
            bounds); without it the call synchronizes ``stream`` and raises ValueError.
            Ignored with host indices (validated before the launch).
        stream: the stream (see the module docstring).

    Raises:
        TypeError: ``idx`` is neither an integer array nor a device pointer; bad argument types.
        ValueError: bad sizes, an out-of-range host index, overlapping ``src`` / ``dst``.
        RuntimeError: no CUDA build or no usable GPU.
    """
    src_rows = _int(src_rows, "src_rows")
    row_bytes = _int(row_bytes, "row_bytes")
    if isinstance(idx, np.ndarray):
        if idx.dtype.kind not in "iu":
            raise TypeError(f"idx must be an integer array, got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ValueError(f"idx must be 1-D, got shape {idx.shape}")
        count = int(idx.shape[0])
        if n is not None and _int(n, "n") != count:
            raise ValueError(f"n = {n} but idx has {count} entries")
        if count < 1:
            raise ValueError("idx must not be empty")
        if idx.min() < 0 or idx.max() >= src_rows:
            raise ValueError(f"row indices must lie in [0, {src_rows - 1}], got [{idx.min()}, {idx.max()}]")
        index: Any = np.ascontiguousarray(idx, dtype=np.int32)
    else:
        if n is None:
            raise ValueError("n is required with device indices")
        count = _int(n, "n")
        index = _ptr(idx, "idx")
    src_ptr, dst_ptr = _ptr(src, "src"), _ptr(dst, "dst")
    if src_ptr < dst_ptr + count * row_bytes and dst_ptr < src_ptr + src_rows * row_bytes:
        raise ValueError("src and dst overlap (the gather is not in place)")
    flag = _opt_ptr(error_flag) if not isinstance(idx, np.ndarray) else 0
    _require_cuda()
    _C.cuda.gather_rows(src_ptr, src_rows, index, dst_ptr, count, row_bytes, flag, _stream(stream))


def cuda_copy(dst: Any, src: Any, nbytes: int, stream: Any = None) -> None:
    """Enqueues a device -> device copy of ``nbytes`` bytes."""
    nbytes = _int(nbytes, "nbytes", 0)
    dst_ptr, src_ptr = _ptr(dst, "dst"), _ptr(src, "src")
    _require_cuda()
    _C.cuda.memcpy_dtod(dst_ptr, src_ptr, nbytes, _stream(stream))


def cuda_softmax_stats(logits: Any, n: int, classes: int, maxprob: Any, argmax: Any, logits_out: Any = None,
                       out_dtype: str = "float32", stream: Any = None) -> None:
    """Enqueues softmax max probability (float32 (n,)) and argmax (int32 (n,), first maximum)
    of float32 device logits (n, classes); ``logits_out`` also receives a copy of the logits in
    ``out_dtype``. ``maxprob`` / ``argmax`` may be None to skip them."""
    n, classes = _int(n, "n"), _int(classes, "classes")
    args = (_ptr(logits, "logits"), n, classes, _opt_ptr(maxprob), _opt_ptr(argmax), _opt_ptr(logits_out),
            _choice(out_dtype, "out_dtype", _DTYPES), _stream(stream))
    _require_cuda()
    _C.cuda.softmax_stats(*args)
