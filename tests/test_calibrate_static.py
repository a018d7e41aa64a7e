"""The calibration's static baseline runs with the GFNet runtime's technology: which backend,
place, precision and capture for which runtime; refusals of sources a backend cannot run; the
torch classifier's per-bucket graph bookkeeping (on the CPU, with a stand-in capturer); the
TensorRT classifier on stand-in engines and a simulated GPU (tests/trt_standin.py,
tests/sim_device.py); the ONNX Runtime CPU path as before; the report naming both sides."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from calibrate import static_runners  # noqa: E402
from calibrate.static import export_static, static_baselines  # noqa: E402
from calibrate.static_runners import StaticPlan, check_static_sources, open_classifier  # noqa: E402
from gfnet_edge.errors import InputError, UnavailableError  # noqa: E402
from gfnet_edge.runtime.backends import tensorrt_util as trt_util  # noqa: E402
from gfnet_edge.runtime.backends.classifier import (Classifier, Technology, TorchClassifier,  # noqa: E402
                                                    gfnet_technology, static_technology)
from gfnet_edge.runtime.graphs import GraphCache  # noqa: E402

S, CLASSES = 32, 4


@pytest.fixture(scope="module")
def model():
    """A tiny GFNet's description (S=32): image size, interpolation, mean / std."""
    from gfnet_edge.export import model_desc
    from tiny_gfnet import random_gfnet

    return model_desc(random_gfnet("tiny_static", S, 16, 2, num_classes=CLASSES, channels=(8, 16, 32, 64),
                                   policy_hidden=8))


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    """A random-weight static checkpoint (timm resnet10t, S=32, 4 classes) and its ONNX export."""
    import timm

    from gfnet_edge.train.static import save_static

    root = tmp_path_factory.mktemp("static")
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES).eval()
    ckpt = save_static(root / "static.pth.tar", net, "resnet10t", {}, CLASSES, image_size=S, half=False)
    onnx_path, _ = export_static(ckpt, root)
    return SimpleNamespace(ckpt=Path(ckpt), onnx=onnx_path)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (40, S, S, 3), dtype=np.uint8), rng.integers(0, CLASSES, 40)


def reference_logits(onnx_path: Path, model, frames: np.ndarray) -> np.ndarray:
    """The static graph on its own ONNX Runtime session, fed the CPU pre-processing."""
    import onnxruntime as ort

    from gfnet_edge import ops

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = ops.preprocess(list(frames), S, crop_pct=1.0, interpolation=model.dataset_interpolation,
                       mean=model.mean, std=model.std)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ------------------------------------------------------------------------------- the choice
def _runtime(backend, precision, on_device, cache="none", entry=None):
    """What gfnet_technology reads of a Runtime: backend, precision label, the loop's place and
    its graph cache (``"active"``, ``"failed"``, or ``"none"``: graphs switched off)."""
    graphs = None
    if cache == "active":
        graphs = SimpleNamespace(cache=GraphCache(capture=object()))
    elif cache == "failed":
        c = GraphCache(capture=object())
        c.disabled = "RuntimeError: operation not permitted when stream is capturing"
        graphs = SimpleNamespace(cache=c)
    return SimpleNamespace(backend=backend, precision=precision, runner=SimpleNamespace(entry=entry),
                           driver=SimpleNamespace(on_device=on_device, place=SimpleNamespace(graphs=graphs)))


@pytest.mark.parametrize("rt, gfnet, static", [
    (_runtime("onnxruntime", "fp32", False), "onnxruntime cpu fp32",
     "onnxruntime cpu fp32"),
    (_runtime("onnxruntime", "int8-cpu", False), "onnxruntime cpu int8",
     "onnxruntime cpu fp32"),
    (_runtime("torch", "fp32-torch", False), "torch cpu fp32", "torch cpu fp32"),
    (_runtime("torch", "fp16-torch", True, "active"), "torch cuda fp16, captured", "torch cuda fp16, captured"),
    (_runtime("torch", "fp32-torch", True, "none"), "torch cuda fp32, plain launches (graphs switched off)",
     "torch cuda fp32, plain launches"),
    (_runtime("torch", "fp16-torch", True, "failed"),
     "torch cuda fp16, plain launches (RuntimeError: operation not permitted when stream is capturing)",
     "torch cuda fp16, plain launches"),
    (_runtime("tensorrt", "int8-tensorrt", True, "active", {"precision": "int8"}), "tensorrt cuda int8, captured",
     "tensorrt cuda int8, captured"),
    (_runtime("tensorrt", "fp16-tensorrt", True, "none", {"precision": "fp16"}),
     "tensorrt cuda fp16, plain launches (graphs switched off)", "tensorrt cuda fp16, plain launches"),
])
def test_the_static_side_runs_with_the_gfnet_sides_backend_place_precision_and_capture(rt, gfnet, static):
    plan = StaticPlan.of_runtime(rt)
    assert plan.gfnet.describe() == gfnet
    assert plan.static.describe() == static
    assert plan.describe() == f"GFNet: {gfnet}; static: {static}"
    assert plan.engine == rt.runner.entry if rt.backend == "tensorrt" else plan.engine is None
    json.dumps(plan.to_dict())  # goes into report.json as it is


