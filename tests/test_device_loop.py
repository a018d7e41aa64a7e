"""The loop's device place (runtime/device_place.py), the row gather that compacts survivors,
and the runners' device interface.

The CPU parts run everywhere. The GPU parts need the extension's CUDA kernels, a GPU and (for the
parity tests) torch with CUDA, onnx, onnxruntime and timm; they are skipped with a reason
otherwise. Parity: ``Runtime(backend="torch", device="cuda")`` (device place) against
``Runtime(backend="onnxruntime")`` (host place) on small random-weight bundles of both
classifier kinds: the shipped demo model (cascaded, step 0 from the backbone), a GRU model
shaped like resnet50's heads (linear policy encoder, step 0 from the GRU) and one shaped like
RegNetY's (conv policy encoder, GRU started at step 0 but step-0 logits from the backbone).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gfnet_edge import ops
from gfnet_edge.errors import InputError, UnavailableError
from gfnet_edge.model_desc import ModelDesc
from gfnet_edge.runtime.backends.base import Runner
from probs import exits_mid_loop, gap_thresholds
from sim_device import SimCapture, SimHeads, SimMemory, demo_test_images, sim_ops

HAVE_GPU = ops.has_cuda_build() and ops.cuda_device_count() > 0
GPU_REASON = ("gfnet_edge._C built without CUDA" if not ops.has_cuda_build()
              else f"no usable CUDA device ({ops.cuda_device_error()})")
requires_gpu = pytest.mark.skipif(not HAVE_GPU, reason=GPU_REASON)
ASSETS = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets"
HAVE_ONNXSIM = importlib.util.find_spec("onnxsim") is not None


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_kernel_thread():
    """The CPU reference paths (host place, ops.preprocess) run the extension's CPU kernels
    single-threaded in this module: on a 16-core H200 host ops.preprocess with the default
    thread count crashed intermittently (segfault inside the thread pool, also outside these
    tests), which would take the whole GPU session's pytest run down with it."""
    n = ops.get_num_threads()
    ops.set_num_threads(1)
    yield
    ops.set_num_threads(n)


def _torch_cuda_reason():
    """Why the torch-on-CUDA parity tests cannot run here (None when they can)."""
    if not HAVE_GPU:
        return GPU_REASON
    for mod in ("torch", "onnx", "onnxruntime", "timm"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed"
    import torch

    if not torch.cuda.is_available():
        return "torch has no CUDA here"
    return None


# ------------------------------------------------------------------------ CPU: gather_rows
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(idx=np.array([0, 4], np.int32)), ValueError, r"lie in \[0, 3\]"),
    (dict(idx=np.array([-1, 0], np.int64)), ValueError, r"lie in \[0, 3\]"),
    (dict(idx=np.array([0.0, 1.0])), TypeError, "integer array"),
    (dict(idx=np.zeros((2, 1), np.int32)), ValueError, "1-D"),
    (dict(idx=np.zeros(0, np.int32)), ValueError, "empty"),
    (dict(idx=np.array([0, 1], np.int32), n=3), ValueError, "n = 3"),
    (dict(idx=0x7000), ValueError, "n is required"),
    (dict(idx=0x7000, n=0), ValueError, "n must be >= 1"),
    (dict(idx=None, n=2), ValueError, "idx must be a device pointer"),
    (dict(idx="rows", n=2), TypeError, "idx must be a device pointer"),
    (dict(row_bytes=0), ValueError, "row_bytes must be >= 1"),
    (dict(row_bytes=2.5), TypeError, "row_bytes must be an int"),
    (dict(src_rows=0), ValueError, "src_rows must be >= 1"),
    (dict(dst=0x1000 + 16), ValueError, "overlap"),
    (dict(dst=0), ValueError, "non-null"),
])
def test_gather_rows_validates_arguments_before_any_cuda_call(kwargs, exc, match):
    args = dict(src=0x1000, src_rows=4, idx=np.array([0, 1], np.int32), dst=0x9000, row_bytes=16)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.cuda_gather_rows(**args)


def test_gather_rows_without_gpu_raises_runtime_error():
    if HAVE_GPU:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="without CUDA|no usable CUDA device"):
        ops.cuda_gather_rows(0x1000, 4, np.array([3, 0], np.int32), 0x9000, 16)
    with pytest.raises(RuntimeError, match="without CUDA|no usable CUDA device"):
        ops.cuda_gather_rows(0x1000, 4, 0x7000, 0x9000, 16, n=2, error_flag=0x8000)
    for call in (lambda: ops.cuda_copy(0x1000, 0x2000, 16), lambda: ops.cuda_softmax_stats(0x1000, 2, 10, None, None),
                 lambda: ops.cuda_gather_rows(0x1000, 4, np.array([0], np.int32), 0x9000, 16, n=1)):
        with pytest.raises(RuntimeError, match="without CUDA|no usable CUDA device"):
            call()


# --------------------------------------------------------------------- CPU: runner interface
class _DeviceRunner(Runner):
    """A runner that records its device calls (no GPU needed)."""

    name = "fake"
    max_batch = 4
    supports_device = True

    def __init__(self):
        super().__init__("fp32")
        self.calls = []

    def _activate(self):
        pass

    def _run_device(self, graph, image, batch, stream):
        self.calls.append((graph, image, batch, stream))
        return {"feature": (image, (batch, 8))}


def test_runner_device_interface_defaults():
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from gfnet_edge.runtime.backends.tensorrt import TensorRTRunner
    from gfnet_edge.runtime.backends.torch import TorchRunner

    assert Runner.supports_device is False
    assert OnnxRuntimeRunner.supports_device is False
    assert TensorRTRunner.supports_device is True
    base = Runner("fp32")
    with pytest.raises(RuntimeError, match="not active"):
        base.run_device("glance", 0x1000, 1, 0)
    base.active = True
    with pytest.raises(NotImplementedError, match="no device execution"):
        base.run_device("glance", 0x1000, 1, 0)

    bundle = SimpleNamespace(manifest={"checkpoint": "m.pth.tar"}, root=Path("B"), model=SimpleNamespace(patch_size=96),
                             path=lambda p: Path("B") / p)
    assert TorchRunner(bundle).supports_device is False
    assert TorchRunner(bundle, device="cuda").supports_device is True  # checked for CUDA on activate
    with pytest.raises(InputError, match="torch device"):
        TorchRunner(bundle, device="tpu")


