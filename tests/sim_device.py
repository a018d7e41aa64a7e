"""A GPU simulated in host memory, for running the loop's device place on machines without one.

Device memory is numpy arrays behind integer "pointers" (256-byte aligned, bounds-checked on
every access); the CUDA entry points of ``gfnet_edge.ops`` that the device place calls are
replaced by their CPU equivalents on that memory, and :class:`SimHeads` gives CPU heads the
``step_device`` interface of the CUDA heads. The kernels themselves are tested against the CPU
ones on a real GPU (test_kernels_cuda.py); this checks the bookkeeping around them.

CUDA-graph capture is simulated too (:class:`SimCapture`): while a capture is open every
simulated kernel, copy, memset and head step is recorded instead of run (``sim.defer``), and a
replay runs the recording again, reading whatever the baked-in addresses hold at that time.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from gfnet_edge import ops


class SimMemory:
    """Device memory simulated with numpy arrays: pointers are ints, 256-byte aligned."""

    def __init__(self):
        self.blocks = {}  # base -> np.uint8 array
        self.next = 1 << 20

    def alloc(self, nbytes):
        base = self.next
        self.blocks[base] = np.zeros(max(int(nbytes), 1), np.uint8)
        self.next += (max(int(nbytes), 1) + 4096 + 255) // 256 * 256
        return base

    def view(self, ptr, shape, dtype):
        ptr = int(ptr)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        for base, arr in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + arr.size:
                return arr[ptr - base:ptr - base + nbytes].view(dtype).reshape(shape)
        raise AssertionError(f"simulated device: no allocation holds [{ptr:#x}, +{nbytes})")


def sim_ops(monkeypatch, mem):
    """Replaces the CUDA entry points of ``ops`` used by the device place by numpy equivalents."""
    P = ops._ptr

    class SimBuffer:
        def __init__(self, nbytes):
            self.nbytes = int(nbytes)
            self.ptr = mem.alloc(self.nbytes)

        def copy_from_host(self, a, stream=None, offset=0):
            mem.view(self.ptr + offset, (a.nbytes,), np.uint8)[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)

        def copy_to_host(self, a, stream=None, offset=0):
            a.reshape(-1).view(np.uint8)[:] = mem.view(self.ptr + offset, (a.nbytes,), np.uint8)
            sim.reads += 1

        def zero(self, stream=None):
            def run():
                mem.view(self.ptr, (self.nbytes,), np.uint8)[:] = 0
            sim.defer(run)

    sim = SimpleNamespace(reads=0, synced=[], capturing=None)  # device -> host reads; streams synchronized

    def defer(fn):
        """Runs ``fn`` now, or records it while a graph capture is open."""
        if sim.capturing is not None:
            sim.capturing.append(fn)
        else:
            fn()

    sim.defer = defer

    def glance(images, n, S, out, Pz, interpolation="bicubic", stream=None, **_):
        sim.defer(lambda: _glance(images, n, S, out, Pz, interpolation))

    def _glance(images, n, S, out, Pz, interpolation):
        mem.view(P(out, "out"), (n, 3, Pz, Pz), np.float32)[:] = ops.glance(
            np.ascontiguousarray(mem.view(P(images, "images"), (n, 3, S, S), np.float32)), Pz, interpolation)

    def preprocess(frame, h, w, S, out, crop_pct=0.875, interpolation="bilinear", bgr=False, mean=ops.IMAGENET_MEAN,
                   std=ops.IMAGENET_STD, glance=None, glance_size=0, glance_interpolation="bicubic", stream=None):
        f = mem.view(P(frame, "frame"), (h, w, 3), np.uint8).copy()  # a fresh, aligned host frame
        img, gl = ops.preprocess(f, S, crop_pct=crop_pct, interpolation=interpolation, bgr=bgr, mean=mean, std=std,
                                 glance_size=glance_size, glance_interpolation=glance_interpolation)
        mem.view(out, (1, 3, S, S), np.float32)[:] = img
        mem.view(glance, (1, 3, glance_size, glance_size), np.float32)[:] = gl

    def crop(images, n, S, coords, out, Pz, error_flag=None, stream=None, rows=None, image_rows=None):
        sim.defer(lambda: _crop(images, n, S, coords, out, Pz, error_flag, rows, image_rows))

    def _crop(images, n, S, coords, out, Pz, error_flag, rows, image_rows):
        c = mem.view(P(coords, "coords"), (n, 2), np.int32).copy()
        src = np.arange(n) if rows is None else mem.view(P(rows, "rows"), (n,), np.int32).copy()
        count = n if rows is None else image_rows
        if c.min() < 0 or c.max() > S - Pz or src.min() < 0 or src.max() >= count:
            mem.view(error_flag, (1,), np.int32)[0] = 1
            c, src = np.clip(c, 0, S - Pz), np.clip(src, 0, count - 1)
        imgs = np.ascontiguousarray(mem.view(images, (count, 3, S, S), np.float32))
        mem.view(P(out, "out"), (n, 3, Pz, Pz), np.float32)[:] = ops.crop_patches(imgs, c, Pz, index=src.astype(np.int64))

    def gather(src, src_rows, idx, dst, row_bytes, n=None, error_flag=None, stream=None):
        if isinstance(idx, np.ndarray):
            idx = idx.copy()  # the caller may reuse its host array at once
        sim.defer(lambda: _gather(src, src_rows, idx, dst, row_bytes, n, error_flag))

    def _gather(src, src_rows, idx, dst, row_bytes, n, error_flag):
        index = idx if isinstance(idx, np.ndarray) else mem.view(P(idx, "idx"), (n,), np.int32).copy()
        s_ptr, d_ptr = P(src, "src"), P(dst, "dst")
        assert not (s_ptr < d_ptr + n * row_bytes and d_ptr < s_ptr + src_rows * row_bytes), "overlap"
        rows = mem.view(s_ptr, (src_rows, row_bytes), np.uint8)
        if index.min() < 0 or index.max() >= src_rows:
            mem.view(error_flag, (1,), np.int32)[0] = 1
            index = np.clip(index, 0, src_rows - 1)
        mem.view(d_ptr, (n, row_bytes), np.uint8)[:] = rows[index]

    def copy(dst, src, nbytes, stream=None):
        sim.defer(lambda: _copy(dst, src, nbytes))

    def _copy(dst, src, nbytes):
        mem.view(P(dst, "dst"), (nbytes,), np.uint8)[:] = mem.view(P(src, "src"), (nbytes,), np.uint8).copy()

    def softmax_stats(logits, n, C, maxprob, argmax, logits_out=None, out_dtype="float32", stream=None):
        sim.defer(lambda: _softmax_stats(logits, n, C, maxprob, argmax, logits_out))

    def _softmax_stats(logits, n, C, maxprob, argmax, logits_out):
        lg = np.ascontiguousarray(mem.view(logits, (n, C), np.float32))
        mp, am = ops.softmax_stats(lg)
        mem.view(maxprob, (n,), np.float32)[:] = mp
        mem.view(argmax, (n,), np.int32)[:] = am
        if logits_out is not None:
            mem.view(logits_out, (n, C), np.float32)[:] = lg

    for name, fn in [("DeviceBuffer", SimBuffer), ("Stream", lambda: SimpleNamespace(handle=7, synchronize=lambda: None)),
                     ("has_cuda_build", lambda: True), ("cuda_device_count", lambda: 1), ("cuda_glance", glance),
                     ("cuda_preprocess", preprocess), ("cuda_crop_patches", crop), ("cuda_gather_rows", gather),
                     ("cuda_copy", copy), ("cuda_softmax_stats", softmax_stats),
                     ("_stream_sync", sim.synced.append), ("CudaEvent", SimEvent)]:
        monkeypatch.setattr(ops, name, fn)
    return sim


class SimEvent:
    """A CUDA event on the simulated device: the host clock at ``record``."""

    def __init__(self):
        self.t = 0.0

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()

    def elapsed_ms(self, start):
        return (self.t - start.t) * 1e3


class SimCapture:
    """Graph capture on the simulated device: ``capture(fn)`` records what ``fn`` enqueues
    (nothing runs) and returns the replay, which runs the recording. ``fail`` makes every
    capture raise (a capture that cannot be made)."""

    name = "sim-graph"

    def __init__(self, sim, fail=False):
        self.sim, self.fail, self.count = sim, fail, 0

    def capture(self, fn):
        assert self.sim.capturing is None, "nested capture"
        self.sim.capturing = recorded = []
        try:
            fn()
            if self.fail:
                raise RuntimeError("cudaErrorStreamCaptureUnsupported: simulated capture failure")
        finally:
            self.sim.capturing = None
        self.count += 1

        def replay():
            for op in recorded:
                op()

        replay.ops = recorded
        return replay


class SimHeads:
    """CPU heads exposing ``step_device`` on simulated device memory (same signatures as ops)."""

    def __init__(self, cpu, mem, sim=None):
        defer = sim.defer if sim is not None else (lambda fn: fn())
        self.kind, self.pol_hidden, self.cls_hidden, self.device = cpu.kind, cpu.pol_hidden, cpu.cls_hidden, "cuda"
        m, S, Pz, F = mem, cpu.image_size, cpu.patch_size, int(cpu.actor.input_size)

        def put(logits, maxprob, argmax, lg, mp, am):
            m.view(logits, lg.shape, np.float32)[:] = lg
            m.view(maxprob, mp.shape, np.float32)[:] = mp
            m.view(argmax, am.shape, np.int32)[:] = am

        class GruCls:
            out_features = cpu.cls.out_features

            def step_device(self, x, h, h_out, batch, logits, maxprob=None, argmax=None, stream=None):
                defer(lambda: self._step(x, h, h_out, batch, logits, maxprob, argmax))

            def _step(self, x, h, h_out, batch, logits, maxprob, argmax):
                xs = np.ascontiguousarray(m.view(x, (batch, cpu.cls.input_size), np.float32))
                hs = None if h is None else np.ascontiguousarray(m.view(h, (batch, cpu.cls_hidden), np.float32))
                hn, lg, mp, am = cpu.cls.step(xs, hs)
                m.view(h_out, hn.shape, np.float32)[:] = hn
                put(logits, maxprob, argmax, lg, mp, am)

        class CascadedCls:
            out_features = cpu.cls.out_features

            def step_device(self, features, steps, batch, feature_dim, k, logits, maxprob=None, argmax=None,
                            layout="ntf", stream=None):
                assert layout == "tnf"
                defer(lambda: self._step(features, steps, batch, feature_dim, k, logits, maxprob, argmax))

            def _step(self, features, steps, batch, feature_dim, k, logits, maxprob, argmax):
                f = np.ascontiguousarray(m.view(features, (steps, batch, feature_dim), np.float32))
                put(logits, maxprob, argmax, *cpu.cls.step(f, k, layout="tnf"))

        class Actor:
            def step_device(self, x, h, h_out, batch, action, coords, image_size, patch_size, stream=None):
                assert (image_size, patch_size) == (S, Pz) and action is None
                defer(lambda: self._step(x, h, h_out, batch, coords))

            def _step(self, x, h, h_out, batch, coords):
                xs = np.ascontiguousarray(m.view(x, (batch, F), np.float32))
                hs = None if h is None else np.ascontiguousarray(m.view(h, (batch, cpu.pol_hidden), np.float32))
                hn, _a, c = cpu.actor.step(xs, hs, S, Pz)
                m.view(h_out, hn.shape, np.float32)[:] = hn
                m.view(coords, c.shape, np.int32)[:] = c

        self.cls = GruCls() if cpu.kind == "gru" else CascadedCls()
        self.actor = Actor()


def demo_test_images(model, n):
    """The first n images of the demo task's test split, normalised for ``model`` (a manifest
    ``model`` entry): inputs on which the trained demo model's exits spread over the steps (it
    is sure of itself on noise)."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    frames, _ = ClutteredDigits("test", config=demo_config(model)).arrays(n)
    return ops.preprocess(frames, int(model["image_size"]), crop_pct=1.0, mean=model["mean"], std=model["std"])


class DeviceArray:
    """A uint8 array placed in simulated device memory, exposed the way CuPy arrays or torch
    CUDA tensors expose theirs (``__cuda_array_interface__``, version 3)."""

    def __init__(self, mem, array, **interface):
        array = np.ascontiguousarray(array)
        self.ptr = mem.alloc(array.nbytes)
        mem.view(self.ptr, (array.nbytes,), np.uint8)[:] = array.reshape(-1).view(np.uint8)
        self.__cuda_array_interface__ = dict({"shape": array.shape, "typestr": array.dtype.str, "strides": None,
                                              "data": (self.ptr, False), "version": 3}, **interface)