@pytest.mark.parametrize("rt, static_precisions, line", [
    (_runtime("torch", "fp16-torch", True, "active"), None,
     "GFNet: torch cuda fp16, captured; static: torch cuda fp16, captured"),
    (_runtime("onnxruntime", "int8-cpu", False), ["fp32", "int8", "fp32"],
     "GFNet: onnxruntime cpu int8; static: onnxruntime cpu fp32; onnxruntime cpu int8"),
])
def test_the_plan_and_the_report_write_the_same_technology_line(rt, static_precisions, line):
    """StaticPlan.describe / to_dict and the report's line from report.json's ``technology``
    (one entry per static result, as the pipeline writes it; each description named once)."""
    from calibrate.report import technology_line

    plan = StaticPlan.of_runtime(rt)
    statics = [plan.static] if static_precisions is None else [
        Technology(plan.static.backend, plan.static.device, p) for p in static_precisions]
    res = {"technology": {"gfnet": plan.gfnet.to_dict(), "static": [t.to_dict() for t in statics]}}
    assert technology_line(res) == line
    if static_precisions is None:
        assert plan.describe() == plan.to_dict()["description"] == line


def test_technologies_that_cannot_exist_are_refused():
    with pytest.raises(InputError, match="onnxruntime backend runs on cpu, not cuda"):
        Technology("onnxruntime", "cuda", "fp32")
    with pytest.raises(InputError, match="capture needs device 'cuda'"):
        Technology("torch", "cpu", "fp32", captured=True)
    with pytest.raises(InputError, match="torch backend runs fp32 or fp16"):
        static_technology(Technology("torch", "cuda", "int8"))
    with pytest.raises(InputError, match="unknown runner precision"):
        gfnet_technology(_runtime("torch", "bf16-torch", False))


# ------------------------------------------------------------------------------ refusals
def _without(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(static_runners.importlib.util, "find_spec",
                        lambda name, *a: None if name in modules else real(name, *a))


def _plan(backend, device, precision="fp32", captured=False):
    t = Technology(backend, device, precision, captured)
    return StaticPlan(t, t)


def test_sources_a_backend_cannot_run_are_refused_in_one_line(static, monkeypatch, tmp_path):
    with pytest.raises(InputError, match=r"--static .*nope\.onnx: no such file"):
        check_static_sources([str(tmp_path / "nope.onnx")], _plan("onnxruntime", "cpu"))
    _without(monkeypatch, "torch")
    with pytest.raises(UnavailableError) as e:  # a checkpoint, TensorRT, no ONNX export possible
        check_static_sources([str(static.ckpt)], _plan("tensorrt", "cuda", "fp16", True))
    assert "needs torch to export it to ONNX for the TensorRT engine" in str(e.value)
    assert "--static MODEL.onnx" in str(e.value) and "\n" not in str(e.value)
    check_static_sources([str(static.onnx)], _plan("tensorrt", "cuda", "fp16", True))  # an ONNX graph: fine
    monkeypatch.undo()
    _without(monkeypatch, "onnx2torch")
    with pytest.raises(UnavailableError) as e:  # an ONNX graph on the torch backend: needs a converter
        check_static_sources([str(static.onnx)], _plan("torch", "cuda", "fp16", True))
    assert "onnx2torch" in str(e.value) and ".pth.tar" in str(e.value) and "\n" not in str(e.value)
    check_static_sources([str(static.ckpt)], _plan("torch", "cpu"))  # the checkpoint: fine


# ------------------------------------------------------------- torch: graph per batch bucket
class ReplayingCapture:
    """A capturer for the CPU: ``capture(fn)`` records nothing and returns a replay that runs
    ``fn`` again (what replaying the recorded work does); ``fail`` makes capture raise."""

    name = "cpu-stand-in"

    def __init__(self, fail=False):
        self.fail, self.captured, self.replayed = fail, 0, 0

    def capture(self, fn):
        if self.fail:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: stand-in capture failure")
        self.captured += 1

        def replay():
            self.replayed += 1
            fn()
        return replay


def test_torch_classifier_captures_one_graph_per_bucket_and_pads(model, static, frames):
    """Batches are padded to power-of-two buckets with fixed input / output buffers; the first
    call of a bucket runs plainly and is captured, later ones replay; logits equal ONNX Runtime's
    on the same network."""
    from gfnet_edge.train.static import load_static

    x, _ = frames
    net, _ = load_static(static.ckpt)
    cap = ReplayingCapture()
    clf = TorchClassifier(net, model, Technology("torch", "cpu", "fp32"), capture=cap)
    want = reference_logits(static.onnx, model, x)
    calls = [(0, 3), (3, 1), (4, 4), (8, 5), (13, 3), (16, 7), (23, 8)]
    got = [clf(x[start:start + n]) for start, n in calls]  # each call's logits are its own (no shared buffer)
    assert [g.shape for g in got] == [(n, CLASSES) for _, n in calls]
    np.testing.assert_allclose(np.concatenate(got), want[:31], rtol=1e-4, atol=1e-4)
    seen = [n for _, n in calls]
    buckets = {1, 4, 8}  # 3, 4 -> 4; 1 -> 1; 5, 7, 8 -> 8
    assert sorted(clf._in) == sorted(buckets) and {k: v.shape[0] for k, v in clf._in.items()} == {b: b for b in buckets}
    assert clf.cache.captures == cap.captured == len(buckets)
    assert clf.cache.eager == len(buckets) and clf.cache.replays == cap.replayed == len(seen) - len(buckets)
    addresses = {b: t.data_ptr() for b, t in clf._out.items()}
    clf(x[:3])
    assert {b: t.data_ptr() for b, t in clf._out.items()} == addresses  # fixed output buffers
    clf.close()


def test_torch_capture_failure_falls_back_to_plain_launches_with_the_reason(model, static, frames, caplog):
    from gfnet_edge.train.static import load_static

    x, _ = frames
    net, _ = load_static(static.ckpt)
    clf = TorchClassifier(net, model, Technology("torch", "cpu", "fp32"), capture=ReplayingCapture(fail=True))
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        got = [clf(x[i:i + 4]) for i in (0, 4, 8)]
    np.testing.assert_allclose(np.concatenate(got), reference_logits(static.onnx, model, x[:12]), rtol=1e-4, atol=1e-4)
    assert "CUDA graph capture failed (RuntimeError: cudaErrorStreamCaptureUnsupported" in caplog.text
    assert clf.cache.eager == 3 and clf.cache.replays == 0 and not clf.cache.active
    # what the report says: planned as captured, ran as plain launches, with the reason
    planned = Classifier(Technology("torch", "cuda", "fp16", True), S)
    planned.cache = clf.cache
    assert planned.ran().describe() == ("torch cuda fp16, plain launches (RuntimeError: "
                                        "cudaErrorStreamCaptureUnsupported: stand-in capture failure)")


# ------------------------------------------------------------ TensorRT: stand-in engines
@pytest.fixture()
def simulated_gpu(monkeypatch):
    """An asynchronous GPU in host memory with the stand-in ``tensorrt`` whose engines run there;
    ``ops.cuda_preprocess`` as the CPU pre-processing of the frame in simulated memory (without
    a glance output, which the simulated device's version always writes)."""
    from gfnet_edge import ops
    from sim_device import SimMemory, sim_ops
    from trt_standin import make_trt

    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem, asynchronous=True)
    trt, state = make_trt("10.3.0", mem=mem, dla_cores=2)  # an AGX Orin: two DLA cores
    monkeypatch.setattr(trt_util, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_util, "gpu_info", lambda: {"gpu_name": "Orin", "compute_capability": "8.7",
                                                       "multiprocessors": 16, "device_model": "Orin"})
    normalise = ops.cuda_normalise_frames  # the simulated GPU's
    calls = []

    def recorded(frames, n, size, out, **kw):
        assert kw.get("glance") is None
        calls.append(ops.stream_handle(kw.get("stream")))
        normalise(frames, n, size, out, **kw)

    monkeypatch.setattr(ops, "cuda_normalise_frames", recorded)
    monkeypatch.setattr(ops, "cuda_preprocess", lambda *a, **kw: pytest.fail("a frame pre-processed on its own"))
    return SimpleNamespace(mem=mem, sim=sim, state=state, preprocess_streams=calls)