def test_runner_run_device_validates_and_passes_the_stream_handle():
    r = _DeviceRunner().activate()
    assert r.run_device("focus", 0x1000, 3, 0) == {"feature": (0x1000, (3, 8))}
    r.run_device("glance", 0x2000, 1, SimpleNamespace(handle=1234))   # ops.Stream-like
    r.run_device("glance", 0x2000, 1, SimpleNamespace(cuda_stream=77))  # torch-stream-like
    r.run_device("glance", 0x2000, 1, None)
    assert [c[3] for c in r.calls] == [0, 1234, 77, 0]
    for args, match in [(("nope", 0x1000, 1, 0), "unknown graph"), (("focus", 0x1000, 5, 0), "max batch 4"),
                        (("focus", 0x1000, 0, 0), "batch must be"), (("focus", 0, 1, 0), "non-null"),
                        (("focus", 0x1000, True, 0), "batch must be")]:
        with pytest.raises(ValueError, match=match):
            r.run_device(*args)


def _desc(**kw) -> ModelDesc:
    """A model description: ``kw`` over small defaults (ImageNet normalisation, bicubic glance)."""
    base = dict(image_size=64, patch_size=32, steps=3, num_classes=10, crop_pct=1.0, dataset_interpolation="bilinear",
                glance_interpolation="bicubic", mean=tuple(ops.IMAGENET_MEAN), std=tuple(ops.IMAGENET_STD),
                classifier="cascaded", step0="backbone")
    return ModelDesc(**{**base, **kw})


def test_driver_place_follows_the_heads(monkeypatch):
    """One Driver for every place: CPU heads keep the buffers on the host whatever the runner;
    CUDA heads need a GPU and a runner with device execution."""
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.profile import Profiler

    model = _desc(steps=3, image_size=224, patch_size=96, step0="backbone")
    seen = []
    host_heads = SimpleNamespace(device="cpu", host_loop=lambda m: seen.append(m) or "native loop")
    d = Driver(model, _DeviceRunner(), host_heads, Profiler(False))  # device-capable runner, host place
    assert d.on_device is False and d.place.loop == "native loop" and seen == [model]
    with pytest.raises(ValueError, match="device place"):
        d.run_device(0x1000, 0x2000, 1, None)
    if not HAVE_GPU:
        with pytest.raises(UnavailableError, match="needs a GPU"):
            Driver(model, _DeviceRunner(), SimpleNamespace(device="cuda"), Profiler(False))
    monkeypatch.setattr(ops, "has_cuda_build", lambda: True)
    monkeypatch.setattr(ops, "cuda_device_count", lambda: 1)
    with pytest.raises(ValueError, match="no device execution"):
        Driver(model, Runner("fp32"), SimpleNamespace(device="cuda"), Profiler(False))


# ------------------------------------------------------------------ bundles (torch side)
def _bundle(root: Path, name: str, spec=None, checkpoint: Path = None):
    """A fp32 ONNX Runtime bundle with the checkpoint inside (torch backend)."""
    import torch

    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.models import GFNet, save_checkpoint

    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        torch.manual_seed(0)
        model = GFNet(spec)
        with torch.no_grad():
            model.policy.actor[0].weight.mul_(50)  # spread the patches of a random policy
        checkpoint = save_checkpoint(d / "m.pth.tar", model)
    with pytest.MonkeyPatch.context() as mp:
        if not HAVE_ONNXSIM:  # export unsimplified graphs (same maths; onnxsim is optional here)
            from gfnet_edge import export

            orig = export.export_model
            mp.setattr(export, "export_model",
                       lambda model, out, opset=export.DEFAULT_OPSET, simplify=True: orig(model, out, opset, False))
        return build_bundle(checkpoint, d / "bundle", BuildConfig(precision="fp32", backend="onnxruntime",
                                                                  include_checkpoint=True), progress=False)


def _tiny_spec(name: str, **kw):
    """A quarter-width ResNet-18 GFNet (fast), with the head layout of a released family."""
    from gfnet_edge.variants import GFNetSpec

    base = dict(model_name=name, family="custom", backbone="resnet18", image_size=128, patch_size=64,
                num_classes=10, backbone_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16})
    base.update(kw)
    return GFNetSpec(**base)


# resnet50 / densenet layout: linear policy encoder, GRU classifier, step-0 logits from the GRU.
GRU_RESNET = dict(steps=5, policy_conv=False, policy_hidden=64, classifier="gru", fc_hidden=48, step0="classifier")
# regnety layout: conv policy encoder, GRU started at step 0, step-0 logits from the backbone.
GRU_REGNET = dict(steps=4, policy_conv=True, policy_hidden=32, classifier="gru", fc_hidden=40, step0="backbone")


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("timm")
    return _bundle(tmp_path_factory.mktemp("dev"), "demo", checkpoint=ASSETS / "demo_gfnet.pth.tar")


def test_runtime_picks_the_numpy_driver_for_onnxruntime(demo_bundle):
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.driver import Driver

    with Runtime(demo_bundle, backend="onnxruntime", precision="fp32") as rt:
        assert rt.device_loop is False and type(rt.driver) is Driver and rt.heads.device == "cpu"
    with Runtime(demo_bundle, backend="torch") as rt:
        assert rt.device_loop is False and type(rt.driver) is Driver
    with pytest.raises(InputError, match="applies to the torch backend"):
        Runtime(demo_bundle, backend="onnxruntime", device="cuda")
    with pytest.raises(InputError, match="device must be"):
        Runtime(demo_bundle, backend="torch", device="gpu")


