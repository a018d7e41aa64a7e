"""TensorRT backend logic up to the TensorRT call; TensorRT itself is skipped when absent."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from gfnet_edge.errors import InputError, UnavailableError
from gfnet_edge.runtime.backends import tensorrt as trtb

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.parametrize(
    "version,precision,typed,flags,convert,graphs",
    [
        ("10.3.0", "int8", True, [], False, "int8-tensorrt"),
        ("10.3.0", "fp16", False, ["FP16"], False, "fp32"),
        ("10.3.0", "fp32", False, [], False, "fp32"),
        ("11.0.0", "int8", True, [], False, "int8-tensorrt"),
        ("11.0.0", "fp16", True, [], True, "fp32"),  # 11.x: no FP16 flag, convert the graph
        ("11.2.1", "fp32", True, [], False, "fp32"),
    ],
)
def test_plan_build(version, precision, typed, flags, convert, graphs):
    plan = trtb.plan_build(version, trtb.BuildOptions(precision=precision))
    assert (plan.strongly_typed, plan.builder_flags, plan.convert_fp16, plan.graph_set) == (typed, flags, convert, graphs)
    assert "INT8" not in plan.builder_flags  # INT8 only from Q/DQ nodes, never a calibrator/flag


def test_plan_build_dla_and_old_versions():
    plan = trtb.plan_build("10.3.0", trtb.BuildOptions(precision="int8", dla_core=0))
    assert "GPU_FALLBACK" in plan.builder_flags
    with pytest.raises(UnavailableError, match="too old"):
        trtb.plan_build("8.6.1", trtb.BuildOptions())


@pytest.mark.parametrize("kw,match", [
    ({"precision": "int4"}, "precision"), ({"max_batch": 0}, "batch"), ({"opt_batch": 64, "max_batch": 32}, "batch"),
    ({"workspace_mb": 1}, "workspace"), ({"opt_level": 9}, "optimisation level"), ({"dla_core": -1}, "DLA"),
])
def test_build_options_validation(kw, match):
    with pytest.raises(InputError, match=match):
        trtb.BuildOptions(**kw).validate()


class _FakeBundle:
    def __init__(self, engines, root="B"):
        self.manifest = {"engines": engines}
        self.root = root


ENTRY = {"backend": "tensorrt", "precision": "int8", "gpu_name": "Orin", "compute_capability": "8.7",
         "tensorrt_version": "10.3.0", "glance": "engines/x/glance.int8.engine", "focus": "engines/x/focus.int8.engine"}


def test_select_engine_matches_device():
    here = {"gpu_name": "Orin", "compute_capability": "8.7"}
    assert trtb.select_engine(_FakeBundle([ENTRY]), "auto", here, "10.3.0") is ENTRY


@pytest.mark.parametrize("here,ver,match", [
    ({"gpu_name": "H100", "compute_capability": "9.0"}, "10.3.0", "compute capability 8.7"),
    ({"gpu_name": "Orin", "compute_capability": "8.7"}, "10.7.0", "TensorRT 10.3.0 vs this TensorRT 10.7.0"),
])
def test_select_engine_refuses_other_device_with_rebuild_hint(here, ver, match):
    with pytest.raises(InputError, match=match) as e:
        trtb.select_engine(_FakeBundle([ENTRY]), "auto", here, ver)
    assert "gfnet-edge build-engine B --backend tensorrt" in str(e.value)


def test_select_engine_none_or_wrong_precision():
    with pytest.raises(InputError, match="no TensorRT engines"):
        trtb.select_engine(_FakeBundle([]), "auto", {"gpu_name": "x", "compute_capability": "8.7"}, "10.3.0")
    with pytest.raises(InputError, match="no fp16 TensorRT engine"):
        trtb.select_engine(_FakeBundle([ENTRY]), "fp16", {"gpu_name": "x", "compute_capability": "8.7"}, "10.3.0")


def test_engine_dir_name():
    assert trtb.engine_dir_name({"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "10.3.0") == \
        "nvidia-h100-80gb-hbm3-sm90-trt10.3.0"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_says_how_to_proceed():
    with pytest.raises(UnavailableError, match="JetPack") as e:
        trtb.import_tensorrt()
    assert "--backend tensorrt" in str(e.value)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it cannot be on CPU-only CI machines)")
def test_tensorrt_version_supported():  # pragma: no cover - runs only where TensorRT exists
    trt = trtb.import_tensorrt()
    trtb.plan_build(trt.__version__, trtb.BuildOptions())


def test_select_engine_accepts_graph_set_name():
    here = {"gpu_name": "Orin", "compute_capability": "8.7"}
    assert trtb.select_engine(_FakeBundle([ENTRY]), "int8-tensorrt", here, "10.3.0") is ENTRY


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory):
    pytest.importorskip("torch")
    from pathlib import Path

    from gfnet_edge.build import BuildConfig, build_bundle

    demo = Path(__file__).resolve().parents[1] / "gfnet_edge" / "assets" / "demo_gfnet.pth.tar"
    return build_bundle(demo, tmp_path_factory.mktemp("trt") / "bundle",
                        BuildConfig(precision="fp32", backend="onnxruntime"), progress=False)


class _FakeTRT:
    __version__ = "10.3.0"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0


def _fake_device(monkeypatch, cc="8.7"):
    from gfnet_edge.runtime import api

    monkeypatch.setattr(trtb, "import_tensorrt", lambda: _FakeTRT)
    monkeypatch.setattr(trtb, "gpu_info", lambda: {"gpu_name": "Orin", "compute_capability": cc})
    monkeypatch.setattr(api, "_tensorrt_usable", lambda: True)


def test_auto_backend_falls_back_when_engines_are_for_another_device(fp32_bundle, monkeypatch, caplog):
    from gfnet_edge.runtime import Runtime

    for g in ("glance", "focus"):  # engine files listed as artifacts, as a build writes them
        (fp32_bundle.root / ENTRY[g]).parent.mkdir(parents=True, exist_ok=True)
        (fp32_bundle.root / ENTRY[g]).write_bytes(b"engine")

    def add(m):
        m.update(engines=[dict(ENTRY, compute_capability="9.0")])
        for g in ("glance", "focus"):
            fp32_bundle.add_artifact(m, ENTRY[g])

    fp32_bundle.update_manifest(add)
    _fake_device(monkeypatch)
    with Runtime(fp32_bundle.root, backend="auto", verify=False) as rt:
        assert rt.backend == "onnxruntime"
    assert "not using TensorRT" in caplog.text and "compute capability 9.0" in caplog.text


def test_failed_engine_build_leaves_the_bundle_as_it_was(fp32_bundle, monkeypatch):
    from gfnet_edge.build import BuildConfig, build_engines
    from gfnet_edge.bundle import Bundle

    fp32_bundle.update_manifest(lambda m: m.update(engines=[]))
    before = sorted(p.relative_to(fp32_bundle.root).as_posix() for p in fp32_bundle.root.rglob("*"))
    _fake_device(monkeypatch)
    calls = []

    def fake_build(onnx_path, out_path, options):
        calls.append(out_path)
        if len(calls) == 2:
            raise RuntimeError("focus engine failed")
        out_path.write_bytes(b"engine")
        return {"backend": "tensorrt", "precision": options.precision, "compute_capability": "8.7",
                "tensorrt_version": "10.3.0", "gpu_name": "Orin"}

    monkeypatch.setattr(trtb, "build_engine", fake_build)
    with pytest.raises(RuntimeError, match="focus engine failed"):
        build_engines(fp32_bundle.root, BuildConfig(precision="fp32", backend="tensorrt"))
    after = sorted(p.relative_to(fp32_bundle.root).as_posix() for p in fp32_bundle.root.rglob("*") if p.is_file())
    assert not [p for p in after if p.endswith(".tmp")], after
    assert Bundle.load(fp32_bundle.root).manifest["engines"] == []  # still loads and verifies
    assert set(after) <= set(before)


class _Logger:
    """Stand-in ``tensorrt.Logger``."""

    WARNING = 2

    def __init__(self, level):
        pass


def _fake_trt(runtime_cls):
    """A stand-in ``tensorrt`` module whose ``Runtime`` is ``runtime_cls``."""
    class FakeTRT:
        __version__ = "10.3.0"
        Runtime = runtime_cls
        Logger = _Logger

    return FakeTRT


class _OneEngineBundle:
    """A bundle whose every engine path is one file."""

    def __init__(self, engine, entry):
        self.root = engine.parent
        self.manifest = {"engines": [entry]}
        self._engine = engine

    def path(self, rel):
        return self._engine


def test_engines_are_deserialised_without_host_code_and_truncated_ones_refused(tmp_path, monkeypatch):
    """The runner turns off engine host code before deserialising; an engine TensorRT cannot read
    (truncated, corrupt) is a clear InputError naming the file."""
    seen = []

    class FakeRuntime:
        def __init__(self, logger):
            self.engine_host_code_allowed = True

        def deserialize_cuda_engine(self, data):
            seen.append((self.engine_host_code_allowed, len(data)))
            return None  # what TensorRT returns for a truncated / corrupt plan

    engine = tmp_path / "glance.int8.engine"
    engine.write_bytes(b"\x00" * 10)
    monkeypatch.setattr(trtb, "import_tensorrt", lambda: _fake_trt(FakeRuntime))
    runner = trtb.TensorRTRunner(_OneEngineBundle(engine, ENTRY), dict(ENTRY, glance="glance.int8.engine"))
    with pytest.raises(InputError, match="could not deserialize this engine"):
        runner.activate()
    assert seen == [(False, 10)]
    assert not runner.active


DLA0 = dict(ENTRY, glance="engines/dla0/glance.int8.engine", focus="engines/dla0/focus.int8.engine",
            build_options={"dla_core": 0, "gpu_fallback": True})


def test_select_engine_tells_gpu_and_dla_engines_apart():
    here = {"gpu_name": "Orin", "compute_capability": "8.7"}
    both = _FakeBundle([DLA0, ENTRY])  # the DLA engines first: order must not decide
    assert trtb.select_engine(both, "auto", here, "10.3.0") is ENTRY
    assert trtb.select_engine(both, "auto", here, "10.3.0", dla_core=0) is DLA0
    with pytest.raises(InputError, match=r"no TensorRT engine for the DLA core 1 .*GPU, DLA core 0") as e:
        trtb.select_engine(both, "auto", here, "10.3.0", dla_core=1)
    assert "build-engine B --backend tensorrt --dla-core 1" in str(e.value)
    with pytest.raises(InputError, match=r"no TensorRT engine for the GPU .*: DLA core 0; select one with"):
        trtb.select_engine(_FakeBundle([DLA0]), "auto", here, "10.3.0")


def _dla_fake_trt(seen, cores):
    class FakeRuntime:
        num_DLA_cores = cores

        def __init__(self, logger):
            self.engine_host_code_allowed = True
            self.DLA_core = -1

        def deserialize_cuda_engine(self, data):
            seen.append(self.DLA_core)
            return None

    return _fake_trt(FakeRuntime)


def test_runner_deserialises_dla_engines_on_their_core(tmp_path, monkeypatch):
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"\x00" * 4)
    seen = []
    monkeypatch.setattr(trtb, "import_tensorrt", lambda: _dla_fake_trt(seen, cores=2))
    with pytest.raises(InputError, match="could not deserialize"):
        trtb.TensorRTRunner(_OneEngineBundle(engine, DLA0), dict(DLA0, build_options={"dla_core": 1})).activate()
    assert seen == [1]  # the runtime named the engine's core before deserialising
    seen.clear()
    monkeypatch.setattr(trtb, "import_tensorrt", lambda: _dla_fake_trt(seen, cores=0))
    with pytest.raises(UnavailableError, match="built for DLA core 0, but this device has 0 DLA core"):
        trtb.TensorRTRunner(_OneEngineBundle(engine, DLA0), DLA0).activate()
    assert seen == []


def test_dla_core_option_is_checked(fp32_bundle, tmp_path, capsys):
    from gfnet_edge import cli
    from gfnet_edge.runtime import Runtime

    with pytest.raises(InputError, match="dla_core applies to TensorRT engines, not the onnxruntime backend"):
        Runtime(fp32_bundle.root, backend="onnxruntime", dla_core=0, verify=False)
    with pytest.raises(InputError, match="DLA core number >= 0"):
        Runtime(fp32_bundle.root, backend="tensorrt", dla_core=-1, verify=False)
    frames = tmp_path / "x.npz"
    np.savez(frames, images=np.zeros((1, 224, 224, 3), np.uint8))
    rc = cli.main(["predict", str(fp32_bundle.root), str(frames), "--backend", "onnxruntime", "--dla-core", "0"])
    assert rc != 0
    assert "dla_core applies to TensorRT engines" in capsys.readouterr().err


def test_a_new_build_replaces_only_its_own_slot():
    assert trtb.same_engine_slot(ENTRY, dict(ENTRY, glance="other.engine"))
    assert trtb.same_engine_slot(DLA0, dict(DLA0, build_options={"dla_core": 0, "gpu_fallback": False}))
    assert not trtb.same_engine_slot(ENTRY, DLA0)  # GPU and DLA engines live side by side
    assert not trtb.same_engine_slot(ENTRY, dict(ENTRY, precision="fp16"))
    assert not trtb.same_engine_slot(ENTRY, dict(ENTRY, tensorrt_version="10.7.0"))
    assert not trtb.same_engine_slot(ENTRY, dict(ENTRY, compute_capability="9.0"))


def _recording_trt(version="10.3.0", typed_flag=True, parse_ok=True, build_ok=True, engine_is_onnx=False):
    """A stand-in ``tensorrt`` module for :func:`build_engine` that records what it is asked for.

    It has the attributes the TensorRT 10.x / 11.x Python API has for these calls (11.x: no
    ``BuilderFlag.FP16``; with ``typed_flag=False`` no ``STRONGLY_TYPED`` either). Its
    "serialized engine" is fixed bytes, or with ``engine_is_onnx`` the parsed ONNX graph itself
    (which :func:`_onnx_engine_trt` runs)."""
    log = {"set_flags": [], "profile": None, "parsed": None, "timing_cache_in": None}

    class Flags:
        GPU_FALLBACK = "GPU_FALLBACK"

    if version.startswith("10."):
        Flags.FP16 = "FP16"

    class CreationFlags:
        pass

    if typed_flag:
        CreationFlags.STRONGLY_TYPED = 0

    class Input:
        name, shape = "image", (-1, 3, 96, 96)

    class Network:
        def get_input(self, i):
            assert i == 0
            return Input()

    class Cache:
        def serialize(self):
            return b"timing-cache-out"

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            log["pool"] = (pool, size)

        def set_flag(self, flag):
            log["set_flags"].append(flag)

        def create_timing_cache(self, blob):
            log["timing_cache_in"] = bytes(blob)
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            log["ignore_mismatch"] = ignore_mismatch

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            log["profile"] = profile.shapes

        def __setattr__(self, name, value):
            if name != "cache":
                log[name] = value
            object.__setattr__(self, name, value)

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class FakeBuilder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            log["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if not build_ok:
                return None
            return bytearray(Path(log["parsed"]).read_bytes() if engine_is_onnx else b"serialized-engine")

    class Parser:
        num_errors = 0 if parse_ok else 2

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            log["parsed"] = path
            return parse_ok

        def get_error(self, i):
            return f"node {i}: unsupported operator"

    class FakeTRT:
        __version__ = version
        OnnxParser, NetworkDefinitionCreationFlag, BuilderFlag = Parser, CreationFlags, Flags
        Builder, Logger = FakeBuilder, _Logger

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class DeviceType:
            DLA, GPU = "DLA", "GPU"

    return FakeTRT, log


def _fake_builder(monkeypatch, **kw):
    trt, log = _recording_trt(**kw)
    monkeypatch.setattr(trtb, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trtb, "gpu_info", lambda: {"gpu_name": "Orin", "compute_capability": "8.7"})
    return log


@pytest.mark.parametrize("version,typed_flag,precision,flags,typed", [
    ("10.3.0", True, "int8", [], True),  # Q/DQ network, strongly typed, no precision flag
    ("10.3.0", True, "fp16", ["FP16"], False),  # 10.x: weakly typed FP16
    ("10.3.0", True, "fp32", [], False),
    ("11.0.0", True, "int8", [], True),
    ("11.0.0", False, "int8", [], True),  # 11.x without the (deprecated, ignored) flag: not passed
    ("11.0.0", True, "fp32", [], True),
])
def test_build_engine_asks_tensorrt_for_the_planned_network(tmp_path, monkeypatch, version, typed_flag, precision,
                                                             flags, typed):
    log = _fake_builder(monkeypatch, version=version, typed_flag=typed_flag)
    onnx, out = tmp_path / "glance.onnx", tmp_path / "engines" / "glance.engine"
    onnx.write_bytes(b"onnx")
    opts = trtb.BuildOptions(precision=precision, workspace_mb=512, max_batch=16, opt_batch=4)
    entry = trtb.build_engine(onnx, out, opts)
    assert log["network_flags"] == (1 if typed and typed_flag else 0)
    assert log["parsed"] == str(onnx) and log["set_flags"] == flags
    assert log["pool"] == ("WORKSPACE", 512 << 20)
    assert log["profile"] == ("image", (1, 3, 96, 96), (4, 3, 96, 96), (16, 3, 96, 96))
    assert "builder_optimization_level" not in log and "DLA_core" not in log
    assert out.read_bytes() == b"serialized-engine"
    assert entry["tensorrt_version"] == version and entry["compute_capability"] == "8.7"
    assert entry["precision"] == precision and entry["strongly_typed"] is typed
    assert entry["graph_set"] == ("int8-tensorrt" if precision == "int8" else "fp32")
    assert entry["build_options"]["max_batch"] == 16


def test_build_engine_dla_level_and_timing_cache(tmp_path, monkeypatch):
    log = _fake_builder(monkeypatch)
    onnx, out, cache = tmp_path / "focus.onnx", tmp_path / "focus.engine", tmp_path / "timing.cache"
    onnx.write_bytes(b"onnx")
    cache.write_bytes(b"timing-cache-in")
    opts = trtb.BuildOptions(precision="int8", opt_level=5, dla_core=1, timing_cache=str(cache))
    trtb.build_engine(onnx, out, opts)
    assert log["DLA_core"] == 1 and log["default_device_type"] == "DLA"
    assert log["set_flags"] == ["GPU_FALLBACK"] and log["builder_optimization_level"] == 5
    assert log["timing_cache_in"] == b"timing-cache-in" and log["ignore_mismatch"] is False
    assert cache.read_bytes() == b"timing-cache-out"  # written back after the build
    log = _fake_builder(monkeypatch)
    trtb.build_engine(onnx, out, trtb.BuildOptions(dla_core=0, gpu_fallback=False, timing_cache=str(tmp_path / "new")))
    assert log["set_flags"] == [] and log["timing_cache_in"] == b""  # a missing cache file starts empty
    assert (tmp_path / "new").read_bytes() == b"timing-cache-out"


@pytest.mark.parametrize("kw,match", [
    ({"parse_ok": False}, r"ONNX parser failed: node 0: unsupported operator; node 1: unsupported operator"),
    ({"build_ok": False}, "could not build an engine"),
])
def test_build_engine_failures_are_clear_and_write_nothing(tmp_path, monkeypatch, kw, match):
    _fake_builder(monkeypatch, **kw)
    onnx, out = tmp_path / "glance.onnx", tmp_path / "glance.engine"
    onnx.write_bytes(b"onnx")
    with pytest.raises(InputError, match=match):
        trtb.build_engine(onnx, out, trtb.BuildOptions(precision="fp32"))
    assert not out.exists()


def test_build_engine_fp16_on_tensorrt_11_needs_modelopt(tmp_path, monkeypatch):
    if importlib.util.find_spec("modelopt") is not None:
        pytest.skip("ModelOpt is installed here")
    _fake_builder(monkeypatch, version="11.0.0")
    onnx = tmp_path / "glance.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(UnavailableError, match="ModelOpt"):
        trtb.build_engine(onnx, tmp_path / "glance.engine", trtb.BuildOptions(precision="fp16"))


def _engines_on_simulated_gpu(monkeypatch, profile_max):
    """A GPU simulated in host memory (tests/sim_device.py: ``ops``' CUDA entry points, buffers
    and stream work on it) and a stand-in ``tensorrt`` whose engines run there; ``(memory,
    engine log)``, the log holding each engine call's batch and the profile's max batch."""
    from types import SimpleNamespace

    from sim_device import SimMemory, sim_ops

    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem)
    engines = SimpleNamespace(view=lambda ptr, shape: mem.view(ptr, shape, np.float32), batches=[],
                              profile_max=profile_max, sim=sim)
    monkeypatch.setattr(trtb, "import_tensorrt", lambda: _onnx_engine_trt(engines))
    return mem, engines


def _onnx_engine_trt(bufs):
    """A stand-in ``tensorrt`` module whose "engines" are ONNX graphs run by ONNX Runtime on the
    simulated device memory (``bufs``: :func:`_engines_on_simulated_gpu`'s log), through the same calls (tensor names, modes, shapes, addresses,
    ``execute_async_v3``) the runner makes on a real engine."""
    import onnxruntime as ort

    class Mode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    class Engine:
        def __init__(self, blob):
            self.sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
            self.names = ["image"] + [o.name for o in self.sess.get_outputs()]
            self.shapes = {"image": tuple(d if isinstance(d, int) else -1 for d in self.sess.get_inputs()[0].shape)}
            for o in self.sess.get_outputs():
                self.shapes[o.name] = tuple(d if isinstance(d, int) else -1 for d in o.shape)

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return Mode.INPUT if name == "image" else Mode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float32"

        def get_tensor_shape(self, name):
            return self.shapes[name]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.batch, self.addr = engine, None, {}

        def set_input_shape(self, name, shape):
            assert name == "image" and tuple(shape[1:]) == self.engine.shapes["image"][1:]
            bufs.batches.append(int(shape[0]))
            if shape[0] > bufs.profile_max:  # outside the optimisation profile
                return False
            self.batch = int(shape[0])
            return True

        def get_tensor_shape(self, name):
            assert self.batch is not None, "output shapes asked before the input shape was set"
            return (self.batch,) + self.engine.shapes[name][1:]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            x = bufs.view(self.addr["image"], self.get_tensor_shape("image"))
            outs = self.engine.sess.run(None, {"image": np.array(x)})
            for name, y in zip(self.engine.names[1:], outs):
                bufs.view(self.addr[name], y.shape)[...] = y
            return True

    class Runtime:
        engine_host_code_allowed = True

        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine(blob)

    trt = _fake_trt(Runtime)
    trt.TensorIOMode, trt.float32 = Mode, "float32"
    trt.nptype = staticmethod(lambda dtype: np.float32)
    return trt


def test_runner_feeds_and_reads_engines_through_device_buffers(fp32_bundle, monkeypatch):
    """TensorRTRunner.run (numpy in, numpy out) with engines standing in for TensorRT's: same
    outputs as ONNX Runtime on the same graphs at batch 1 and 5 (cut into the engines' max
    batch of 2), and the host loop over it traces the bundle exactly as the ONNX Runtime
    backend does. A batch outside the optimisation profile is a clear error."""
    from gfnet_edge import ops
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.heads import HeadSet, load_head_arrays
    from gfnet_edge.runtime.profile import Profiler

    _, bufs = _engines_on_simulated_gpu(monkeypatch, profile_max=2)
    graphs = fp32_bundle.manifest["graphs"]["fp32"]
    entry = {"precision": "fp32", "glance": graphs["glance"], "focus": graphs["focus"],
             "build_options": {"max_batch": 2}}
    model = fp32_bundle.model
    S, P = int(model["image_size"]), int(model["patch_size"])
    rng = np.random.default_rng(0)
    ref = OnnxRuntimeRunner({g: fp32_bundle.path(p) for g, p in graphs.items()}, "fp32", threads=1).activate()
    with trtb.TensorRTRunner(fp32_bundle, entry) as runner:
        for n in (1, 5):
            x = rng.standard_normal((n, 3, P, P)).astype(np.float32)
            for g in ("glance", "focus"):
                got, want = runner.run(g, x), ref.run(g, x)
                assert set(got) == set(want)
                for k in want:
                    assert got[k].dtype == np.float32 and got[k].shape == want[k].shape
                    np.testing.assert_array_equal(got[k], want[k])
        assert max(bufs.batches) == 2 and bufs.batches.count(1) >= 3  # 5 = 2 + 2 + 1
        runner.max_batch = 4  # more than the profile takes
        with pytest.raises(InputError, match="rejects input shape.*optimisation profile"):
            runner.run("glance", np.zeros((3, 3, P, P), np.float32))
        runner.max_batch = 2
        images = rng.standard_normal((4, 3, S, S)).astype(np.float32)
        driver = Driver(model, runner, HeadSet(load_head_arrays(fp32_bundle.heads_path), model), Profiler())
        got = driver.run(images, ops.glance(images, P, model["glance_interpolation"]), None)
    ref.deactivate()
    with Runtime(fp32_bundle.root, backend="onnxruntime", precision="fp32", threads=1, verify=False) as rt:
        want = rt.trace(images)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    np.testing.assert_array_equal(got.coords, want.coords)


def _build_stand_in_engines(fp32_bundle, root, monkeypatch):
    """Phase 2 on a copy of the bundle at ``root``: ``build-engine BUNDLE --backend tensorrt``
    with the stand-in builder (its engines are the ONNX graphs), max batch 3; the builder's log."""
    from gfnet_edge import cli
    from gfnet_edge.bundle import Bundle

    shutil.copytree(fp32_bundle.root, root)
    Bundle.load(root, verify=False).update_manifest(lambda m: m.update(engines=[]))
    log = _fake_builder(monkeypatch, engine_is_onnx=True)
    rc = cli.main(["build-engine", str(root), "--backend", "tensorrt", "--precision", "fp32", "--max-batch", "3",
                   "--workspace", "256"])
    assert rc == 0
    return log