def test_tensorrt_static_engine_is_built_like_the_bundles_and_replayed_per_bucket(model, static, frames, tmp_path,
                                                                                   simulated_gpu):
    """The engine comes from the static ONNX graph through the bundle engines' build path with
    their precision and builder options (same flags as the bundle's FP16 plan); every call runs
    pre-processing + enqueueV3 on the classifier's stream, captured once per bucket on a context
    of its own and replayed after; logits equal ONNX Runtime's."""
    from gfnet_edge.runtime.backends.tensorrt_build import BuildOptions, has_modelopt, plan_build

    x, _ = frames
    st = simulated_gpu.state
    entry = {"precision": "fp16", "build_options": {"workspace_mb": 256, "opt_level": 2, "max_batch": 8}}
    t = Technology("tensorrt", "cuda", "fp16", captured=True)
    plan = StaticPlan(t, t, entry)
    clf = open_classifier(plan, static.onnx, lambda: static.onnx, model, None, tmp_path, batch=2)
    bundle_flags = plan_build("10.3.0", BuildOptions(precision="fp16"), True, has_modelopt()).builder_flags
    assert st.set_flags == bundle_flags and st.pool == ("WORKSPACE", 256 << 20)
    assert st.config["builder_optimization_level"] == 2
    assert st.profile == ("image", (1, 3, S, S), (2, 3, S, S), (32, 3, S, S))  # the accuracy pass's 32 fits
    want = reference_logits(static.onnx, model, x)
    calls = [(0, 3), (3, 1), (4, 4), (8, 2), (10, 3), (13, 1), (14, 32)]
    for start, n in calls:
        np.testing.assert_allclose(clf(x[start:start + n]), want[start:start + n], rtol=1e-5, atol=1e-5)
    buckets = {4, 1, 2, 32}
    assert clf.cache.captures == len(buckets) and clf.cache.replays == len(calls) - len(buckets)
    assert sorted(clf._contexts) == sorted(buckets)
    for b, ctx in clf._contexts.items():  # each context keeps its shape and the classifier's fixed buffers
        assert ctx.batch == b and ctx.addr["image"] == clf._image.ptr
    stream = clf.stream.handle
    assert {s for s, _ in st.enqueues} == {stream} and set(simulated_gpu.preprocess_streams) == {stream}
    assert simulated_gpu.sim.streams.legacy == 0 and not st.violations
    assert clf.ran().describe() == "tensorrt cuda fp16, captured"
    clf.close()
    assert simulated_gpu.sim.streams.pending() == 0


