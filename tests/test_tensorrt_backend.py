"""TensorRT backend logic up to the TensorRT call; TensorRT itself is skipped when absent."""
from __future__ import annotations

import importlib.util

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

    fp32_bundle.update_manifest(lambda m: m.update(engines=[dict(ENTRY, compute_capability="9.0")]))
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


def _fake_trt(runtime_cls):
    """A stand-in ``tensorrt`` module whose ``Runtime`` is ``runtime_cls``."""
    class FakeLogger:
        WARNING = 2

        def __init__(self, level):
            pass

    class FakeTRT:
        __version__ = "10.3.0"
        Runtime = runtime_cls
        Logger = FakeLogger

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