def test_two_phase_build_then_run_on_stand_in_tensorrt(fp32_bundle, tmp_path, monkeypatch):
    """Phase 2 on the "device": `gfnet-edge build-engine BUNDLE --backend tensorrt` adds engines
    (here: the stand-in builder's, which are the ONNX graphs) under the GPU's directory with
    their hashes; the bundle still verifies; the engine is selected for this GPU and TensorRT,
    and the runner over the built files traces like ONNX Runtime."""
    from gfnet_edge import ops
    from gfnet_edge.bundle import Bundle
    from gfnet_edge.runtime import Runtime
    from gfnet_edge.runtime.driver import Driver
    from gfnet_edge.runtime.heads import HeadSet, load_head_arrays
    from gfnet_edge.runtime.profile import Profiler

    root = tmp_path / "bundle"
    log = _build_stand_in_engines(fp32_bundle, root, monkeypatch)
    assert log["pool"] == ("WORKSPACE", 256 << 20)
    bundle = Bundle.load(root)  # hashes and versions verified
    entry = trtb.select_engine(bundle, "auto", here={"gpu_name": "Orin", "compute_capability": "8.7"},
                               trt_version="10.3.0")
    assert entry["glance"] == "engines/orin-sm87-trt10.3.0/glance.fp32.engine"
    assert entry["precision"] == "fp32" and entry["build_options"]["max_batch"] == 3
    assert {entry["glance"], entry["focus"]} <= set(bundle.manifest["artifacts"])
    _, bufs = _engines_on_simulated_gpu(monkeypatch, profile_max=3)
    model = bundle.model
    S, P = int(model["image_size"]), int(model["patch_size"])
    images = np.random.default_rng(1).standard_normal((5, 3, S, S)).astype(np.float32)
    with trtb.TensorRTRunner(bundle, entry) as runner:
        driver = Driver(model, runner, HeadSet(load_head_arrays(bundle.heads_path), model), Profiler())
        got = driver.run(images, ops.glance(images, P, model["glance_interpolation"]), None)
    assert max(bufs.batches) == 3
    with Runtime(root, backend="onnxruntime", precision="fp32", threads=1) as rt:
        want = rt.trace(images)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    np.testing.assert_array_equal(got.coords, want.coords)