def test_tensorrt_capture_failure_falls_back_to_plain_launches(model, static, frames, tmp_path, simulated_gpu,
                                                               monkeypatch, caplog):
    """A stream capture that fails (here: at its end, as cudaStreamEndCapture reports an
    invalidated capture) leaves the classifier running every call as plain launches, with the
    same logits, and the result saying so."""
    from gfnet_edge import ops

    class BrokenGraph:
        def begin_capture(self, stream):
            simulated_gpu.mem.capturing = []

        def end_capture(self):
            simulated_gpu.mem.capturing = None
            raise RuntimeError("cudaErrorStreamCaptureInvalidated: operation failed due to a previous error")

        def abort_capture(self):
            simulated_gpu.mem.capturing = None

    monkeypatch.setattr(ops, "CudaGraph", BrokenGraph)
    x, _ = frames
    t = Technology("tensorrt", "cuda", "fp32", captured=True)
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"), \
            open_classifier(StaticPlan(t, t), static.onnx, lambda: static.onnx, model, None, tmp_path, batch=2) as clf:
        got = [clf(x[i:i + 2]) for i in range(0, 8, 2)]
        assert clf.cache.eager == 4 and clf.cache.captures == 0 and not clf.cache.active
        assert clf.ran().describe().startswith("tensorrt cuda fp32, plain launches (RuntimeError: "
                                               "cudaErrorStreamCaptureInvalidated")
    np.testing.assert_allclose(np.concatenate(got), reference_logits(static.onnx, model, x[:8]), rtol=1e-5, atol=1e-5)
    assert "CUDA graph capture failed" in caplog.text


def test_tensorrt_static_baseline_end_to_end_and_its_result(model, static, frames, tmp_path, simulated_gpu):
    """static_baselines with a TensorRT plan: a static checkpoint is exported to ONNX, built as an
    engine and measured; accuracy equals the reference network's, the result names its technology."""
    x, y = frames
    t = Technology("tensorrt", "cuda", "fp32", captured=True)
    res = static_baselines([str(static.ckpt)], x, y, x, model, None, False, repeats=5, batch=2,
                           plan=StaticPlan(t, t, {"precision": "fp32", "build_options": {}}))
    want = 100.0 * float((reference_logits(static.onnx, model, x).argmax(1) == y).mean())
    assert [r.name for r in res] == ["static_resnet10t fp32"]
    assert res[0].accuracy == pytest.approx(want)
    assert res[0].to_dict()["technology"]["description"] == "tensorrt cuda fp32, captured"
    assert res[0].latency.n == 5 and simulated_gpu.state.engines_built == 1


def _with_header(engine: Path, out: Path, **changes) -> Path:
    """A copy of stand-in engine ``engine`` whose header has ``changes`` (e.g. ``dtypes``)."""
    from trt_standin import MAGIC

    blob = engine.read_bytes()
    n = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 4], "little")
    head = json.loads(blob[len(MAGIC) + 4:len(MAGIC) + 4 + n])
    head.update(changes)
    raw = json.dumps(head).encode()
    out.write_bytes(MAGIC + len(raw).to_bytes(4, "little") + raw + blob[len(MAGIC) + 4 + n:])
    return out


def test_a_dla_static_engine_runs_as_plain_launches_and_says_why(model, static, frames, tmp_path, simulated_gpu):
    """A DLA engine is never captured (TensorRT does not support CUDA graphs with DLA
    offloading): planned as captured, its calls run as plain launches, logits as ONNX Runtime's,
    and how it ran names the reason."""
    from gfnet_edge.runtime.backends.classifier_tensorrt import TensorRTClassifier

    x, _ = frames
    t = Technology("tensorrt", "cuda", "fp32", captured=True)
    open_classifier(StaticPlan(t, t, {"precision": "fp32", "build_options": {}}), static.onnx,
                    lambda: static.onnx, model, None, tmp_path, batch=2).close()
    with TensorRTClassifier(tmp_path / "static.fp32.engine", model, t, max_batch=4, dla_core=0) as clf:
        got = [clf(x[i:i + 2]) for i in (0, 2, 4)]
        assert clf.cache.captures == 0 and clf.cache.eager == 3
        assert clf.ran().describe() == ("tensorrt cuda fp32, plain launches (DLA engines are not captured: CUDA graphs "
                                        "and DLA offloading are not supported together)")
    np.testing.assert_allclose(np.concatenate(got), reference_logits(static.onnx, model, x[:6]), rtol=1e-5, atol=1e-5)


def test_a_dla_static_engine_runs_on_the_dla_core_it_was_built_for(model, static, frames, tmp_path, simulated_gpu):
    """The static baseline's engine built for DLA core 1 runs on core 1, the core the GFNet's
    engines run on (TensorRT runs a DLA engine on the core its runtime names before
    deserialising, core 0 where none is named); a core the device does not have is refused."""
    from gfnet_edge.runtime.backends.classifier_tensorrt import (TensorRTClassifier, build_classifier_engine,
                                                                 classifier_build_options)

    x, _ = frames
    options = classifier_build_options({"precision": "fp16", "build_options": {"dla_core": 1}}, max_batch=4,
                                       opt_batch=2)
    engine = tmp_path / "static.fp16.engine"
    built = build_classifier_engine(static.onnx, engine, options)
    assert built["static_batch"] == 4 and built["dla_layers"] > 0
    t = Technology("tensorrt", "cuda", "fp16", captured=True)
    with TensorRTClassifier(engine, model, t, 4, static_batch=4, dla_core=1) as clf:
        got = clf(x[:3])
    assert simulated_gpu.state.dla_core_run == [1]
    np.testing.assert_allclose(got, reference_logits(static.onnx, model, x[:3]), rtol=1e-5, atol=1e-5)
    with pytest.raises(UnavailableError, match=r"static\.fp16\.engine was built for DLA core 2, but this device has 2 "
                                               r"DLA core\(s\)"):
        TensorRTClassifier(engine, model, t, 4, static_batch=4, dla_core=2)
    assert simulated_gpu.state.dla_core_run == [1]


