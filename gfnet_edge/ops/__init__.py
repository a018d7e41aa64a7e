"""Per-step kernels around the GFNet backbones: the public API of the extension ``gfnet_edge._C``.

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
    crop_geometry(height, width, image_size, crop_pct=0.875) -> CropGeometry: where the S x S
        input sits in a frame; .to_frame(boxes) maps (top, left, bottom, right) boxes onto it
    normalise_frames(frames, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        -> (N, 3, S, S) of uint8 frames already S x S (preprocess with crop_pct=1)
    resize_size(image_size, crop_pct) -> int(image_size / crop_pct), the side before the crop
    resize_plan_cache_info() -> CacheInfo(hits, misses, maxsize, currsize) of the plans per frame size
    glance(images, patch_size, interpolation="bicubic", out=None, mean=None, std=None, bgr=False)
        -> (N, 3, P, P); images float32 (N, 3, S, S), or uint8 frames (N, S, S, 3) with mean/std
    crop_patches(images, coords, patch_size, out=None, mean=None, std=None, bgr=False, index=None)
        -> (M, 3, P, P); images as for glance (uint8 frames are normalised while cropping);
        patch i from image index[i] (default i)
    linear(x, w, b=None, relu=False) -> (N, out)
    softmax_stats(logits) -> (maxprob float32 (N,), argmax int32 (N,))
    Linear(w, b=None, weight_dtype="float32", device="cpu")(x, relu=False) -> (N, out)
    GRUCell(w_ih, w_hh, b_ih=None, b_hh=None, weight_dtype="float32").step(x, h=None) -> h'
    GRUHead(w_ih, w_hh, b_ih, b_hh, w, b, weight_dtype="float32", device="cpu")
        .step(x, h=None) -> (h', logits, maxprob, argmax)
    ActorHead(w_ih, w_hh, b_ih, b_hh, w, b, weight_dtype="float32", device="cpu")
        .step(x, h, image_size, patch_size) -> (h', action (N, 2), coords int32 (N, 2))
    CascadedHead([(W_2, b_2), (W_3, b_3), ...], weight_dtype="float32", device="cpu")
        .step(features, k, layout="ntf") -> (logits, maxprob, argmax)
    host_loop(actor, classifier, steps, image_size, patch_size, step0_backbone, mean, std)
        -> the per-step engine of the host loop (one call per step)
    get_num_threads(), set_num_threads(n), simd_level(), set_simd_enabled(enabled),
    read_pass_seconds(nbytes, reps=10)

The modules: :mod:`.image` (pre-processing, glance, crop; exact torchvision equivalents),
:mod:`.heads` and :mod:`.cascaded` (GRU / linear heads, the host loop's per-step engine),
:mod:`.system` (threads, SIMD path), :mod:`.cuda` (availability, memory, streams, events,
graphs) and :mod:`.cuda_kernels`. Import them through this package: ``from gfnet_edge import
ops``.

CUDA (device pointers as ints or objects exposing one, a ``stream`` that is a
:class:`Stream`, an int handle, a torch / CuPy stream, or None for the default stream;
every call only enqueues work unless noted)::

    has_cuda_build(), cuda_device_count(), cuda_device_error(), cuda_archs(),
    cuda_device_properties(index=0), require_cuda(), device_synchronize()
    device_pointer(obj, name), stream_handle(stream), stream_synchronize(stream)
    DeviceBuffer(nbytes): .ptr .nbytes .copy_from_host(a, stream) .copy_to_host(a, stream) .zero()
    Stream(): .handle .synchronize()
    to_device(array, stream=None) -> DeviceBuffer;  from_device(buf, shape, dtype, stream=None)
    cuda_preprocess(frames_ptr, height, width, image_size, out_ptr, crop_pct=0.875, ..., n=1)
    cuda_normalise_frames(frames_ptr, n, image_size, out_ptr, mean, std, glance=None, ...)
    cuda_glance(images_ptr, n, image_size, out_ptr, patch_size, ...)
    cuda_crop_patches(images_ptr, n, image_size, coords_ptr, out_ptr, patch_size, ...)
    cuda_gather_rows(src_ptr, src_rows, idx, dst_ptr, row_bytes, n=None, error_flag=None, stream=None)
    cuda_copy(dst_ptr, src_ptr, nbytes, stream=None)
    cuda_softmax_stats(logits_ptr, n, classes, maxprob_ptr, argmax_ptr, logits_out=None, ...)
    CudaGraph(): .begin_capture(stream) .end_capture() .launch(stream) .nodes
    CudaEvent(): .record(stream) .wait(stream) .synchronize() .elapsed_ms(start_event)
    pinned_empty(shape, dtype) -> numpy array in page-locked host memory
    Linear(..., device="cuda").forward_device(x_ptr, out_ptr, batch, relu=False, ...)
    GRUHead(..., device="cuda").step_device(x_ptr, h_ptr, h_out_ptr, batch, logits_ptr, ...)
    ActorHead(..., device="cuda").step_device(x_ptr, h_ptr, h_out_ptr, batch, action_ptr, ...)
    CascadedHead(..., device="cuda").step_device(features_ptr, steps, batch, feature_dim, k, ...)

The heads built with ``device="cuda"`` also accept numpy in ``step`` (copied to and from the
device; convenient for tests). Float16 device buffers are allowed for the kernels' inputs
and outputs where a ``*_dtype`` argument says so; GRU hidden states are always float32.

Errors: a wrong dtype (uint8 frames without mean and std included) raises TypeError; a wrong
shape, a non-contiguous array, an out-of-range coordinate or size, or a size mismatch raises
ValueError; a CUDA call without a usable GPU (or in a build without CUDA) raises RuntimeError.
The extension is the one layer that validates arrays and sizes (no input makes a kernel read
or write out of bounds); this package converts Python objects into what it takes.
"""
from __future__ import annotations