def test_torch_cuda_without_gpu_says_why(demo_bundle):
    if _torch_cuda_reason() is None:
        pytest.skip("torch with CUDA and a GPU are present")
    from gfnet_edge.runtime import Runtime

    with pytest.raises(UnavailableError, match="GPU|CUDA"):
        Runtime(demo_bundle, backend="torch", device="cuda")


# ------------------------------------------- CPU: the loop's logic on a simulated device
def _frames_agree(model, ref, dev, thr):
    """uint8 frames of 7 sizes through ``dev`` (pre-processed where it runs) give ``ref``'s
    answers on the same frames pre-processed on the CPU."""
    P = model.patch_size
    frames = [np.random.default_rng(i).integers(0, 256, (200 + 9 * i, 300 - 11 * i, 3), dtype=np.uint8) for i in range(7)]
    images, gl = ops.preprocess(frames, model.image_size, crop_pct=model.crop_pct,
                                interpolation=model.dataset_interpolation, glance_size=P,
                                glance_interpolation=model.glance_interpolation)
    c, d = ref.run(images, gl, thr), dev.run_frames(frames, thr)
    for f in ("prediction", "confidence", "exit_step", "coords"):
        np.testing.assert_array_equal(getattr(d, f), getattr(c, f))


def _sim_reference(kind, request, tmp_path_factory):
    """A bundle of ``kind``, its ONNX Runtime runner and CPU heads, and the host-place driver
    the simulated device is checked against: ``(bundle, model, T, P, runner, heads, driver)``."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("timm")
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.heads import HeadSet, load_head_arrays
    from gfnet_edge.runtime.profile import Profiler

    if kind == "cascaded-demo":
        bundle = request.getfixturevalue("demo_bundle")
    else:
        bundle = _bundle(tmp_path_factory.mktemp("sim"), "gru", _tiny_spec("tiny_gru_resnet", **GRU_RESNET))
    model = bundle.model
    host = OnnxRuntimeRunner(bundle.graph_paths("fp32"), "fp32", 2).activate()
    cpu_heads = HeadSet(load_head_arrays(bundle.heads_path), model)
    return (bundle, model, model.steps, model.patch_size, host, cpu_heads,
            Driver(model, host, cpu_heads, Profiler(False)))


class _SimRunner(Runner):
    """Wraps a host runner: run_device reads / writes simulated device memory."""

    name = "sim"
    supports_device = True

    def __init__(self, host, mem, P, max_batch=None):
        super().__init__(host.precision)
        self.host, self.mem, self.P, self.max_batch = host, mem, P, max_batch
        self.bufs, self.calls = {}, []

    def _activate(self):
        self.host.activate()

    def _run_device(self, graph, image, batch, stream):
        assert stream == 7
        self.calls.append((graph, batch))
        x = np.ascontiguousarray(self.mem.view(image, (batch, 3, self.P, self.P), np.float32))
        out = {}
        for name, a in self.host.run(graph, x).items():
            key = (graph, name)
            if key not in self.bufs or self.bufs[key][1] < a.nbytes:
                self.bufs[key] = (self.mem.alloc(a.nbytes), a.nbytes)
            self.mem.view(self.bufs[key][0], a.shape, np.float32)[:] = a
            out[name] = (self.bufs[key][0], a.shape)
        return out


@pytest.mark.parametrize("kind", ["cascaded-demo", pytest.param("gru-resnet-like", marks=pytest.mark.slow)])
def test_device_place_logic_on_simulated_device(tmp_path_factory, monkeypatch, kind, request):
    """The device place (offsets, per-step block, compaction, chunks, frames) against the host place,
    with the CUDA calls replaced by their numpy equivalents: checks the loop's bookkeeping
    on machines without a GPU."""
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.profile import Profiler

    bundle, model, T, Pz, host, cpu_heads, ref = _sim_reference(kind, request, tmp_path_factory)
    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem)
    heads = SimHeads(cpu_heads, mem)
    runner = _SimRunner(host, mem, Pz).activate()
    dev = Driver(model, runner, heads, Profiler(True))
    assert dev.on_device

    x = demo_test_images(bundle.model, 10) if kind == "cascaded-demo" else _images(bundle, 7, seed=2)
    g = ops.glance(x, Pz, model.glance_interpolation)
    tr_ref, tr_dev = ref.run(x, g, None), dev.run(x, g, None)
    np.testing.assert_allclose(tr_dev.probs, tr_ref.probs, rtol=0, atol=1e-6)
    for f in ("prediction", "confidence", "exit_step", "coords"):
        np.testing.assert_array_equal(getattr(tr_dev, f), getattr(tr_ref, f))
    thr = gap_thresholds(tr_ref.probs)
    a = ref.run(x, g, thr)
    assert (a.exit_step < T - 1).any() and exits_mid_loop(a.exit_step, T), a.exit_step
    for max_batch in (None, 3):
        runner.max_batch, runner.calls, sim.reads = max_batch, [], 0
        b = dev.run(x, None, thr)  # glance on the (simulated) device
        for f in ("prediction", "confidence", "exit_step", "coords"):
            np.testing.assert_array_equal(getattr(b, f), getattr(a, f), err_msg=f"{f}, max batch {max_batch}")
        focus = [n for gname, n in runner.calls if gname == "focus"]
        if max_batch is None:  # compaction: each focus step saw exactly the survivors
            assert focus == [int((a.exit_step >= t).sum()) for t in range(1, T) if (a.exit_step >= t).any()]
            steps_run = 1 + int(a.exit_step.max())
            assert sim.reads == steps_run  # exactly one device -> host read per step
    _frames_agree(model, ref, dev, thr)
    host.deactivate()


# ------------------------------------- CPU: the captured loop (CUDA graphs) on a simulated device
class _GraphSimRunner(Runner):
    """A runner whose device work can be captured: outputs at fixed addresses per (graph,
    batch), like TensorRT's, and the computation deferred to when the simulated stream runs
    (so a replay recomputes from whatever its input address holds then)."""

    name = "sim-graph"
    supports_device = True

    def __init__(self, host, mem, P, max_batch=None, fail=False):
        super().__init__(host.precision)
        self.host, self.mem, self.P, self.max_batch = host, mem, P, max_batch
        self.fail, self.capturer = fail, None
        self.outputs, self.calls = {}, []

    def _activate(self):
        self.host.activate()

    def graph_capture(self, stream):
        self.capturer = SimCapture(self.mem, stream=stream, fail=self.fail)
        return self.capturer

    def _run_device(self, graph, image, batch, stream):
        self.calls.append((graph, batch, self.mem.capturing is not None))
        key, P = (graph, batch), self.P
        if key not in self.outputs:
            dry = self.host.run(graph, np.zeros((batch, 3, P, P), np.float32))
            self.outputs[key] = {n: (self.mem.alloc(a.nbytes), a.shape) for n, a in dry.items()}
        outs = self.outputs[key]

        def run():
            x = np.ascontiguousarray(self.mem.view(image, (batch, 3, P, P), np.float32))
            for n, a in self.host.run(graph, x).items():
                self.mem.view(outs[n][0], a.shape, np.float32)[:] = a

        self.mem.launch(stream, run)
        return dict(outs)


@pytest.mark.parametrize("kind", ["cascaded-demo", pytest.param("gru-resnet-like", marks=pytest.mark.slow)])
def test_captured_loop_equals_host_loop_on_simulated_device(tmp_path_factory, monkeypatch, kind, request, caplog):
    """The CUDA-graph loop (graph_steps.GraphSteps) against the host place: buckets, padding,
    compaction inside the next step's graph, the row index of the crop, trace buffers,
    capture once / replay after, recapture when the workspace grows, and the fallback to
    plain launches when a capture fails."""
    from gfnet_edge.runtime.device_place import DeviceSteps
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.graphs import bucket_for, buckets
    from gfnet_edge.runtime.profile import Profiler

    bundle, model, T, Pz, host, cpu_heads, ref = _sim_reference(kind, request, tmp_path_factory)
    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem, asynchronous=True)  # a missing synchronization reads stale memory
    heads = SimHeads(cpu_heads, mem)
    runner = _GraphSimRunner(host, mem, Pz).activate()
    dev = Driver(model, runner, heads, Profiler(True))
    ws = dev.place.graphs
    assert ws is not None and ws.cache.active

    x = demo_test_images(bundle.model, 10) if kind == "cascaded-demo" else _images(bundle, 7, seed=2)
    n = x.shape[0]
    g = ops.glance(x, Pz, model.glance_interpolation)
    tr_ref, tr_dev = ref.run(x, g, None), dev.run(x, g, None)
    np.testing.assert_allclose(tr_dev.probs, tr_ref.probs, rtol=0, atol=1e-6)
    for f in ("prediction", "confidence", "exit_step", "coords"):
        np.testing.assert_array_equal(getattr(tr_dev, f), getattr(tr_ref, f))
    B0 = bucket_for(n, None)  # 10 -> 16, 7 -> 8
    assert ws.capacity == B0 and {b for _, b, _ in runner.calls} == {B0}  # n padded to its bucket
    # the place pre-processes into the workspace itself: the captured steps read the images in place
    (img, gl, _), = dev.place.inputs(x, None)
    assert (img, gl) == (ws.ptr("images"), ws.ptr("glance"))
    thr = gap_thresholds(tr_ref.probs)
    a = ref.run(x, g, thr)
    assert (a.exit_step < T - 1).any() and exits_mid_loop(a.exit_step, T), a.exit_step
    keys, run_key = [], ws.cache.run
    monkeypatch.setattr(ws.cache, "run", lambda key, step: keys.append(key) or run_key(key, step))
    for i, max_batch in enumerate((None, 3, None)):
        runner.max_batch, runner.calls, sim.reads, keys[:] = max_batch, [], 0, []
        captures, replays = ws.cache.captures, ws.cache.replays
        b = dev.run(x, None, thr)  # glance on the (simulated) device
        for f in ("prediction", "confidence", "exit_step", "coords"):
            np.testing.assert_array_equal(getattr(b, f), getattr(a, f), err_msg=f"{f}, max batch {max_batch}")
        np.testing.assert_allclose(b.confidence, a.confidence, rtol=0, atol=0)
        allowed = buckets(max_batch or B0)
        assert all(bs in allowed for _, bs, _ in runner.calls), runner.calls
        if max_batch is None:
            # one read per step; each focus step ran the survivors' bucket
            assert sim.reads == 1 + int(a.exit_step.max())
            want = [min(bb for bb in allowed if bb >= int((a.exit_step >= t).sum()))
                    for t in range(1, T) if (a.exit_step >= t).any()]
            assert [k[1] for k in keys if k[0] == "focus"] == want
            assert [k[1] for k in keys if k[0] == "glance"] == [B0]
        if i == 2:  # the first call again: every step replayed, nothing captured
            assert ws.cache.captures == captures and ws.cache.replays > replays
            assert runner.calls == [], "a replay must not call the runner"
    stages = dev.prof.summary()
    assert {"glance", "focus", "exit"} <= set(stages)

    # frames of several sizes, pre-processed on the device, then a smaller call (same workspace)
    _frames_agree(model, ref, dev, thr)
    one = dev.run(x[3:4], g[3:4], thr)
    assert (one.prediction[0], one.exit_step[0]) == (a.prediction[3], a.exit_step[3])
    np.testing.assert_array_equal(one.coords[:, 0], a.coords[:, 3])

    # a bigger call grows the workspace: graphs dropped and captured again, same answers
    big = np.concatenate([x, x, x])
    e = dev.run(big, None, thr)
    assert ws.capacity == 32
    np.testing.assert_array_equal(e.exit_step, np.concatenate([a.exit_step] * 3))
    np.testing.assert_array_equal(e.coords, np.concatenate([a.coords] * 3, axis=1))

    # a capture that fails: logged once, the loop continues with plain launches, same answers
    failing = _GraphSimRunner(host, mem, Pz, fail=True).activate()
    fdev = Driver(model, failing, heads, Profiler(False))
    with caplog.at_level("WARNING", logger="gfnet_edge"):
        f1, f2 = fdev.run(x, g, thr), fdev.run(x, g, thr)
    assert "CUDA graph capture failed" in caplog.text and caplog.text.count("capture failed") == 1
    assert not fdev.place.graphs.cache.active and isinstance(fdev.place.steps(1, 1, thr), DeviceSteps)
    for r in (f1, f2):
        for f in ("prediction", "exit_step", "coords"):
            np.testing.assert_array_equal(getattr(r, f), getattr(a, f))

    # close(): the place's stream is drained first, then its graphs and buffers are dropped
    dev.place.prefetch(np.zeros((2, 40, 50, 3), np.uint8))  # a pending upload, in page-locked memory
    assert dev.place._bufs and ws._b and ws.cache.graphs
    dev.close()
    assert mem.streams.pending(dev.place.stream) == 0
    assert not (dev.place._bufs or dev.place._host_bufs or ws._b or ws.cache.graphs or ws.loop.graph)
    assert dev.place._pinned == [None, None] and not dev.place._prefetched
    host.deactivate()


def test_graph_buckets_and_cache():
    from gfnet_edge.runtime.graphs import GraphCache, bucket_for, buckets

    assert buckets(1) == (1,) and buckets(12) == (1, 2, 4, 8, 12) and buckets(32) == (1, 2, 4, 8, 16, 32)
    assert [bucket_for(n, 12) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    assert [bucket_for(n, None) for n in (1, 3, 100)] == [1, 4, 128]
    for bad in (lambda: buckets(0), lambda: bucket_for(0, 4), lambda: bucket_for(5, 4)):
        with pytest.raises(ValueError):
            bad()
    log = []

    class Cap:
        name = "list"

        def capture(self, fn):
            log.append("capture")
            return lambda: log.append("replay")

    cache = GraphCache(Cap())
    for _ in range(3):
        cache.run(("focus", 4, 1, 0), lambda: log.append("eager"))
    cache.run(("focus", 2, 1, 4), lambda: log.append("eager"))
    assert log == ["eager", "capture", "replay", "replay", "eager", "capture"]
    assert (cache.captures, cache.replays, cache.eager) == (2, 2, 2)
    cache.clear()
    cache.run(("focus", 4, 1, 0), lambda: log.append("eager"))
    assert log[-2:] == ["eager", "capture"]
    Cap.release = lambda self: log.append("release")  # a capturer with a memory pool to let go
    cache.clear()
    assert log[-1] == "release" and not cache.graphs
    plain = GraphCache(None)
    plain.run("k", lambda: log.append("eager"))
    plain.run("k", lambda: log.append("eager"))
    assert log[-2:] == ["eager", "eager"] and not plain.active


# ---------------------------------------------------------------------- GPU: gather_rows
@requires_gpu
@pytest.mark.parametrize("rows,row_bytes,m,dst_offset", [
    (7, 3 * 64 * 64 * 4, 4, 0),  # image rows, 16-byte path
    (7, 48 * 4, 7, 0),  # hidden-state rows, all kept (permuted)
    (5, 40 * 4, 3, 4),  # misaligned destination: 4-byte path
    (6, 12, 9, 0),  # 12-byte rows: 4-byte path, repeated indices
    (5, 7, 2, 1),  # odd row size: byte path
])
def test_gather_rows_matches_numpy_fancy_indexing(rows, row_bytes, m, dst_offset):
    rng = np.random.default_rng(rows * 1000 + row_bytes)
    src = rng.integers(0, 256, (rows, row_bytes), dtype=np.uint8)
    idx = (rng.permutation(rows)[:m] if m <= rows else rng.integers(0, rows, m)).astype(np.int32)
    stream = ops.Stream()
    sb = ops.to_device(src, stream)
    for device_idx in (True, False):
        dst = ops.DeviceBuffer(m * row_bytes + dst_offset)
        dst.zero(stream)
        flag = ops.DeviceBuffer(4)
        flag.zero(stream)
        ib = ops.to_device(idx, stream) if device_idx else idx
        ops.cuda_gather_rows(sb, rows, ib, dst.ptr + dst_offset, row_bytes, n=m, error_flag=flag if device_idx else None,
                             stream=stream)
        got = np.empty(m * row_bytes + dst_offset, np.uint8)
        dst.copy_to_host(got, stream)
        assert np.array_equal(got[dst_offset:].reshape(m, row_bytes), src[idx])
        assert not got[:dst_offset].any()
        assert int(ops.from_device(flag, (1,), np.int32, stream)[0]) == 0


@requires_gpu
def test_gather_rows_out_of_range_device_index():
    src = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)
    sb, db = ops.to_device(src), ops.DeviceBuffer(3 * 32)
    ib = ops.to_device(np.array([2, 9, 0], np.int32))
    with pytest.raises(ValueError, match="out of range"):
        ops.cuda_gather_rows(sb, 4, ib, db, 32, n=3)
    flag = ops.DeviceBuffer(4)
    flag.zero()
    ops.cuda_gather_rows(sb, 4, ib, db, 32, n=3, error_flag=flag)
    got = ops.from_device(db, (3, 8), np.float32)
    assert int(ops.from_device(flag, (1,), np.int32)[0]) == 1
    assert np.array_equal(got[[0, 2]], src[[2, 0]]) and not got[1].any()
    with pytest.raises(ValueError, match="overlap"):
        ops.cuda_gather_rows(sb, 4, np.array([0], np.int32), sb.ptr + 32, 32)


@requires_gpu
def test_gather_rows_reads_page_locked_host_indices_when_called():
    """Host indices may be reused as soon as the call returns, page-locked ones too: indices in
    ops.pinned_empty memory overwritten right after the call, while the stream is still busy with
    earlier work (so a copy straight from that memory would not have run yet), do not change the
    gather."""
    rng = np.random.default_rng(7)
    rows, row_bytes, m = 64, 16, 1 << 20  # 4 MB of indices: a DMA, not a copy made at the call
    src = rng.integers(0, 256, (rows, row_bytes), dtype=np.uint8)
    want = rng.integers(0, rows, m).astype(np.int32)
    stream = ops.Stream()
    sb, dst, busy = ops.to_device(src, stream), ops.DeviceBuffer(m * row_bytes), ops.DeviceBuffer(1 << 29)
    idx = ops.pinned_empty((m,), np.int32)
    idx[:] = want
    for _ in range(20):  # milliseconds of work queued ahead of the gather
        busy.zero(stream)
    ops.cuda_gather_rows(sb, rows, idx, dst, row_bytes, stream=stream)
    idx[:] = (want + 1) % rows
    assert np.array_equal(ops.from_device(dst, (m, row_bytes), np.uint8, stream), src[want])


@requires_gpu
def test_cuda_copy_and_softmax_stats():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 13)).astype(np.float32) * 3
    stream = ops.Stream()
    lb, copy = ops.to_device(logits, stream), ops.DeviceBuffer(logits.nbytes)  # uploaded where it is read
    mp, am = ops.DeviceBuffer(5 * 4), ops.DeviceBuffer(5 * 4)
    ops.cuda_softmax_stats(lb, 5, 13, mp, am, stream=stream)
    ops.cuda_copy(copy, lb, logits.nbytes, stream)
    ref_mp, ref_am = ops.softmax_stats(logits)
    np.testing.assert_allclose(ops.from_device(mp, (5,), np.float32, stream), ref_mp, rtol=1e-6)
    assert np.array_equal(ops.from_device(am, (5,), np.int32, stream), ref_am)
    assert np.array_equal(ops.from_device(copy, logits.shape, np.float32, stream), logits)


# -------------------------------------------------------------------- GPU: loop parity
TORCH_CUDA_REASON = _torch_cuda_reason()
requires_torch_cuda = pytest.mark.skipif(TORCH_CUDA_REASON is not None, reason=str(TORCH_CUDA_REASON))
KINDS = ["cascaded-demo", "gru-resnet-like", "gru-regnet-like"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, request):
    if TORCH_CUDA_REASON is not None:
        pytest.skip(TORCH_CUDA_REASON)
    root = tmp_path_factory.mktemp("devb")
    return {
        "cascaded-demo": request.getfixturevalue("demo_bundle"),
        "gru-resnet-like": _bundle(root, "gru_resnet", _tiny_spec("tiny_gru_resnet", **GRU_RESNET)),
        "gru-regnet-like": _bundle(root, "gru_regnet", _tiny_spec("tiny_gru_regnet", **GRU_REGNET)),
    }


def _images(bundle, n, seed):
    S = bundle.model.image_size
    return np.random.default_rng(seed).standard_normal((n, 3, S, S)).astype(np.float32)


def _pair(bundle, cuda_graphs=True):
    from gfnet_edge.runtime import Runtime

    dev = Runtime(bundle, backend="torch", device="cuda", cuda_graphs=cuda_graphs)
    ref = Runtime(bundle, backend="onnxruntime", precision="fp32")
    assert dev.device_loop and not ref.device_loop
    return dev, ref


@requires_torch_cuda
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 7])
def test_device_trace_equals_onnxruntime_trace(bundles, kind, n):
    bundle = bundles[kind]
    x = _images(bundle, n, seed=n)
    dev, ref = _pair(bundle)
    with dev, ref:
        a, b = dev.trace(x), ref.trace(x)
    assert a.probs.shape == b.probs.shape and a.coords.shape == b.coords.shape
    np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(a.coords, b.coords)


@requires_torch_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_device_predict_with_exits_equals_onnxruntime(bundles, kind, cuda_graphs):
    bundle = bundles[kind]
    T = bundle.model.steps
    x = _images(bundle, 7, seed=11)
    dev, ref = _pair(bundle, cuda_graphs)
    assert (dev.driver.place.graphs is not None) == cuda_graphs
    with dev, ref:
        thr = gap_thresholds(ref.trace(x).probs)
        dev.thresholds = ref.thresholds = thr
        calls = []
        run_device = dev.runner.run_device

        def counting(graph, image, batch, stream):
            calls.append((graph, batch))
            return run_device(graph, image, batch, stream)

        dev.runner.run_device = counting
        a, b = dev.predict(x), ref.predict(x)
        first = list(calls)
        singles = [(dev.predict(x[i:i + 1]), ref.predict(x[i:i + 1])) for i in range(7)]
        again = dev.predict(x)
        if cuda_graphs:
            cache = dev.driver.place.graphs.cache
            assert cache.active and cache.replays > 0 and cache.captures > 0, vars(cache)
    for f in ("exit_step", "classes", "coords"):
        np.testing.assert_array_equal(getattr(again, f), getattr(a, f))
    np.testing.assert_array_equal(a.exit_step, b.exit_step)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-4)
    # the thresholds make images exit early, so compaction ran: each focus step saw the survivors
    assert (b.exit_step < T - 1).any()
    focus = [bs for g, bs in first if g == "focus"]
    if not cuda_graphs:
        assert focus == [int((b.exit_step >= t).sum()) for t in range(1, T) if (b.exit_step >= t).any()]
    for i, (p, q) in enumerate(singles):  # batch 1
        assert (p.exit_step[0], p.classes[0]) == (q.exit_step[0], q.classes[0]), i
        np.testing.assert_array_equal(p.coords, q.coords)
        assert p.exit_step[0] == b.exit_step[i]


@requires_torch_cuda
def test_device_frames_chunks_and_profiling(bundles):
    """uint8 frames pre-processed on the device (uploaded, or already in GPU memory), batches split
    at the runner's max batch, profiler on."""
    from gfnet_edge.runtime import Runtime

    bundle = bundles["gru-regnet-like"]
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (150 + 7 * i, 190 - 5 * i, 3), dtype=np.uint8) for i in range(7)]
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as ref:
        tr = ref.trace(frames)
        thr = gap_thresholds(tr.probs)
        ref.thresholds = thr
        b = ref.predict(frames)
    with Runtime(bundle, backend="torch", device="cuda", profile=True) as dev:
        dev.thresholds = thr
        a = dev.predict(frames)
        ta = dev.trace(frames)
        dev.runner.max_batch = 3  # 3 + 3 + 1
        c = dev.predict(frames)
        tc = dev.trace(frames)
        stages = dev.profiler.summary()
        assert dev.driver.place.graphs is not None and dev.driver.place.graphs.cache.active
        import torch  # frames already in GPU memory (torch CUDA tensors): read in place

        on_gpu = [torch.from_numpy(f).cuda() for f in frames]
        torch.cuda.synchronize()  # their interface names no stream: they must be ready (docs/jetson.md)
        d = dev.predict(on_gpu)
    np.testing.assert_allclose(ta.probs, tr.probs, rtol=0, atol=1e-4)
    for f in ("exit_step", "classes", "coords", "frame_sizes"):
        np.testing.assert_array_equal(getattr(d, f), getattr(c, f))
    np.testing.assert_array_equal(d.frame_sizes, [f.shape[:2] for f in frames])
    np.testing.assert_array_equal(ta.coords, tr.coords)
    for p in (a, c):
        np.testing.assert_array_equal(p.exit_step, b.exit_step)
        np.testing.assert_array_equal(p.classes, b.classes)
        np.testing.assert_array_equal(p.coords, b.coords)
    np.testing.assert_allclose(tc.probs, ta.probs, rtol=0, atol=1e-5)
    # captured steps are timed as a whole (glance / focus); plain launches stage by stage
    assert {"preprocess", "glance", "focus", "exit"} <= set(stages)