def test_tensorrt_static_engine_that_cannot_be_fed_is_refused_in_one_line(model, static, tmp_path, simulated_gpu):
    """An engine whose input or logits are float16 (built elsewhere with float16 I/O), or whose
    input is not the GFNet's S x S image, is refused when the classifier opens it, with the
    engine and tensor named, before a buffer is sized for it; the engine it was copied from opens."""
    from dataclasses import replace

    from gfnet_edge.runtime.backends.classifier_tensorrt import TensorRTClassifier

    t = Technology("tensorrt", "cuda", "fp32", captured=False)
    open_classifier(StaticPlan(t, t, {"precision": "fp32", "build_options": {}}), static.onnx,
                    lambda: static.onnx, model, None, tmp_path, batch=2).close()
    engine = tmp_path / "static.fp32.engine"
    TensorRTClassifier(engine, model, t, max_batch=4).close()
    trt = trt_util.import_tensorrt()
    output = trt_util.io_names(trt_util.safe_runtime(trt).deserialize_cuda_engine(engine.read_bytes()),
                               trt.TensorIOMode.OUTPUT)[0]
    for name in ("image", output):
        half = _with_header(engine, tmp_path / f"half-{name}.engine", dtypes={name: "HALF"})
        with pytest.raises(InputError, match=rf"half-{name}\.engine: tensor '{name}' is DataType\.HALF, not float32"):
            TensorRTClassifier(half, model, t, max_batch=4)
    with pytest.raises(InputError, match=rf"engine's input 'image' is \(-1, 3, {S}, {S}\), not \(N, 3, {S + 8}, "
                                         rf"{S + 8}\) images"):
        TensorRTClassifier(engine, replace(model, image_size=S + 8), t, max_batch=4)


# ------------------------------------------------------------- ONNX Runtime CPU: as before
@pytest.fixture()
def ort_classifiers(monkeypatch):
    """Records each ONNX Runtime classifier the static baselines open: its precision, the op
    types of the graph it loaded and the frames and logits of each call."""
    import onnx

    seen = []

    class Recording(static_runners.OnnxRuntimeClassifier):
        def __init__(self, path, model, threads=None, precision="fp32"):
            super().__init__(path, model, threads, precision=precision)
            self.record = SimpleNamespace(precision=precision, calls=[],
                                          ops={n.op_type for n in onnx.load(str(path)).graph.node})
            seen.append(self.record)

        def logits(self, frames):
            out = super().logits(frames)
            self.record.calls.append((np.array(frames), np.array(out)))
            return out

    monkeypatch.setattr(static_runners, "OnnxRuntimeClassifier", Recording)
    return seen


def assert_ran_the_int8_copy(record, result, static, model, frames, labels, calib_frames, tmp_path):
    """``record``'s classifier ran a Q/DQ graph: on the accuracy frames its logits are those of
    ONNX Runtime on ``quantize_static_int8``'s copy of the static graph (calibrated on the same
    images), not the FP32 graph's, and ``result``'s accuracy is that copy's."""
    from calibrate.latency import prepare_frames
    from calibrate.static import quantize_static_int8

    assert record.precision == "int8"
    assert {"QuantizeLinear", "DequantizeLinear"} <= record.ops, sorted(record.ops)
    n, got = 0, []
    for f, out in record.calls:  # the accuracy pass comes first, then the timed calls
        if n == len(frames):
            break
        np.testing.assert_array_equal(f, frames[n:n + len(f)])
        got.append(out)
        n += len(f)
    got = np.concatenate(got)
    q = quantize_static_int8(static.onnx, tmp_path / "want.int8.onnx", prepare_frames(model, calib_frames[:64]))
    want = reference_logits(q, model, frames)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - reference_logits(static.onnx, model, frames)).max() > 1e-3
    assert result.accuracy == pytest.approx(100.0 * float((want.argmax(1) == labels).mean()))


def test_onnxruntime_cpu_path_is_todays_and_torch_cpu_agrees(model, static, frames, ort_classifiers, tmp_path):
    x, y = frames
    want = 100.0 * float((reference_logits(static.onnx, model, x).argmax(1) == y).mean())
    ort_res = static_baselines([str(static.ckpt), str(static.onnx)], x, y, x, model, 1, False, repeats=5, batch=3)
    assert [r.name for r in ort_res] == ["static_resnet10t fp32", "static.fp32 fp32"]
    assert [r.accuracy for r in ort_res] == [pytest.approx(want)] * 2
    assert {r.to_dict()["technology"]["description"] for r in ort_res} == {"onnxruntime cpu fp32"}
    assert ort_res[0].latency.n == 5 and ort_res[0].call_ms.shape == (5,)
    # the INT8 copy (--static-int8) runs as a Q/DQ graph on ONNX Runtime and says so
    q_res = static_baselines([str(static.onnx)], x, y, x, model, 1, True, repeats=2, batch=3)
    assert [r.name for r in q_res] == ["static.fp32 fp32", "static.fp32 int8"]
    assert q_res[1].to_dict()["technology"]["description"] == "onnxruntime cpu int8"
    assert abs(q_res[1].accuracy - want) <= 25.0
    assert [r.precision for r in ort_classifiers] == ["fp32", "fp32", "fp32", "int8"]
    assert not any("QuantizeLinear" in r.ops for r in ort_classifiers[:3])
    assert_ran_the_int8_copy(ort_classifiers[3], q_res[1], static, model, x, y, x, tmp_path)
    torch_res = static_baselines([str(static.ckpt)], x, y, x, model, 1, False, repeats=5, batch=3,
                                 plan=_plan("torch", "cpu"))
    assert torch_res[0].accuracy == pytest.approx(want)
    assert torch_res[0].to_dict()["technology"]["description"] == "torch cpu fp32"


