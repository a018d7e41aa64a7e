"""A GPU simulated in host memory, for running the loop's device place on machines without one.

Device memory is numpy arrays behind integer "pointers" (256-byte aligned, bounds-checked on
every access); the CUDA entry points of ``gfnet_edge.ops`` that the device place calls are
replaced by their CPU equivalents on that memory, and :class:`SimHeads` gives CPU heads the
``step_device`` interface of the CUDA heads. The kernels themselves are tested against the CPU
ones on a real GPU (test_kernels_cuda.py); this checks the bookkeeping around them.

Execution is synchronous by default: every call runs when it is made. With
``sim_ops(..., asynchronous=True)`` the simulated device is asynchronous like a real one:
kernels, copies and engine runs are only *enqueued* on their stream (:class:`SimStreams`) and
run, in order, when that stream is synchronized (``Stream.synchronize()``,
``ops.stream_synchronize``, a device -> host copy on it, :meth:`SimStreams.synchronize`) or when an
event recorded on it is waited for. A missing synchronization then reads stale memory.

CUDA-graph capture is simulated too (:class:`SimCapture`): while a capture is open
(``mem.capturing`` is a list) every piece of work is recorded instead of run or enqueued, and a
replay launches the recording again on the stream, reading whatever the baked-in addresses
hold by then.
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np

from gfnet_edge import ops


class SimStreams:
    """The simulated device's work queues: one FIFO per stream handle.

    ``enqueue(stream, fn)`` appends work; nothing runs until ``synchronize(stream)`` (or
    ``synchronize_all()``, or waiting for an event recorded on the stream) runs that stream's
    queue in order. Stream 0 is the legacy default stream: work on it is counted in
    :attr:`legacy` (real code should pass explicit streams). ``ops.Stream()`` objects of the
    simulated device get distinct handles from :meth:`new_handle`.

    Events: ``ev = record_event(stream)`` marks the stream's queue position;
    ``event_synchronize(ev)`` runs that stream up to the mark; ``wait_event(stream, ev)``
    enqueues on ``stream`` a wait that, when reached, runs the event's stream up to the mark.
    """

    def __init__(self):
        self.queues = defaultdict(list)  # handle -> [callable]
        self.done = defaultdict(int)  # handle -> number of work items run so far
        self.enqueued = defaultdict(int)  # handle -> number of work items ever enqueued
        self.legacy = 0  # work items enqueued on the legacy default stream (0)
        self._next = 0x5000

    def new_handle(self):
        self._next += 16
        return self._next

    def enqueue(self, stream, fn):
        stream = int(stream)
        if stream == 0:
            self.legacy += 1
        self.queues[stream].append(fn)
        self.enqueued[stream] += 1

    def pending(self, stream=None):
        """Work items not yet run on ``stream`` (all streams when None)."""
        if stream is None:
            return sum(len(q) for q in self.queues.values())
        return len(self.queues.get(int(stream), ()))

    def _run(self, stream, upto=None):
        q = self.queues[stream]
        while q and (upto is None or self.done[stream] < upto):
            fn = q.pop(0)
            self.done[stream] += 1
            fn()

    def synchronize(self, stream):
        self._run(int(stream))

    def synchronize_all(self):
        while self.pending():
            for stream in list(self.queues):
                self._run(stream)

    def record_event(self, stream):
        stream = int(stream)
        return (stream, self.enqueued[stream])

    def event_synchronize(self, event):
        self._run(event[0], upto=event[1])

    def wait_event(self, stream, event):
        self.enqueue(stream, lambda: self.event_synchronize(event))


class SimMemory:
    """Device memory simulated with numpy arrays: pointers are ints, 256-byte aligned.

    ``streams`` is the device's :class:`SimStreams`; ``asynchronous`` (set by :func:`sim_ops`)
    says whether :meth:`launch` enqueues work there or runs it at once."""

    def __init__(self):
        self.blocks = {}  # base -> np.uint8 array
        self.next = 1 << 20
        self.streams = SimStreams()
        self.asynchronous = False
        self.capturing = None  # a list while a graph capture is open
        self.waits = []  # (stream, event mark) of every event wait

    def launch(self, stream, fn):
        """Runs ``fn`` as work on ``stream``: recorded while a graph capture is open, enqueued
        when asynchronous, else run at once."""
        if self.capturing is not None:
            self.capturing.append(fn)
        elif self.asynchronous:
            self.streams.enqueue(ops.stream_handle(stream), fn)
        else:
            fn()

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


def sim_ops(monkeypatch, mem, asynchronous=False):
    """Replaces the CUDA entry points of ``ops`` used by the device place by numpy equivalents.

    With ``asynchronous`` the work is enqueued on ``mem.streams`` (see the module docstring);
    ``copy_from_host`` takes its snapshot of the host array when called (the host array may be
    reused at once, as with the real copy) and ``copy_to_host`` synchronizes its stream first.
    Returns a log: ``reads`` (device -> host copies), ``synced`` (streams passed to
    ``ops.stream_synchronize``) and ``streams`` (``mem.streams``)."""
    P = ops.device_pointer
    mem.asynchronous = bool(asynchronous)
    run = mem.launch

    class SimBuffer:
        def __init__(self, nbytes):
            self.nbytes = int(nbytes)
            self.ptr = mem.alloc(self.nbytes)

        def copy_from_host(self, a, stream=None, offset=0):
            data = np.ascontiguousarray(a).reshape(-1).view(np.uint8).copy()
            ptr = self.ptr + offset

            def put():
                mem.view(ptr, (data.nbytes,), np.uint8)[:] = data
            run(stream, put)

        def copy_to_host(self, a, stream=None, offset=0):
            if mem.asynchronous:
                mem.streams.synchronize(ops.stream_handle(stream))
            a.reshape(-1).view(np.uint8)[:] = mem.view(self.ptr + offset, (a.nbytes,), np.uint8)
            sim.reads += 1

        def zero(self, stream=None):
            run(stream, lambda: mem.view(self.ptr, (self.nbytes,), np.uint8).fill(0))

    class SimStream:
        def __init__(self):
            self.handle = mem.streams.new_handle() if mem.asynchronous else 7

        def __int__(self):
            return self.handle

        def synchronize(self):
            mem.streams.synchronize(self.handle)

    sim = SimpleNamespace(reads=0, synced=[], streams=mem.streams)  # device -> host reads; streams synchronized

    def stream_sync(stream):
        sim.synced.append(stream)
        mem.streams.synchronize(ops.stream_handle(stream))

    def glance(images, n, S, out, Pz, interpolation="bicubic", stream=None, **_):
        i_ptr, o_ptr = P(images, "images"), P(out, "out")

        def work():
            mem.view(o_ptr, (n, 3, Pz, Pz), np.float32)[:] = ops.glance(
                np.ascontiguousarray(mem.view(i_ptr, (n, 3, S, S), np.float32)), Pz, interpolation)
        run(stream, work)

    def preprocess(frame, h, w, S, out, crop_pct=0.875, interpolation="bilinear", bgr=False, mean=ops.IMAGENET_MEAN,
                   std=ops.IMAGENET_STD, glance=None, glance_size=0, glance_interpolation="bicubic", stream=None,
                   n=1):
        f_ptr = P(frame, "frame")

        def work():
            f = mem.view(f_ptr, (n, h, w, 3), np.uint8).copy()  # fresh, aligned host frames
            img, gl = ops.preprocess(f, S, crop_pct=crop_pct, interpolation=interpolation, bgr=bgr, mean=mean,
                                     std=std, glance_size=glance_size, glance_interpolation=glance_interpolation)
            mem.view(out, (n, 3, S, S), np.float32)[:] = img
            mem.view(glance, (n, 3, glance_size, glance_size), np.float32)[:] = gl
        run(stream, work)

    def normalise(frames, n, S, out, mean=ops.IMAGENET_MEAN, std=ops.IMAGENET_STD, bgr=False, glance=None,
                  glance_size=0, glance_interpolation="bicubic", stream=None):
        f_ptr, o_ptr = P(frames, "frames"), P(out, "out")
        g_ptr = None if glance is None else P(glance, "glance")

        def work():
            f = mem.view(f_ptr, (n, S, S, 3), np.uint8).copy()
            kw = {"glance_size": glance_size, "glance_interpolation": glance_interpolation} if g_ptr else {}
            res = ops.preprocess(f, S, crop_pct=1.0, bgr=bgr, mean=mean, std=std, **kw)
            img, gl = res if g_ptr else (res, None)
            mem.view(o_ptr, (n, 3, S, S), np.float32)[:] = img
            if g_ptr:
                mem.view(g_ptr, (n, 3, glance_size, glance_size), np.float32)[:] = gl
        run(stream, work)

    def crop(images, n, S, coords, out, Pz, error_flag=None, stream=None, rows=None, image_rows=None):
        c_ptr, o_ptr = P(coords, "coords"), P(out, "out")
        r_ptr, count = (None, n) if rows is None else (P(rows, "rows"), int(image_rows))

        def work():
            c = mem.view(c_ptr, (n, 2), np.int32).copy()
            src = np.arange(n) if r_ptr is None else mem.view(r_ptr, (n,), np.int32).astype(np.int64)
            if c.min() < 0 or c.max() > S - Pz or src.min() < 0 or src.max() >= count:
                mem.view(error_flag, (1,), np.int32)[0] = 1
                c, src = np.clip(c, 0, S - Pz), np.clip(src, 0, count - 1)
            imgs = np.ascontiguousarray(mem.view(images, (count, 3, S, S), np.float32))
            mem.view(o_ptr, (n, 3, Pz, Pz), np.float32)[:] = ops.crop_patches(imgs, c, Pz, index=src)
        run(stream, work)

    def gather(src, src_rows, idx, dst, row_bytes, n=None, error_flag=None, stream=None):
        host_idx = idx.copy() if isinstance(idx, np.ndarray) else None
        i_ptr = None if host_idx is not None else P(idx, "idx")
        s_ptr, d_ptr = P(src, "src"), P(dst, "dst")
        assert not (s_ptr < d_ptr + n * row_bytes and d_ptr < s_ptr + src_rows * row_bytes), "overlap"

        def work():
            index = host_idx if host_idx is not None else mem.view(i_ptr, (n,), np.int32).copy()
            rows = mem.view(s_ptr, (src_rows, row_bytes), np.uint8)
            if index.min() < 0 or index.max() >= src_rows:
                mem.view(error_flag, (1,), np.int32)[0] = 1
                index = np.clip(index, 0, src_rows - 1)
            mem.view(d_ptr, (n, row_bytes), np.uint8)[:] = rows[index]
        run(stream, work)

    def copy(dst, src, nbytes, stream=None):
        d_ptr, s_ptr = P(dst, "dst"), P(src, "src")

        def work():
            mem.view(d_ptr, (nbytes,), np.uint8)[:] = mem.view(s_ptr, (nbytes,), np.uint8).copy()
        run(stream, work)

    def softmax_stats(logits, n, C, maxprob, argmax, logits_out=None, out_dtype="float32", stream=None):
        def work():
            lg = np.ascontiguousarray(mem.view(logits, (n, C), np.float32))
            mp, am = ops.softmax_stats(lg)
            mem.view(maxprob, (n,), np.float32)[:] = mp
            mem.view(argmax, (n,), np.int32)[:] = am
            if logits_out is not None:
                mem.view(logits_out, (n, C), np.float32)[:] = lg
        run(stream, work)

    for name, fn in [("DeviceBuffer", SimBuffer), ("Stream", SimStream),
                     ("has_cuda_build", lambda: True), ("cuda_device_count", lambda: 1), ("cuda_glance", glance),
                     ("cuda_preprocess", preprocess), ("cuda_normalise_frames", normalise),
                     ("cuda_crop_patches", crop), ("cuda_gather_rows", gather),
                     ("cuda_copy", copy), ("cuda_softmax_stats", softmax_stats),
                     ("stream_synchronize", stream_sync), ("CudaEvent", lambda: SimEvent(mem)),
                     ("CudaGraph", lambda: SimGraph(mem)),
                     ("pinned_empty", lambda shape, dtype: np.empty(shape, dtype))]:
        monkeypatch.setattr(ops, name, fn)
    return sim


class SimEvent:
    """A CUDA event of the simulated device: a mark in its stream's queue (``wait`` makes
    another stream run that stream up to the mark first, when the device is asynchronous) and
    the host clock when recorded (for ``elapsed_ms``)."""

    def __init__(self, mem=None):
        self.mem, self.t, self.mark = mem, 0.0, None

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()
        if self.mem is not None:
            self.mark = self.mem.streams.record_event(ops.stream_handle(stream))

    def wait(self, stream=None):
        if self.mem is not None and self.mem.asynchronous and self.mark is not None:
            self.mem.streams.wait_event(ops.stream_handle(stream), self.mark)
        if self.mem is not None:
            self.mem.waits.append((ops.stream_handle(stream), self.mark))

    def elapsed_ms(self, start):
        return (self.t - start.t) * 1e3


class SimGraph:
    """``ops.CudaGraph`` on the simulated device: between ``begin_capture`` and ``end_capture``
    the work launched on the device is recorded; ``launch(stream)`` launches the recording."""

    def __init__(self, mem):
        self.mem, self.recorded, self.ready = mem, None, False

    def begin_capture(self, stream):
        assert self.mem.capturing is None, "nested capture"
        assert not self.ready, "captured already"
        self.mem.capturing = self.recorded = []

    def end_capture(self):
        self.mem.capturing, self.ready = None, True

    def abort_capture(self):
        self.mem.capturing = None

    def launch(self, stream):
        assert self.ready, "launched before capture"
        for work in self.recorded:
            self.mem.launch(stream, work)

    @property
    def nodes(self):
        return len(self.recorded or ())


class SimCapture:
    """Graph capture on the simulated device: ``capture(fn)`` records the work ``fn`` launches
    (nothing runs, nothing is enqueued) and returns the replay, which launches the recording on
    the capture's stream. ``fail`` makes every capture raise (a capture that cannot be made)."""

    name = "sim-graph"

    def __init__(self, mem, stream=7, fail=False):
        self.mem, self.stream, self.fail, self.count = mem, stream, fail, 0

    def capture(self, fn):
        assert self.mem.capturing is None, "nested capture"
        self.mem.capturing = recorded = []
        try:
            fn()
            if self.fail:
                raise RuntimeError("cudaErrorStreamCaptureUnsupported: simulated capture failure")
        finally:
            self.mem.capturing = None
        self.count += 1

        def replay():
            for work in recorded:
                self.mem.launch(self.stream, work)

        replay.ops = recorded
        return replay