def _simulated_jetson(fp32_bundle, tmp_path, monkeypatch):
    """A bundle with stand-in TensorRT engines (phase 2) and a GPU simulated in host memory
    (tests/sim_device.py): the CUDA entry points of ``ops``, the engines' tensor addresses and
    the CUDA heads all work on that memory. ``(bundle root, memory, engine log, sim log)``."""
    from gfnet_edge.runtime import api
    from gfnet_edge.runtime.heads import HeadSet
    from sim_device import SimHeads

    root = tmp_path / "bundle"
    _build_stand_in_engines(fp32_bundle, root, monkeypatch)
    mem, engines = _engines_on_simulated_gpu(monkeypatch, profile_max=3)

    def heads(arrays, model, device="cpu", weight_dtype="float32"):
        cpu = HeadSet(arrays, model, weight_dtype=weight_dtype)
        return SimHeads(cpu, mem) if device == "cuda" else cpu

    monkeypatch.setattr(api, "HeadSet", heads)
    return root, mem, engines, engines.sim


def test_runtime_runs_the_device_loop_over_tensorrt_engines_on_a_simulated_gpu(fp32_bundle, tmp_path, monkeypatch):
    """``Runtime(backend="tensorrt")`` end to end as on a Jetson, with the GPU simulated in host
    memory (tests/sim_device.py) and the stand-in engines built by phase 2: the loop's device
    place over ``TensorRTRunner.run_device`` (input shapes, tensor addresses, execute_async_v3
    on the loop's stream, outputs left in device buffers) and the heads' device steps. Trace
    and early-exit predictions, for float images and for frames of several sizes (pre-processed
    on the "device"), equal ONNX Runtime's on the host; 10 images run as chunks of the engines'
    max batch of 3, and the exits happen at every step, survivors moving rows."""
    from gfnet_edge.runtime import Runtime
    from probs import exits_mid_loop, gap_thresholds
    from sim_device import demo_test_images

    root, _, engines, _ = _simulated_jetson(fp32_bundle, tmp_path, monkeypatch)
    model = fp32_bundle.model
    T = int(model["steps"])
    images = demo_test_images(model, 10)
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (150 + 17 * i, 260 - 9 * i, 3), dtype=np.uint8) for i in range(5)]
    with Runtime(root, backend="tensorrt", precision="fp32") as rt, \
            Runtime(root, backend="onnxruntime", precision="fp32", threads=1) as ref:
        assert rt.runner.name == "tensorrt" and rt.device_loop and rt.driver.on_device
        assert not ref.driver.on_device
        got, want = rt.trace(images), ref.trace(images)
        np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got.coords, want.coords)
        assert max(engines.batches) == 3 and engines.batches[:2] == [3, 3]  # chunks of 3, 3, 3, 1
        rt.thresholds = ref.thresholds = gap_thresholds(want.probs)
        for inputs in (images, frames):
            a, b = rt.predict(inputs), ref.predict(inputs)
            for f in ("classes", "exit_step", "coords"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
            np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-5)
            if inputs is images:
                assert exits_mid_loop(a.exit_step, T), a.exit_step