@pytest.mark.parametrize("backend, device, int8, names", [
    ("onnxruntime", "cpu", True, ["static_resnet10t fp32", "static_resnet10t int8"]),
    ("torch", "cpu", False, ["static_resnet10t fp32"]),
    ("tensorrt", "cuda", True, ["static_resnet10t fp32", "static_resnet10t int8"]),
])
def test_a_static_checkpoint_is_read_once_per_baseline(model, static, frames, monkeypatch, request, tmp_path, backend,
                                                        device, int8, names):
    """Metadata, the ONNX export (fp32 and its INT8 copy or engine) and the torch module all come
    from one ``torch.load(..., weights_only=True)`` of the checkpoint; on ONNX Runtime the INT8
    copy is a quantized graph."""
    if backend == "tensorrt":
        request.getfixturevalue("simulated_gpu")
    recorded = request.getfixturevalue("ort_classifiers") if backend == "onnxruntime" else None
    reads = []
    real = torch.load

    def counting_load(f, *a, **kw):
        if Path(f) == static.ckpt:
            reads.append(kw.get("weights_only"))
        return real(f, *a, **kw)

    monkeypatch.setattr(torch, "load", counting_load)
    x, y = frames
    t = Technology(backend, device, "fp32", captured=device == "cuda")
    plan = StaticPlan(t, t, {"precision": "fp32", "build_options": {}} if backend == "tensorrt" else None)
    res = static_baselines([str(static.ckpt)], x[:8], y[:8], x, model, 1, int8, repeats=1, batch=2, plan=plan)
    assert [r.name for r in res] == names
    assert reads == [True]
    want = 100.0 * float((reference_logits(static.onnx, model, x[:8]).argmax(1) == y[:8]).mean())
    assert res[0].accuracy == pytest.approx(want)
    if recorded is not None:
        assert [r.precision for r in recorded] == ["fp32", "int8"] and "QuantizeLinear" not in recorded[0].ops
        assert_ran_the_int8_copy(recorded[1], res[1], static, model, x[:8], y[:8], x, tmp_path)


# ------------------------------------------------------------------------------- on a GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a CUDA GPU (torch.cuda.is_available())")
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("fp16", 5e-2)])
def test_torch_cuda_classifier_is_captured_and_matches_the_reference(model, static, frames, precision, tol):
    from gfnet_edge.train.static import load_static

    x, _ = frames
    net, _ = load_static(static.ckpt)
    clf = TorchClassifier(net, model, Technology("torch", "cuda", precision, captured=True))
    want = reference_logits(static.onnx, model, x)
    for start, n in [(0, 3), (3, 4), (7, 1), (8, 3), (11, 4)]:
        np.testing.assert_allclose(clf(x[start:start + n]), want[start:start + n], rtol=tol, atol=tol)
    assert clf.cache.active and clf.cache.captures == 2 and clf.cache.replays == 3, clf.cache.disabled
    assert clf.ran().describe() == f"torch cuda {precision}, captured"
    clf.close()


def test_int8_tensorrt_static_engine_is_built_from_a_qdq_copy(model, static, frames, tmp_path, simulated_gpu):
    """An INT8 GFNet on TensorRT is compared with an INT8 static engine: built from a Q/DQ copy of
    the static graph (the ``tensorrt`` quantization profile), strongly typed like the bundle's
    INT8 engines; its predictions stay close to the float network's."""
    from gfnet_edge.runtime.backends.tensorrt_build import BuildOptions, plan_build

    x, _ = frames
    st = simulated_gpu.state
    t = Technology("tensorrt", "cuda", "int8", captured=True)
    plan = StaticPlan(t, t, {"precision": "int8", "build_options": {"workspace_mb": 64}})
    with open_classifier(plan, static.ckpt, lambda: static.onnx, model, None, tmp_path, batch=1,
                         calib=lambda: reference_input(model, x[:16])) as clf:
        got = clf(x)
    import onnx

    parsed = onnx.load(st.parsed)
    assert any(n.op_type == "QuantizeLinear" for n in parsed.graph.node)
    want_typed = plan_build("10.3.0", BuildOptions(precision="int8"), True, False).strongly_typed
    assert bool(st.network_flags) == want_typed and "INT8" not in st.set_flags
    ref = reference_logits(static.onnx, model, x)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # quantized, not a different network


def reference_input(model, frames):
    from gfnet_edge import ops

    return ops.preprocess(list(frames), S, crop_pct=1.0, interpolation=model.dataset_interpolation,
                          mean=model.mean, std=model.std)