from .cascaded import CascadedHead, host_loop
from .cuda import (CudaEvent, CudaGraph, DeviceBuffer, Stream, cuda_archs, cuda_device_count, cuda_device_error,
                   cuda_device_properties, device_pointer, device_synchronize, from_device, has_cuda_build,
                   optional_pointer, pinned_empty, require_cuda, stream_handle, stream_synchronize, to_device)
from .cuda_kernels import (cuda_copy, cuda_crop_patches, cuda_gather_rows, cuda_glance, cuda_normalise_frames,
                           cuda_preprocess, cuda_softmax_stats)
from .heads import ActorHead, GRUCell, GRUHead, Linear, linear, softmax_stats
from .image import (IMAGENET_MEAN, IMAGENET_STD, CacheInfo, CropGeometry, crop_geometry, crop_patches, glance,
                    normalise_frames, preprocess, resize_crop, resize_plan_cache_info, resize_size)
from .system import get_num_threads, read_pass_seconds, set_num_threads, set_simd_enabled, simd_level

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "resize_size", "preprocess", "normalise_frames", "resize_crop",
    "crop_geometry", "CropGeometry", "resize_plan_cache_info", "CacheInfo", "glance", "crop_patches",
    "linear", "softmax_stats", "Linear", "GRUCell", "GRUHead", "ActorHead", "CascadedHead", "host_loop",
    "get_num_threads", "set_num_threads", "simd_level", "set_simd_enabled", "read_pass_seconds",
    "has_cuda_build", "cuda_device_count", "cuda_device_error", "cuda_archs", "cuda_device_properties",
    "require_cuda", "device_synchronize", "device_pointer", "optional_pointer", "stream_handle",
    "stream_synchronize", "DeviceBuffer", "Stream", "to_device", "from_device", "pinned_empty", "CudaGraph",
    "CudaEvent", "cuda_preprocess", "cuda_normalise_frames", "cuda_glance", "cuda_crop_patches", "cuda_gather_rows", "cuda_copy",
    "cuda_softmax_stats",
]