def test_frames_in_gpu_memory_are_classified_where_they_are(fp32_bundle, tmp_path, monkeypatch):
    """``Runtime.predict`` takes frames already in GPU memory (``__cuda_array_interface__``, as
    from CuPy or torch): with the loop on the (simulated) GPU they are
    pre-processed in place -- one (N, H, W, 3) array or a list of (H, W, 3) ones -- after their
    producer's stream is synchronized, with the results of the same frames from host memory.
    Frames it cannot read in place, and a runtime whose loop runs on the host, are clear errors."""
    from gfnet_edge.runtime import Runtime
    from sim_device import DeviceArray

    root, mem, _, sim = _simulated_jetson(fp32_bundle, tmp_path, monkeypatch)
    rng = np.random.default_rng(7)
    batch = rng.integers(0, 256, (4, 180, 240, 3), dtype=np.uint8)
    sizes = [(150, 260), (200, 200), (130, 300)]
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    with Runtime(root, backend="tensorrt", precision="fp32") as rt:
        for host, device, n, synced in ((batch, DeviceArray(mem, batch, stream=5), 4, [5]),
                                        (frames, [DeviceArray(mem, f) for f in frames], 3, []),
                                        (frames[1], DeviceArray(mem, frames[1], stream=5), 1, [5])):
            sim.synced.clear()
            a, b = rt.predict(device), rt.predict(host)
            assert len(a) == len(b) == n and sim.synced == synced  # each producer stream once
            for f in ("classes", "exit_step", "coords"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
            np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-6)
        t = rt.trace(DeviceArray(mem, batch))
        np.testing.assert_allclose(t.probs, rt.trace(batch).probs, rtol=0, atol=1e-6)
        bad = [(DeviceArray(mem, batch.astype(np.float32)), "must be uint8"),
               (DeviceArray(mem, batch[..., :2]), r"\(H, W, 3\)"),
               (DeviceArray(mem, batch, strides=(240 * 3 * 180, 3, 720, 1)), "C-contiguous"),
               (DeviceArray(mem, batch, mask=object()), "masked"),
               ([DeviceArray(mem, frames[0]), frames[1]], "only device arrays")]
        for obj, match in bad:
            with pytest.raises(InputError, match=match):
                rt.predict(obj)
    with Runtime(root, backend="onnxruntime", precision="fp32", threads=1) as host_rt:
        with pytest.raises(InputError, match="frames in GPU memory need a runtime whose loop runs on the GPU"):
            host_rt.predict(DeviceArray(mem, batch))