# ------------------------------------------------------------------- gfnet-edge calibrate
@pytest.fixture(scope="module")
def calib_bundle(tmp_path_factory, model):
    """The tiny GFNet as an FP32 ONNX Runtime bundle with its checkpoint (the torch backend can
    run it), and 24 labelled S x S images."""
    from gfnet_edge.build import BuildConfig, build_bundle
    from gfnet_edge.models import save_checkpoint
    from tiny_gfnet import random_gfnet

    root = tmp_path_factory.mktemp("calib_static")
    net = random_gfnet("tiny_static", S, 16, 2, num_classes=CLASSES, channels=(8, 16, 32, 64), policy_hidden=8)
    ckpt = save_checkpoint(root / "tiny.pth.tar", net)
    build_bundle(ckpt, root / "bundle", BuildConfig(precision="fp32", backend="onnxruntime", include_checkpoint=True),
                 progress=False)
    rng = np.random.default_rng(2)
    np.savez(root / "data.npz", images=rng.integers(0, 256, (24, S, S, 3), dtype=np.uint8),
             labels=rng.integers(0, CLASSES, 24))
    return root


FAST = ["--repeats", "5", "--warmup", "1", "--warmup-ms", "0", "--batch-size", "0", "--threads", "1", "--gallery", "0",
        "--deadlines", "0", "--attempts", "1", "--budget-ms", "1000", "--no-compare", "--no-write", "-q"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_calibrate_report_names_the_technology_of_each_side(calib_bundle, static, tmp_path, capsys, backend):
    from gfnet_edge import cli

    out = tmp_path / "report"
    rc = cli.main(["calibrate", str(calib_bundle / "bundle"), "--data", str(calib_bundle / "data.npz"), "-o", str(out),
                   "--backend", backend, "--device", "cpu", "--static", str(static.ckpt), *FAST])
    assert rc == 0
    res = json.loads((out / "report.json").read_text())
    side = f"{backend} cpu fp32"
    line = f"GFNet: {side}; static: {side}"
    assert res["technology"]["gfnet"]["description"] == side and res["bundle"]["backend"] == backend
    assert [s["technology"]["backend"] for s in res["static"]] == [backend]
    assert line in capsys.readouterr().out
    assert line in (out / "report.html").read_text()


def test_deadline_sweep_runs_until_a_slower_static_network_meets_the_deadline(calib_bundle, static, tmp_path,
                                                                              monkeypatch):
    """A static baseline whose calls take 50 ms more than measured (far slower than the tiny GFNet):
    the sweep's deadlines go on past its p99 call, so its miss rate falls from 100 % to at most 1 %
    in the report, and GFNet runs every step at the last deadline."""
    from gfnet_edge import cli
    from gfnet_edge.calibrate import pipeline

    slowed = []
    real = pipeline.static_results

    def slower(*a, **k):
        out = real(*a, **k)
        for s in out:
            s.call_ms = np.asarray(s.call_ms) + 50.0
            slowed.append(s)
        return out

    monkeypatch.setattr(pipeline, "static_results", slower)
    out = tmp_path / "report"
    rc = cli.main(["calibrate", str(calib_bundle / "bundle"), "--data", str(calib_bundle / "data.npz"), "-o", str(out),
                   "--backend", "onnxruntime", "--static", str(static.ckpt), *FAST, "--deadlines", "3"])
    assert rc == 0 and len(slowed) == 1
    rows = json.loads((out / "report.json").read_text())["deadline_sweep"]["rows"]
    ds = [r["deadline_ms"] for r in rows]
    assert 3 < len(ds) <= 6 and np.all(np.diff(ds) > 0)
    assert ds[-1] >= np.percentile(slowed[0].call_ms, 99)
    miss = [r["static_miss_pct"][slowed[0].name] for r in rows]
    assert miss[0] == 100.0 and miss[-1] <= 1.0
    assert rows[-1]["stopped_pct"] == 0.0


def test_calibrate_refuses_a_static_source_the_backend_cannot_run_before_measuring(calib_bundle, static, tmp_path,
                                                                                   capsys, monkeypatch):
    """--backend torch with an ONNX static graph and no onnx2torch: one line saying what to pass,
    exit status 2 (unavailable dependency), no report, the bundle's manifest unchanged."""
    from gfnet_edge import cli
    from gfnet_edge.calibrate import pipeline

    manifest = (calib_bundle / "bundle" / "manifest.json").read_bytes()
    _without(monkeypatch, "onnx2torch")
    runs = []
    real = pipeline._run_budgets
    monkeypatch.setattr(pipeline, "_run_budgets", lambda *a, **k: runs.append(1) or real(*a, **k))
    out = tmp_path / "report"
    rc = cli.main(["calibrate", str(calib_bundle / "bundle"), "--data", str(calib_bundle / "data.npz"), "-o", str(out),
                   "--backend", "torch", "--device", "cpu", "--static", str(static.onnx), *FAST])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if not line.startswith("gfnet-edge: WARNING: ")]  # 24 images: rough
    assert rc == 3 and "onnx2torch" in err and ".pth.tar" in err and len(errors) == 1, err
    assert not out.exists() and not runs
    assert (calib_bundle / "bundle" / "manifest.json").read_bytes() == manifest