class SimHeads:
    """CPU heads exposing ``step_device`` on simulated device memory (same signatures as ops)."""

    def __init__(self, cpu, mem):
        self.kind, self.pol_hidden, self.cls_hidden, self.device = cpu.kind, cpu.pol_hidden, cpu.cls_hidden, "cuda"
        m, S, Pz, F = mem, cpu.image_size, cpu.patch_size, int(cpu.actor.input_size)

        def put(logits, maxprob, argmax, lg, mp, am):
            m.view(logits, lg.shape, np.float32)[:] = lg
            m.view(maxprob, mp.shape, np.float32)[:] = mp
            m.view(argmax, am.shape, np.int32)[:] = am

        class GruCls:
            out_features = cpu.cls.out_features

            def step_device(self, x, h, h_out, batch, logits, maxprob=None, argmax=None, stream=None):
                def work():
                    xs = np.ascontiguousarray(m.view(x, (batch, cpu.cls.input_size), np.float32))
                    hs = None if h is None else np.ascontiguousarray(m.view(h, (batch, cpu.cls_hidden), np.float32))
                    hn, lg, mp, am = cpu.cls.step(xs, hs)
                    m.view(h_out, hn.shape, np.float32)[:] = hn
                    put(logits, maxprob, argmax, lg, mp, am)
                m.launch(stream, work)

        class CascadedCls:
            out_features = cpu.cls.out_features

            def step_device(self, features, steps, batch, feature_dim, k, logits, maxprob=None, argmax=None,
                            layout="ntf", stream=None):
                assert layout == "tnf"

                def work():
                    f = np.ascontiguousarray(m.view(features, (steps, batch, feature_dim), np.float32))
                    put(logits, maxprob, argmax, *cpu.cls.step(f, k, layout="tnf"))
                m.launch(stream, work)

        class Actor:
            def step_device(self, x, h, h_out, batch, action, coords, image_size, patch_size, stream=None):
                assert (image_size, patch_size) == (S, Pz)
                # The CUDA step takes scratch memory for its raw outputs when it has no action
                # buffer; a graph that allocates cannot be a conditional node's body.
                assert action is not None or m.capturing is None, "a captured policy step needs an action buffer"

                def work():
                    xs = np.ascontiguousarray(m.view(x, (batch, F), np.float32))
                    hs = None if h is None else np.ascontiguousarray(m.view(h, (batch, cpu.pol_hidden), np.float32))
                    hn, a, c = cpu.actor.step(xs, hs, S, Pz)
                    m.view(h_out, hn.shape, np.float32)[:] = hn
                    if action is not None:
                        m.view(action, a.shape, np.float32)[:] = a
                    m.view(coords, c.shape, np.int32)[:] = c
                m.launch(stream, work)

        self.cls = GruCls() if cpu.kind == "gru" else CascadedCls()
        self.actor = Actor()


def demo_test_images(model, n):
    """The first n images of the demo task's test split, normalised for ``model`` (a
    :class:`~gfnet_edge.model_desc.ModelDesc`): inputs on which the trained demo model's exits spread over the steps (it
    is sure of itself on noise)."""
    from gfnet_edge.data import ClutteredDigits, demo_config

    frames, _ = ClutteredDigits("test", config=demo_config(model)).arrays(n)
    return ops.preprocess(frames, model.image_size, crop_pct=1.0, mean=model.mean, std=model.std)


class DeviceArray:
    """A uint8 array placed in simulated device memory, exposed the way CuPy arrays or torch
    CUDA tensors expose theirs (``__cuda_array_interface__``, version 3)."""

    def __init__(self, mem, array, **interface):
        array = np.ascontiguousarray(array)
        self.ptr = mem.alloc(array.nbytes)
        mem.view(self.ptr, (array.nbytes,), np.uint8)[:] = array.reshape(-1).view(np.uint8)
        self.__cuda_array_interface__ = dict({"shape": array.shape, "typestr": array.dtype.str, "strides": None,
                                              "data": (self.ptr, False), "version": 3}, **interface)