@requires_torch_cuda
def test_device_cropped_frames_equal_the_host_loop(bundles):
    """uint8 S x S frames given as cropped (a model that crops): uploaded as uint8 and only
    normalised on the device; answers and trace equal ONNX Runtime's on the host, whose trace of
    the cropped frames equals its trace of the frames normalised beforehand."""
    from gfnet_edge.runtime import Runtime

    bundle = bundles["gru-regnet-like"]
    m = bundle.model
    S = m.image_size
    frames = np.random.default_rng(9).integers(0, 256, (7, S, S, 3), dtype=np.uint8)
    with Runtime(bundle, backend="onnxruntime", precision="fp32") as ref:
        assert ref.model.crop_pct != 1.0
        tr = ref.trace(frames, cropped=True)
        tn = ref.trace(ops.normalise_frames(frames, m.mean, m.std))
        ref.thresholds = gap_thresholds(tr.probs)
        b = ref.predict(frames, cropped=True)
    with Runtime(bundle, backend="torch", device="cuda") as dev:
        dev.thresholds = ref.thresholds
        a, ta = dev.predict(frames, cropped=True), dev.trace(frames, cropped=True)
        uploaded = dev.driver.place._bufs["input.frames"].nbytes
    np.testing.assert_allclose(tr.probs, tn.probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ta.probs, tr.probs, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(ta.coords, tr.coords)
    for f in ("exit_step", "classes", "coords"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert uploaded == 7 * S * S * 3  # uint8, a quarter of the float32 images' bytes


# ------------------------------------------- GPU: torch graphs only (no onnx / timm needed)
def _tiny_torch_runner(P: int, F: int, Hs: int, C: int, with_logits: bool):
    """A TorchRunner on CUDA whose glance / focus graphs are tiny random torch modules."""
    import torch

    from gfnet_edge.runtime.backends.torch import TorchRunner

    class Graph(torch.nn.Module):
        def __init__(self, logits: bool) -> None:
            super().__init__()
            self.f, self.s = torch.nn.Linear(48, F), torch.nn.Linear(48, Hs)
            self.c = torch.nn.Linear(F, C) if logits else None
            self.output_names = ["feature", "policy_state"] + (["logits"] if logits else [])

        def forward(self, x):
            z = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) * 4
            f, s = torch.tanh(self.f(z)), torch.tanh(self.s(z))
            return (f, s, self.c(f) * 3) if self.c is not None else (f, s)

    class TinyRunner(TorchRunner):
        def __init__(self) -> None:
            fake = SimpleNamespace(manifest={"checkpoint": "-"}, root=Path("."), model=SimpleNamespace(patch_size=P),
                                   path=lambda p: Path(p))
            super().__init__(fake, device="cuda")

        def _activate(self) -> None:
            torch.manual_seed(0)
            self.graphs = {"glance": Graph(with_logits).cuda().eval(), "focus": Graph(False).cuda().eval()}

    return TinyRunner()


def _random_heads(kind: str, T: int, F: int, Hs: int, C: int, Hp: int = 16, Hc: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.4).astype(np.float32)  # noqa: E731
    a = {"pol.w_ih": r(3 * Hp, Hs), "pol.w_hh": r(3 * Hp, Hp), "pol.b_ih": r(3 * Hp), "pol.b_hh": r(3 * Hp),
         "pol.actor.w": r(2, Hp) * 8, "pol.actor.b": r(2)}
    if kind == "gru":
        a.update({"cls.w_ih": r(3 * Hc, F), "cls.w_hh": r(3 * Hc, Hc), "cls.b_ih": r(3 * Hc), "cls.b_hh": r(3 * Hc),
                  "cls.fc.w": r(C, Hc) * 4, "cls.fc.b": r(C)})
    else:
        for k in range(2, T + 1):
            a.update({f"cls.fc_{k}.w": r(C, k * F) * 2, f"cls.fc_{k}.b": r(C)})
    return a


@requires_gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
@pytest.mark.parametrize("kind,step0,T", [("cascaded", "backbone", 3), ("gru", "classifier", 5), ("gru", "backbone", 4)])
def test_device_place_matches_host_place_on_torch_cuda_graphs(kind, step0, T, cuda_graphs):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.heads import HeadSet
    from gfnet_edge.runtime.profile import Profiler

    S, P, F, Hs, C = 64, 24, 24, 20, 10
    model = _desc(steps=T, image_size=S, patch_size=P, step0=step0, classifier=kind, num_classes=C)
    arrays = _random_heads(kind, T, F, Hs, C)
    runner = _tiny_torch_runner(P, F, Hs, C, step0 == "backbone").activate()
    try:
        ref = Driver(model, runner, HeadSet(arrays, model), Profiler(False))
        dev = Driver(model, runner, HeadSet(arrays, model, device="cuda"), Profiler(False), cuda_graphs=cuda_graphs)
        assert dev.on_device and not ref.on_device
        for n in (1, 7):
            x = np.random.default_rng(n).standard_normal((n, 3, S, S)).astype(np.float32)
            g = ops.glance(x, P, "bicubic")
            a, b = ref.run(x, g, None), dev.run(x, g, None)
            np.testing.assert_allclose(b.probs, a.probs, rtol=0, atol=1e-5)
            np.testing.assert_array_equal(b.coords, a.coords)
            np.testing.assert_array_equal(b.prediction, a.prediction)
            thr = gap_thresholds(a.probs)
            e = ref.run(x, g, thr)
            if n == 7:
                assert (e.exit_step < T - 1).any(), "thresholds should make some images exit early"
            for max_batch in (None, 3):
                runner.max_batch = max_batch
                for glance in (g, None):  # host glance uploaded / computed on the device
                    d = dev.run(x, glance, thr)
                    np.testing.assert_array_equal(d.exit_step, e.exit_step)
                    np.testing.assert_array_equal(d.prediction, e.prediction)
                    np.testing.assert_array_equal(d.coords, e.coords)
                    np.testing.assert_allclose(d.confidence, e.confidence, rtol=0, atol=1e-5)
            runner.max_batch = None
            if cuda_graphs:  # still captured after the workspace grew from 1 to 7 rows
                cache = dev.place.graphs.cache
                assert cache.active and cache.replays > 0, cache.disabled
    finally:
        runner.deactivate()


@requires_torch_cuda
def test_torch_float16_backbones_on_captured_graphs(bundles):
    """precision='fp16' on the torch backend: half-precision backbones inside the captured
    loop, close to fp32: the glance step's probabilities within float16 tolerance, patches at
    most a pixel or so away (a policy output near a pixel boundary may round the other way),
    later steps within tolerance where the patches agree, same classes for nearly all."""
    from gfnet_edge.runtime import Runtime

    bundle = bundles["cascaded-demo"]
    x = demo_test_images(bundle.model, 32)
    with Runtime(bundle, backend="torch", device="cuda") as f32, \
            Runtime(bundle, backend="torch", device="cuda", precision="fp16") as f16:
        assert f16.precision == "fp16-torch" and f16.driver.place.graphs is not None
        a, b = f32.trace(x), f16.trace(x)
        p32, p16 = f32.predict(x), f16.predict(x)
    np.testing.assert_allclose(b.probs[0], a.probs[0], rtol=0, atol=2e-2)
    shift = np.abs(b.coords.astype(np.int64) - a.coords)  # (T-1, N, 2)
    assert shift.mean() <= 1.0, shift.max(axis=(0, 2))
    same = (shift == 0).all(axis=(0, 2))
    assert same.mean() >= 0.5, same
    np.testing.assert_allclose(b.probs[:, same], a.probs[:, same], rtol=0, atol=5e-2)
    assert (p32.classes == p16.classes).mean() >= 0.9
    with pytest.raises(InputError, match="fp32 or fp16"):
        Runtime(bundle, backend="torch", device="cuda", precision="int8-cpu")


def _conditional_reason():
    """Why batch-1 runs cannot use the loop graph on conditional nodes here (None when they can)."""
    if TORCH_CUDA_REASON is not None:
        return TORCH_CUDA_REASON
    from gfnet_edge.ops import cuda_loop
    from gfnet_edge.runtime.backends.torch import _torch_keeps_graphs

    support = cuda_loop.conditional_support()
    if not support.usable:
        return f"no conditional graph nodes: {support.error}"
    if not _torch_keeps_graphs():  # the loop graph nests the captured steps' graphs
        return "this torch's CUDAGraph has no keep_graph (torch 2.8 or newer has it)"
    return None


requires_conditional_nodes = pytest.mark.skipif(_conditional_reason() is not None, reason=str(_conditional_reason()))


@pytest.mark.gpu
@requires_torch_cuda
@requires_conditional_nodes
@pytest.mark.parametrize("kind", KINDS)
def test_batch1_loop_graph_equals_per_step_captured_loop_on_gpu(bundles, kind, monkeypatch):
    """torch on CUDA, images one at a time: the loop graph on conditional nodes against the
    per-step captured loop and ONNX Runtime: classes, exit steps, coordinates equal, probabilities
    within 1e-4."""
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.graph_loop import ENV_VAR

    bundle = bundles[kind]
    x = _images(bundle, 9, seed=21)
    monkeypatch.setenv(ENV_VAR, "on")
    dev, ref = _pair(bundle)
    monkeypatch.setenv(ENV_VAR, "off")
    step = Runtime(bundle, backend="torch", device="cuda")
    with dev, ref, step:
        thr = gap_thresholds(ref.trace(x).probs)
        dev.thresholds = ref.thresholds = step.thresholds = thr
        b = ref.predict(x)
        got = [dev.predict(x[i:i + 1]) for i in range(len(x))]
        per_step = [step.predict(x[i:i + 1]) for i in range(len(x))]
        loop = dev.driver.place.graphs.loop
        assert loop.disabled is None and loop.launches == len(x), loop.disabled
        assert step.driver.place.graphs.loop.launches == 0
    assert (b.exit_step < bundle.model.steps - 1).any()
    for i, (p, q) in enumerate(zip(got, per_step)):
        for o in (q, b):
            j = 0 if o is q else i
            assert (p.exit_step[0], p.classes[0]) == (o.exit_step[j], o.classes[j]), i
            np.testing.assert_array_equal(p.coords[:, 0], o.coords[:, j])
            np.testing.assert_allclose(p.confidence[0], o.confidence[j], rtol=0, atol=1e-4)