def test_an_onnx_static_graph_runs_on_the_torch_backend_through_onnx2torch(model, static, frames):
    """With onnx2torch installed, an ONNX static graph is converted to a torch module and runs
    like the checkpoint (same logits as ONNX Runtime on the graph)."""
    pytest.importorskip("onnx2torch", reason="onnx2torch is not installed (pip install onnx2torch)")
    x, _ = frames
    plan = _plan("torch", "cpu")
    with open_classifier(plan, static.onnx, lambda: static.onnx, model, None, Path("."), batch=4) as clf:
        got = clf(x[:6])
    np.testing.assert_allclose(got, reference_logits(static.onnx, model, x[:6]), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_static_engine_on_a_real_gpu(model, static, frames, tmp_path):
    from gfnet_edge import ops

    if not ops.has_cuda_build() or ops.cuda_device_count() < 1:
        pytest.skip("needs the extension built with CUDA and a GPU")
    x, _ = frames
    t = Technology("tensorrt", "cuda", "fp32", captured=True)
    with open_classifier(StaticPlan(t, t, {"precision": "fp32", "build_options": {}}), static.onnx,
                         lambda: static.onnx, model, None, tmp_path, batch=4) as clf:
        got = [clf(x[i:i + n]) for i, n in [(0, 4), (4, 3), (7, 4), (11, 1)]]
        assert clf.cache.captures == 2 and clf.cache.replays == 2, clf.cache.disabled
    np.testing.assert_allclose(np.concatenate(got), reference_logits(static.onnx, model, x[:12]), rtol=1e-3,
                               atol=1e-3)


def test_a_static_checkpoint_of_other_classes_than_the_bundles_is_refused(model, frames, tmp_path):
    """A baseline trained on other class folders (or another number of classes) would be scored
    against the bundle's labels: refused naming both; the baseline of the same classes runs."""
    import dataclasses

    import timm

    from gfnet_edge.train.static import save_static

    x, y = frames
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES).eval()
    names = ["blue jay", "grüne Äpfel", "red car", "zebra"]
    ckpt = save_static(tmp_path / "static.pth.tar", net, "resnet10t", {}, CLASSES, image_size=S, half=False,
                       metadata={"classes": names})
    named = dataclasses.replace(model, class_names=tuple(names))
    res = static_baselines([str(ckpt)], x[:8], y[:8], x, named, 1, False, repeats=1, batch=2)
    assert len(res) == 1 and res[0].meta["classes"] == names
    other = dataclasses.replace(model, class_names=("apple", "mango", "pear", "zebra"))
    with pytest.raises(InputError, match="baseline's classes .*blue jay.* are not the bundle's .*apple"):
        static_baselines([str(ckpt)], x[:8], y[:8], x, other, 1, False, repeats=1, batch=2)
    fewer = dataclasses.replace(model, num_classes=CLASSES - 1)
    with pytest.raises(InputError, match=f"baseline has {CLASSES} classes, the bundle's model {CLASSES - 1}"):
        static_baselines([str(ckpt)], x[:8], y[:8], x, fewer, 1, False, repeats=1, batch=2)


def test_two_static_baselines_of_one_backbone_keep_their_own_names(model, static, frames, tmp_path):
    """Two runs' baselines of the same backbone share a model name; each result (and so the report's
    comparisons and the deadline sweep, keyed by name) is told apart by its file, then by position."""
    import shutil

    x, y = frames
    other = tmp_path / "run2" / "static.pth.tar"
    other.parent.mkdir()
    shutil.copyfile(static.ckpt, other)
    res = static_baselines([str(static.ckpt), str(other), str(static.onnx)], x[:8], y[:8], x, model, 1, False,
                           repeats=1, batch=2)
    assert [r.name for r in res] == [f"static_resnet10t fp32 ({static.ckpt})", f"static_resnet10t fp32 ({other})",
                                     f"{static.onnx.stem} fp32"]
    res = static_baselines([str(other), str(other)], x[:8], y[:8], x, model, 1, False, repeats=1, batch=2)
    assert [r.name for r in res] == [f"static_resnet10t fp32 ({other}) #1", f"static_resnet10t fp32 ({other}) #2"]


def test_a_static_checkpoint_of_other_pre_processing_than_the_bundles_is_refused(model, frames, tmp_path):
    """A baseline trained on other crops (``crop_pct``) or resizes would be scored on frames it was
    not trained on: refused naming the setting; one recording the bundle's own runs."""
    import timm

    from gfnet_edge.train.static import save_static

    x, y = frames
    net = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES).eval()
    same = {"crop_pct": model.crop_pct, "dataset_interpolation": model.dataset_interpolation}
    ckpt = save_static(tmp_path / "same.pth.tar", net, "resnet10t", {}, CLASSES, image_size=S, half=False,
                       metadata=same)
    assert len(static_baselines([str(ckpt)], x[:8], y[:8], x, model, 1, False, repeats=1, batch=2)) == 1
    other_interp = "bicubic" if model.dataset_interpolation == "bilinear" else "bilinear"
    for key, value in (("crop_pct", 1.0 if model.crop_pct != 1.0 else 0.875), ("dataset_interpolation", other_interp)):
        ckpt = save_static(tmp_path / f"{key}.pth.tar", net, "resnet10t", {}, CLASSES, image_size=S, half=False,
                           metadata={**same, key: value})
        with pytest.raises(InputError, match=f"trained and validated with {key} {value}, the bundle's model with"):
            static_baselines([str(ckpt)], x[:8], y[:8], x, model, 1, False, repeats=1, batch=2)
