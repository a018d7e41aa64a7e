"""TensorRT backend logic up to the TensorRT call; TensorRT itself is skipped when absent."""
from __future__ import annotations

import importlib.util
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from gfnet_edge.errors import InputError, UnavailableError
from gfnet_edge.runtime.backends import tensorrt as trtb
from gfnet_edge.runtime.backends import tensorrt_build as trt_build
from gfnet_edge.runtime.backends import tensorrt_engines as trt_engines
from gfnet_edge.runtime.backends import tensorrt_util as trt_util

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.parametrize(
    "version,precision,modelopt,typed,flags,convert,graphs",
    [
        ("10.3.0", "int8", False, True, [], False, "int8-tensorrt"),
        ("10.3.0", "fp16", True, False, ["FP16"], False, "fp32"),  # 10.0-10.11: weakly typed FP16
        ("10.3.0", "fp32", False, False, [], False, "fp32"),
        ("10.12.0", "fp16", True, True, [], True, "fp32"),  # FP16 flag deprecated: strongly typed route
        ("10.12.0", "fp16", False, False, ["FP16"], False, "fp32"),  # ... or the flag, with a warning
        ("11.0.0", "int8", False, True, [], False, "int8-tensorrt"),
        ("11.0.0", "fp16", False, True, [], True, "fp32"),  # 11.x: no FP16 flag, convert the graph
        ("11.2.1", "fp32", False, True, [], False, "fp32"),
    ],
)
def test_plan_build(version, precision, modelopt, typed, flags, convert, graphs):
    plan = trt_build.plan_build(version, trt_build.BuildOptions(precision=precision), has_modelopt=modelopt)
    assert (plan.strongly_typed, plan.builder_flags, plan.convert_fp16, plan.graph_set) == (typed, flags, convert, graphs)
    assert "INT8" not in plan.builder_flags  # INT8 only from Q/DQ nodes, never a calibrator/flag
    assert bool(plan.notes) == (version == "10.12.0" and not modelopt)


def test_plan_build_dla_and_old_versions():
    plan = trt_build.plan_build("10.3.0", trt_build.BuildOptions(precision="fp16", dla_core=0, max_batch=4))
    assert plan.builder_flags == ["GPU_FALLBACK", "FP16"] and plan.static_batch == 4
    assert trt_build.plan_build("10.3.0", trt_build.BuildOptions(precision="fp16")).static_batch is None
    with pytest.raises(UnavailableError, match="too old"):
        trt_build.plan_build("8.6.1", trt_build.BuildOptions())


@pytest.mark.parametrize("kw,match", [
    ({"precision": "int4"}, "precision"), ({"max_batch": 0}, "batch"), ({"opt_batch": 64, "max_batch": 32}, "batch"),
    ({"workspace_mb": 1}, "workspace"), ({"opt_level": 9}, "optimisation level"), ({"dla_core": -1}, "DLA"),
    ({"dla_core": 0}, "needs --precision fp16: DLA does not take explicit-quantization"),
    # DLA runs batches of at most 4096 (TensorRT's DLA restrictions); a DLA engine's one batch is its max
    ({"precision": "fp16", "dla_core": 0, "max_batch": 4097, "opt_batch": 1}, r"--max-batch <= 4096 .*got 4097"),
])
def test_build_options_validation(kw, match):
    with pytest.raises(InputError, match=match):
        trt_build.BuildOptions(**kw).validate()


class _FakeBundle:
    def __init__(self, engines, root="B"):
        self.manifest = {"engines": engines}
        self.root = root


ENTRY = {"backend": "tensorrt", "precision": "int8", "gpu_name": "Orin", "compute_capability": "8.7",
         "tensorrt_version": "10.3.0", "glance": "engines/x/glance.int8.engine", "focus": "engines/x/focus.int8.engine"}


def test_select_engine_matches_device():
    here = {"gpu_name": "Orin", "compute_capability": "8.7"}
    assert trt_engines.select_engine(_FakeBundle([ENTRY]), "auto", here, "10.3.0") is ENTRY


@pytest.mark.parametrize("here,ver,match", [
    ({"gpu_name": "H100", "compute_capability": "9.0"}, "10.3.0", "compute capability 8.7"),
    ({"gpu_name": "Orin", "compute_capability": "8.7"}, "10.7.0", "TensorRT 10.3.0 vs this TensorRT 10.7.0"),
])
def test_select_engine_refuses_other_device_with_rebuild_hint(here, ver, match):
    with pytest.raises(InputError, match=match) as e:
        trt_engines.select_engine(_FakeBundle([ENTRY]), "auto", here, ver)
    assert "gfnet-edge build-engine B --backend tensorrt" in str(e.value)


def test_select_engine_none_or_wrong_precision():
    with pytest.raises(InputError, match="no TensorRT engines"):
        trt_engines.select_engine(_FakeBundle([]), "auto", {"gpu_name": "x", "compute_capability": "8.7"}, "10.3.0")
    with pytest.raises(InputError, match="no fp16 TensorRT engine"):
        trt_engines.select_engine(_FakeBundle([ENTRY]), "fp16", {"gpu_name": "x", "compute_capability": "8.7"}, "10.3.0")


def test_engine_dir_name():
    assert trt_engines.engine_dir_name({"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}, "10.3.0") == \
        "nvidia-h100-80gb-hbm3-sm90-trt10.3.0"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_says_how_to_proceed():
    with pytest.raises(UnavailableError, match="JetPack") as e:
        trt_util.import_tensorrt()
    assert "--backend tensorrt" in str(e.value)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installed (it cannot be on CPU-only CI machines)")
def test_tensorrt_version_supported():  # pragma: no cover - runs only where TensorRT exists
    trt = trt_util.import_tensorrt()
    plan = trt_build.plan_build(trt.__version__, trt_build.BuildOptions())  # raises for TensorRT < 10
    assert plan.graph_set == "int8-tensorrt" and plan.strongly_typed and "INT8" not in plan.builder_flags


def test_select_engine_accepts_graph_set_name():
    here = {"gpu_name": "Orin", "compute_capability": "8.7"}
    assert trt_engines.select_engine(_FakeBundle([ENTRY]), "int8-tensorrt", here, "10.3.0") is ENTRY


@pytest.fixture(scope="module")
def fp32_bundle(demo_onnx_bundle_copy):
    """This module's copy of the session's fp32 demo bundle (its tests add engines to it)."""
    return demo_onnx_bundle_copy


class _FakeTRT:
    __version__ = "10.3.0"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0


def _fake_device(monkeypatch, cc="8.7"):
    from gfnet_edge.runtime import api

    monkeypatch.setattr(trt_util, "import_tensorrt", lambda: _FakeTRT)
    monkeypatch.setattr(trt_util, "gpu_info", lambda: {"gpu_name": "Orin", "compute_capability": cc})
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

    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    with pytest.raises(RuntimeError, match="focus engine failed"):
        build_engines(fp32_bundle.root, BuildConfig(precision="fp32", backend="tensorrt"))
    after = sorted(p.relative_to(fp32_bundle.root).as_posix() for p in fp32_bundle.root.rglob("*") if p.is_file())
    assert not [p for p in after if p.endswith(".tmp")], after
    assert Bundle.load(fp32_bundle.root).manifest["engines"] == []  # still loads and verifies
    assert set(after) <= set(before)


# ------------------------------------------------------------------ stand-in TensorRT
def _standin(monkeypatch, version="10.3.0", mem=None, **kw):
    """Installs the stand-in ``tensorrt`` (tests/trt_standin.py) and an Orin as this device."""
    from trt_standin import make_trt

    trt, state = make_trt(version, mem=mem, **kw)
    monkeypatch.setattr(trt_util, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_util, "gpu_info", lambda: dict(ORIN_AGX))
    return trt, state


ORIN_AGX = {"gpu_name": "Orin", "compute_capability": "8.7", "multiprocessors": 16,
            "device_model": "NVIDIA Jetson AGX Orin Developer Kit"}
ORIN_NANO = {"gpu_name": "Orin", "compute_capability": "8.7", "multiprocessors": 8,
             "device_model": "NVIDIA Jetson Orin Nano Developer Kit"}


def _engine_files(fp32_bundle, tmp_path, lo=1, hi=3, placement=None, dtypes=None):
    """Stand-in engines (the bundle's FP32 graphs behind the stand-in header, batches lo..hi;
    ``dtypes``: tensor name -> TensorRT DataType name where not FLOAT) in ``tmp_path``;
    ``(bundle-like, entry)``."""
    import json
    from types import SimpleNamespace

    from trt_standin import MAGIC

    entry = {"precision": "fp32", "build_options": {"max_batch": hi}, "static_batch": hi if lo == hi else None}
    for g, rel in fp32_bundle.manifest["graphs"]["fp32"].items():
        head = json.dumps({"min": lo, "max": hi, "layers": placement, "dtypes": dtypes or {}}).encode()
        (tmp_path / f"{g}.engine").write_bytes(MAGIC + len(head).to_bytes(4, "little") + head
                                               + fp32_bundle.path(rel).read_bytes())
        entry[g] = f"{g}.engine"
    return SimpleNamespace(root=tmp_path, path=lambda rel: tmp_path / rel, manifest={"engines": [entry]}), entry


def _engines_on_simulated_gpu(monkeypatch, version="10.3.0", **kw):
    """An asynchronous GPU simulated in host memory (tests/sim_device.py) and the stand-in
    ``tensorrt`` whose engines run there: ``(memory, stand-in state, sim log)``."""
    from sim_device import SimMemory, sim_ops

    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem, asynchronous=True)
    _, state = _standin(monkeypatch, version, mem=mem, **kw)
    return mem, state, sim


# -------------------------------------------------------------- stand-in fidelity
@pytest.mark.parametrize("version,typed_value,has_fp16", [("10.3.0", 1, True), ("11.1.0", 0, False)])
def test_standin_enums_are_tensorrts(version, typed_value, has_fp16):
    """Values from include/NvInfer.h and NvInferRuntime*.h of TensorRT 10.3 and 11.1."""
    from trt_standin import make_trt

    trt, _ = make_trt(version)
    assert int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == typed_value
    assert hasattr(trt.BuilderFlag, "FP16") is has_fp16 and int(trt.BuilderFlag.GPU_FALLBACK) == 3
    assert (int(trt.DataType.FLOAT), int(trt.DataType.HALF), int(trt.DataType.INT8)) == (0, 1, 2)
    assert (int(trt.TensorIOMode.INPUT), int(trt.TensorIOMode.OUTPUT)) == (1, 2)
    assert (int(trt.DeviceType.GPU), int(trt.DeviceType.DLA), int(trt.ProfilingVerbosity.DETAILED)) == (0, 1, 2)
    assert trt.float32 is trt.DataType.FLOAT and trt.float32 != "float32"


def test_simulated_device_runs_work_only_when_its_stream_is_synchronized(monkeypatch):
    """The simulated GPU is asynchronous: an enqueued copy lands only when its stream is
    synchronized, an event orders one stream after another, and a device -> host read
    synchronizes its stream first."""
    from gfnet_edge import ops
    from sim_device import SimMemory, sim_ops

    mem = SimMemory()
    sim = sim_ops(monkeypatch, mem, asynchronous=True)
    a, b = ops.Stream(), ops.Stream()
    assert a.handle != b.handle and 0 not in (a.handle, b.handle)
    src, dst, out = ops.DeviceBuffer(16), ops.DeviceBuffer(16), np.empty(4, np.float32)
    src.copy_from_host(np.arange(4, dtype=np.float32), a)
    ops.cuda_copy(dst, src, 16, b)  # no ordering between a and b yet
    sim.streams.synchronize(b)
    assert mem.view(dst.ptr, (4,), np.float32).tolist() == [0, 0, 0, 0]  # b ran before a's upload
    ev = sim.streams.record_event(a)
    sim.streams.wait_event(b, ev)
    ops.cuda_copy(dst, src, 16, b)
    assert sim.streams.pending(a) == 1 and sim.streams.pending(b) == 2
    dst.copy_to_host(out, b)  # synchronizes b, whose wait runs a up to the event
    assert out.tolist() == [0, 1, 2, 3] and sim.streams.pending() == 0


def test_engines_are_deserialised_without_host_code_and_truncated_ones_refused(tmp_path, monkeypatch):
    """The runner turns off engine host code before deserialising; an engine TensorRT cannot read
    (truncated, corrupt) is a clear InputError naming the file."""
    _, state = _standin(monkeypatch)
    engine = tmp_path / "glance.int8.engine"
    engine.write_bytes(b"\x00" * 10)
    bundle = SimpleNamespace(root=tmp_path, path=lambda rel: engine, manifest={})
    runner = trtb.TensorRTRunner(bundle, dict(ENTRY, glance="glance.int8.engine"))
    with pytest.raises(InputError, match="could not deserialize this engine"):
        runner.activate()
    assert state.host_code == [False]
    assert not runner.active


DLA0 = dict(ENTRY, glance="engines/dla0/glance.int8.engine", focus="engines/dla0/focus.int8.engine",
            build_options={"dla_core": 0, "gpu_fallback": True})


def test_select_engine_tells_gpu_and_dla_engines_apart():
    here = {"gpu_name": "Orin", "compute_capability": "8.7"}
    both = _FakeBundle([DLA0, ENTRY])  # the DLA engines first: order must not decide
    assert trt_engines.select_engine(both, "auto", here, "10.3.0") is ENTRY
    assert trt_engines.select_engine(both, "auto", here, "10.3.0", dla_core=0) is DLA0
    with pytest.raises(InputError, match=r"no TensorRT engine for the DLA core 1 .*GPU, DLA core 0") as e:
        trt_engines.select_engine(both, "auto", here, "10.3.0", dla_core=1)
    assert "build-engine B --backend tensorrt --dla-core 1" in str(e.value)
    with pytest.raises(InputError, match=r"no TensorRT engine for the GPU .*: DLA core 0; select one with"):
        trt_engines.select_engine(_FakeBundle([DLA0]), "auto", here, "10.3.0")


def test_engines_are_matched_to_the_device_model_not_only_the_sm_arch():
    """An AGX Orin engine is refused on an Orin Nano (both "Orin", sm_87), and a Nano build
    gets its own slot instead of replacing the AGX entry."""
    agx = dict(ENTRY, **ORIN_AGX)
    nano = dict(ENTRY, **ORIN_NANO, glance="n/glance.engine", focus="n/focus.engine")
    with pytest.raises(InputError, match=r"Jetson AGX Orin Developer Kit, 16 SMs\) vs this Orin \(8.7; NVIDIA Jetson "
                                         r"Orin Nano Developer Kit, 8 SMs\)") as e:
        trt_engines.select_engine(_FakeBundle([agx]), "auto", dict(ORIN_NANO), "10.3.0")
    assert "build-engine B --backend tensorrt --precision int8" in str(e.value)
    assert trt_engines.select_engine(_FakeBundle([agx, nano]), "auto", dict(ORIN_NANO), "10.3.0") is nano
    assert trt_engines.select_engine(_FakeBundle([nano, agx]), "auto", dict(ORIN_AGX), "10.3.0") is agx
    assert not trt_engines.same_engine_slot(agx, nano) and trt_engines.same_engine_slot(agx, dict(agx, glance="x"))
    assert trt_engines.engine_dir_name(ORIN_NANO, "10.3.0") == "nvidia-jetson-orin-nano-developer-kit-sm87-trt10.3.0"


def test_runner_deserialises_dla_engines_on_their_core(tmp_path, monkeypatch):
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"\x00" * 4)
    bundle = SimpleNamespace(root=tmp_path, path=lambda rel: engine, manifest={})
    _, state = _standin(monkeypatch, dla_cores=2)
    with pytest.raises(InputError, match="could not deserialize"):
        trtb.TensorRTRunner(bundle, dict(DLA0, build_options={"dla_core": 1})).activate()
    assert state.dla_core_at_load == [1]  # the runtime named the engine's core before deserialising
    _, state = _standin(monkeypatch, dla_cores=0)
    with pytest.raises(UnavailableError, match="built for DLA core 0, but this device has 0 DLA core"):
        trtb.TensorRTRunner(bundle, DLA0).activate()
    assert state.dla_core_at_load == []


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


@pytest.mark.parametrize("extra, flag", [
    (["-o", "NEW"], "-o"), (["--include-checkpoint"], "--include-checkpoint"), (["--model-name", "resnet50"], "--model-name"),
    (["--patch-size", "64"], "--patch-size"), (["--force"], "--force"),
])
def test_build_options_for_a_new_bundle_are_refused_for_an_existing_one(fp32_bundle, tmp_path, monkeypatch, capsys,
                                                                      extra, flag):
    """Phase 2 adds engines to the bundle it is given, in place: options that only a build from a
    checkpoint uses (``-o`` above all, which would leave the engines somewhere the user does not
    look) are refused on a device with TensorRT, and neither bundle is touched."""
    from gfnet_edge import cli

    root = tmp_path / "bundle"
    shutil.copytree(fp32_bundle.root, root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    _standin(monkeypatch)
    argv = [str(tmp_path / "new") if a == "NEW" else a for a in extra]
    rc = cli.main(["build-engine", str(root), "--backend", "tensorrt", "--precision", "fp32", "--max-batch", "2", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"gfnet-edge: error: {flag} applies when building from a checkpoint"), err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists()


def test_a_failed_engine_build_leaves_no_empty_engine_folder(fp32_bundle, tmp_path, monkeypatch, capsys):
    """A phase-2 build that TensorRT fails leaves the bundle's tree as it was: no engine file and
    no empty ``engines/<device>/`` folder."""
    from gfnet_edge import cli
    from gfnet_edge.bundle import Bundle

    root = tmp_path / "bundle"
    shutil.copytree(fp32_bundle.root, root)

    def no_engines(m):  # the module's bundle may hold engines earlier tests added
        m["engines"] = []
        m["artifacts"] = {k: v for k, v in m["artifacts"].items() if not k.startswith("engines/")}

    Bundle.load(root, verify=False).update_manifest(no_engines)
    shutil.rmtree(root / "engines", ignore_errors=True)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    _standin(monkeypatch, faults={"build"})
    assert cli.main(["build-engine", str(root), "--backend", "tensorrt", "--precision", "fp32"]) == 2
    assert "could not build an engine" in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_engine_build_reports_its_engines_beside_an_entry_that_records_no_gpu(fp32_bundle, tmp_path, monkeypatch,
                                                                             capsys):
    """An engine entry needs only its precision and files (the manifest schema): a phase-2 build
    on a bundle holding such an entry adds its engines, prints its summary and exits 0. Names
    the earlier manifest holds print with their control characters escaped (one line each)."""
    from gfnet_edge import cli
    from gfnet_edge.bundle import Bundle

    root = tmp_path / "bundle"
    shutil.copytree(fp32_bundle.root, root)
    Bundle.load(root, verify=False).update_manifest(lambda m: m.update(engines=[
        {"precision": "fp16", **m["graphs"]["fp32"]}], budgets={"\x1b[2Jfast\nslow": {"thresholds": [0.5] * (
            m["model"]["steps"] - 1) + [-1e8]}}, default_budget=None))
    _standin(monkeypatch)
    rc = cli.main(["build-engine", str(root), "--backend", "tensorrt", "--precision", "fp32"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert "  engines: fp16@?, fp32@Orin" in out.splitlines()
    assert "\x1b" not in out and "  budgets: \\x1b[2Jfast\\nslow (default: none)" in out.splitlines()
    assert [e["precision"] for e in Bundle.load(root).manifest["engines"]] == ["fp16", "fp32"]


def test_a_new_build_replaces_only_its_own_slot():
    assert trt_engines.same_engine_slot(ENTRY, dict(ENTRY, glance="other.engine"))
    assert trt_engines.same_engine_slot(DLA0, dict(DLA0, build_options={"dla_core": 0, "gpu_fallback": False}))
    assert not trt_engines.same_engine_slot(ENTRY, DLA0)  # GPU and DLA engines live side by side
    assert not trt_engines.same_engine_slot(ENTRY, dict(ENTRY, precision="fp16"))
    assert not trt_engines.same_engine_slot(ENTRY, dict(ENTRY, tensorrt_version="10.7.0"))
    assert not trt_engines.same_engine_slot(ENTRY, dict(ENTRY, compute_capability="9.0"))


# ------------------------------------------------------------------------ build
def _onnx(tmp_path, name="glance.onnx"):
    path = tmp_path / name
    path.write_bytes(b"onnx")  # the stand-in parser does not need a real graph here
    return path


@pytest.mark.parametrize("version,typed_flag,precision,flags,network_flags", [
    ("10.3.0", True, "int8", [], 1 << 1),  # Q/DQ network, strongly typed (flag value 1 on 10.x)
    ("10.3.0", True, "fp16", ["FP16"], 0),  # 10.0-10.11: weakly typed FP16
    ("10.3.0", True, "fp32", [], 0),
    ("10.3.0", False, "int8", [], 0),  # no STRONGLY_TYPED flag: not passed
    ("11.1.0", True, "int8", [], 1 << 0),  # 11.x: kept (value 0, ignored), passed when it exists
    ("11.1.0", True, "fp32", [], 1 << 0),
])
def test_build_engine_asks_tensorrt_for_the_planned_network(tmp_path, monkeypatch, version, typed_flag, precision,
                                                             flags, network_flags):
    _, state = _standin(monkeypatch, version, typed_flag=typed_flag)
    onnx, out = _onnx(tmp_path), tmp_path / "engines" / "glance.engine"
    opts = trt_build.BuildOptions(precision=precision, workspace_mb=512, max_batch=16, opt_batch=4)
    entry = trt_build.build_engine(onnx, out, opts)
    assert state.network_flags == network_flags
    assert state.parsed == str(onnx) and state.set_flags == flags
    assert state.pool == ("WORKSPACE", 512 << 20)
    assert state.profile == ("image", (1, 3, 96, 96), (4, 3, 96, 96), (16, 3, 96, 96))
    assert state.config["profiling_verbosity"] == 2  # DETAILED: the engine inspector sees layer details
    assert "builder_optimization_level" not in state.config and "DLA_core" not in state.config
    assert out.read_bytes().endswith(b"onnx") and len(state.loggers) == 1
    assert entry["tensorrt_version"] == version and entry["compute_capability"] == "8.7"
    assert entry["device_model"] == ORIN_AGX["device_model"] and entry["static_batch"] is None
    assert entry["precision"] == precision and entry["strongly_typed"] is (network_flags != 0 or
                                                                          (precision == "int8" and typed_flag))
    assert entry["graph_set"] == ("int8-tensorrt" if precision == "int8" else "fp32")
    assert entry["build_options"]["max_batch"] == 16


@pytest.mark.parametrize("version,precision,dla_core,match", [
    ("10.3.0", "int8", 0, "DLA does not take explicit-quantization .Q/DQ. INT8"),
    ("10.3.0", "fp32", 0, "DLA runs FP16 or INT8, never FP32"),
])
def test_dla_builds_refuse_what_dla_cannot_run(tmp_path, monkeypatch, version, precision, dla_core, match):
    _, state = _standin(monkeypatch, version, dla_cores=2)
    with pytest.raises(InputError, match=match):
        trt_build.build_engine(_onnx(tmp_path), tmp_path / "e.engine", trt_build.BuildOptions(precision=precision,
                                                                                    dla_core=dla_core))
    assert state.engines_built == 0 and not (tmp_path / "e.engine").exists()


def test_dla_engines_are_built_static_and_their_layer_placement_recorded(tmp_path, monkeypatch):
    """DLA needs min = opt = max: the profile is static at max_batch; the builder's layer
    report is recorded; a build in which every layer falls back to the GPU is refused."""
    _, state = _standin(monkeypatch, "10.3.0", dla_cores=2)
    out = tmp_path / "glance.engine"
    entry = trt_build.build_engine(_onnx(tmp_path), out, trt_build.BuildOptions(precision="fp16", dla_core=1, max_batch=8,
                                                                      opt_batch=2))
    assert state.profile == ("image", (8, 3, 96, 96), (8, 3, 96, 96), (8, 3, 96, 96))
    assert state.config["DLA_core"] == 1 and state.config["default_device_type"] == 1
    assert state.set_flags == ["GPU_FALLBACK", "FP16"] and entry["static_batch"] == 8
    assert entry["dla_layers"] == 1 and entry["gpu_layers"] == 1  # the stand-in puts all but the last layer on DLA
    assert entry["device_map"] == {"dla": ["{ForeignNode[layer0]}"], "gpu": ["layer1"]}
    with pytest.raises(UnavailableError, match="DLA core 2 asked for, but this device has 2"):
        trt_build.build_engine(_onnx(tmp_path), out, trt_build.BuildOptions(precision="fp16", dla_core=2))


@pytest.mark.parametrize("log,want", [
    ([  # TensorRT 8.4-10.x
        "[I] [TRT] ---------- Layers Running on DLA ----------",
        "[I] [TRT] [DlaLayer] {ForeignNode[/conv1/Conv.../layer4/Relu]}",
        "[I] [TRT] ---------- Layers Running on GPU ----------",
        "[I] [TRT] [GpuLayer] SHUFFLE: /Reshape_2",
        "[I] [TRT] [GpuLayer] CONVOLUTION: /fc/Gemm + /Add",
    ], {"dla": ["{ForeignNode[/conv1/Conv.../layer4/Relu]}"], "gpu": ["/Reshape_2", "/fc/Gemm + /Add"]}),
    ([  # NVIDIA's cuDLA sample
        "--------------- Layers running on DLA:",
        "[DlaLayer] {ForeignNode[conv1...prob]},",
        "--------------- Layers running on GPU:",
    ], {"dla": ["{ForeignNode[conv1...prob]}"], "gpu": []}),
    (["--------------- Layers running on DLA:", "--------------- Layers running on GPU:"], {"dla": [], "gpu": []}),
    (["[I] [TRT] Total Activation Memory: 1024"], None),
])
def test_dla_layer_report_is_read_in_each_form_tensorrt_prints(log, want):
    """The builder's layer report gives the layer names the engine inspector uses: without the
    layer type TensorRT prints before a GPU layer, without the cuDLA sample's trailing commas;
    a report with no layers is a report (every layer fell back), a log without one is None."""
    assert trt_build.parse_device_report(log) == want


def test_dla_engines_run_as_plain_launches_and_say_why(fp32_bundle, tmp_path, monkeypatch, caplog):
    """TensorRT does not capture DLA work in CUDA graphs (trtexec turns graphs off for a DLA
    core): a DLA runner offers no capture, the device loop over it runs plain launches on one
    context per engine with the reason logged and reported, and a GPU runner still captures."""
    import logging

    from gfnet_edge import ops
    from gfnet_edge.runtime.backends.classifier import gfnet_technology
    from gfnet_edge.runtime.device_place import DevicePlace

    _engines_on_simulated_gpu(monkeypatch, dla_cores=1)
    stream = ops.Stream()
    (tmp_path / "gpu").mkdir()
    (tmp_path / "dla").mkdir()
    gpu = trtb.TensorRTRunner(*_engine_files(fp32_bundle, tmp_path / "gpu")).activate()
    assert gpu.capture_refusal is None and gpu.graph_capture(stream) is not None
    bundle, entry = _engine_files(fp32_bundle, tmp_path / "dla", lo=3, hi=3)
    dla = trtb.TensorRTRunner(bundle, dict(entry, build_options={"dla_core": 0, "gpu_fallback": True})).activate()
    assert dla.graph_capture(stream) is None
    assert dla.capture_refusal == "DLA engines are not captured: CUDA graphs and DLA offloading are not supported together"
    ctx = SimpleNamespace(runner=dla)  # what DevicePlace reads of the loop's context when it opens
    with caplog.at_level(logging.INFO, logger="gfnet_edge"):
        place = DevicePlace(ctx, stream, cuda_graphs=True)
    assert place.graphs is None and place.not_captured == dla.capture_refusal
    assert "the device loop runs as plain launches: DLA engines are not captured" in caplog.text
    rt = SimpleNamespace(backend="tensorrt", precision="fp16-tensorrt",
                         driver=SimpleNamespace(on_device=True, place=place))
    assert gfnet_technology(rt).describe() == ("tensorrt cuda fp16, plain launches (DLA engines are not captured: "
                                               "CUDA graphs and DLA offloading are not supported together)")
    assert DevicePlace(ctx, stream, cuda_graphs=False).not_captured == "graphs switched off"
    gpu.deactivate()
    dla.deactivate()


def test_dla_build_with_everything_on_the_gpu_is_refused(tmp_path, monkeypatch):
    """With a dynamic profile DLA takes no layer and GPU fallback moves all of them to the GPU
    (what TensorRT does); such an engine is refused, nothing written."""
    from gfnet_edge.runtime.backends import tensorrt_build

    _standin(monkeypatch, "10.3.0", dla_cores=1)
    real = tensorrt_build.plan_build
    monkeypatch.setattr(tensorrt_build, "plan_build", lambda *a, **k: trt_build.BuildPlan(
        **{**real(*a, **k).__dict__, "static_batch": None}))  # as if the profile were dynamic
    out = tmp_path / "e.engine"
    with pytest.raises(InputError, match="no layer runs on DLA core 0: every layer fell back to the GPU"):
        trt_build.build_engine(_onnx(tmp_path), out, trt_build.BuildOptions(precision="fp16", dla_core=0))
    assert not out.exists()


@pytest.mark.parametrize("version,ok", [("10.3.0", True), ("10.7.0", True), ("10.8.0", False), ("11.1.0", False),
                                        ("11.4.0", False), ("11.4.1", True)])
def test_dla_by_tensorrt_version(version, ok):
    opts = trt_build.BuildOptions(precision="fp16", dla_core=0)
    if ok:
        plan = trt_build.plan_build(version, opts)
        assert plan.static_batch == 32 and "GPU_FALLBACK" in plan.builder_flags
    else:
        with pytest.raises(UnavailableError, match=f"TensorRT {version} builds no DLA engines"):
            trt_build.plan_build(version, opts)


def test_build_engine_level_and_timing_cache_merge(tmp_path, monkeypatch):
    """The timing cache is read, given to the builder and merged back (entries of both builds
    kept); a cache from another device is rejected before building, and the file kept."""
    import json

    _, state = _standin(monkeypatch)
    onnx, out, cache = _onnx(tmp_path), tmp_path / "focus.engine", tmp_path / "timing.cache"
    trt_build.build_engine(onnx, out, trt_build.BuildOptions(precision="int8", opt_level=5, timing_cache=str(cache)))
    assert state.config["builder_optimization_level"] == 5
    first = json.loads(cache.read_bytes())["entries"]
    assert len(first) == 1
    _, state = _standin(monkeypatch)
    trt_build.build_engine(_onnx(tmp_path, "other.onnx"), out, trt_build.BuildOptions(timing_cache=str(cache)))
    merged = json.loads(cache.read_bytes())["entries"]
    assert set(first) < set(merged) and len(merged) == 2
    foreign = tmp_path / "h200.cache"
    foreign.write_bytes(json.dumps({"device": "H200/9.0", "version": "10.3.0", "entries": {"t": 1}}).encode())
    before = foreign.read_bytes()
    with pytest.raises(InputError, match="rejected this timing cache .written on another device model"):
        trt_build.build_engine(onnx, tmp_path / "x.engine", trt_build.BuildOptions(timing_cache=str(foreign)))
    assert foreign.read_bytes() == before and not (tmp_path / "x.engine").exists()


def test_a_timing_cache_tensorrt_cannot_serialize_leaves_the_file_and_the_engine_stands(tmp_path, monkeypatch, caplog):
    """ITimingCache.serialize returns None on failure (as trtexec checks): the engine is built and
    kept, the cache file keeps what it held, and a warning says it was not updated."""
    import logging

    _standin(monkeypatch)
    onnx, out, cache = _onnx(tmp_path), tmp_path / "focus.engine", tmp_path / "timing.cache"
    trt_build.build_engine(onnx, out, trt_build.BuildOptions(precision="fp32", timing_cache=str(cache)))
    before = cache.read_bytes()
    out.unlink()
    _standin(monkeypatch, faults={"cache_serialize"})
    with caplog.at_level(logging.WARNING, logger="gfnet_edge"):
        trt_build.build_engine(_onnx(tmp_path, "other.onnx"), out,
                               trt_build.BuildOptions(precision="fp32", timing_cache=str(cache)))
    assert out.is_file() and cache.read_bytes() == before
    assert f"{cache}: TensorRT could not serialize the timing cache; not updated" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("fault,match", [
    ("parse", r"ONNX parser failed: node 0: unsupported operator; node 1: unsupported operator"),
    ("build", "could not build an engine"),
    ("profile", "refused the optimisation profile"),
])
def test_build_engine_failures_are_clear_and_write_nothing(tmp_path, monkeypatch, fault, match):
    _standin(monkeypatch, faults={fault})
    out = tmp_path / "glance.engine"
    with pytest.raises(InputError, match=match):
        trt_build.build_engine(_onnx(tmp_path), out, trt_build.BuildOptions(precision="fp32"))
    assert not out.exists()


def test_build_engine_fp16_on_tensorrt_11_needs_modelopt(tmp_path, monkeypatch):
    if importlib.util.find_spec("modelopt") is not None:
        pytest.skip("ModelOpt is installed here")
    _standin(monkeypatch, "11.1.0")
    with pytest.raises(UnavailableError, match="ModelOpt"):
        trt_build.build_engine(_onnx(tmp_path), tmp_path / "glance.engine", trt_build.BuildOptions(precision="fp16"))


# ----------------------------------------------------------------------- runner
def test_runner_refuses_a_missing_execution_context_with_advice(fp32_bundle, tmp_path, monkeypatch):
    """create_execution_context returns None when GPU memory runs out (an 8 GB Orin): a clear
    error that says what to do, not an AttributeError later."""
    _engines_on_simulated_gpu(monkeypatch, faults={"context"})
    bundle, entry = _engine_files(fp32_bundle, tmp_path)
    P = fp32_bundle.model.patch_size
    with trtb.TensorRTRunner(bundle, entry) as runner:
        with pytest.raises(UnavailableError, match="could not create an execution context.*smaller --max-batch"):
            runner.run("glance", np.zeros((1, 3, P, P), np.float32))


def test_runner_refuses_an_engine_whose_input_or_output_is_not_float32(fp32_bundle, tmp_path, monkeypatch):
    """An engine built elsewhere with float16 I/O: refused when the runner opens it, in one line
    naming the engine and tensor, before any buffer is sized for float32."""
    _engines_on_simulated_gpu(monkeypatch)
    outputs = None
    for tensor in ("image", "output"):
        bundle, entry = _engine_files(fp32_bundle, tmp_path)
        if outputs is None:
            with trtb.TensorRTRunner(bundle, entry) as runner:
                outputs = runner._output_names(runner._engines["glance"])
        name = "image" if tensor == "image" else outputs[0]
        bundle, entry = _engine_files(fp32_bundle, tmp_path, dtypes={name: "HALF"})
        with pytest.raises(InputError, match=f"glance engine's tensor '{name}' is DataType.HALF; gfnet-edge feeds and "
                                             "reads float32"):
            with trtb.TensorRTRunner(bundle, entry):
                pass


def test_runner_streams_contexts_and_buffers(fp32_bundle, tmp_path, monkeypatch):
    """run_device: explicit streams only; each stream has its own contexts and buffers
    (allocated once, addresses stable across calls and batches), so run() and run_device()
    never share a context with work in flight; deactivation waits for every stream before
    freeing; misaligned inputs are staged; outputs equal ONNX Runtime's."""
    from gfnet_edge import ops
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    mem, state, sim = _engines_on_simulated_gpu(monkeypatch)
    bundle, entry = _engine_files(fp32_bundle, tmp_path, hi=4)
    graphs = {g: fp32_bundle.path(p) for g, p in fp32_bundle.manifest["graphs"]["fp32"].items()}
    ref = OnnxRuntimeRunner(graphs, "fp32", threads=1).activate()
    P = fp32_bundle.model.patch_size
    x = np.random.default_rng(3).standard_normal((4, 3, P, P)).astype(np.float32)
    dev = ops.DeviceBuffer(x.nbytes + 256)
    runner = trtb.TensorRTRunner(bundle, entry).activate()
    for legacy in (None, 0, 1):  # 1: cudaStreamLegacy's handle
        with pytest.raises(ValueError, match="explicit CUDA stream, not the legacy default stream"):
            runner.run_device("glance", dev.ptr, 1, legacy)
    stream = ops.Stream()
    dev.copy_from_host(x, stream)
    first = runner.run_device("glance", dev.ptr, 4, stream)
    host = runner.run("glance", x[:2])  # the runner's own stream, while the device call is in flight
    assert not state.violations, state.violations
    again = runner.run_device("glance", dev.ptr, 2, stream)
    assert {k: v[0] for k, v in first.items()} == {k: v[0] for k, v in again.items()}  # stable addresses
    want = ref.run("glance", x)
    for k in want:
        np.testing.assert_allclose(host[k], want[k][:2], atol=1e-5)
    stream.synchronize()
    for k, (ptr, shape) in again.items():
        assert shape == (2,) + want[k].shape[1:]
        np.testing.assert_allclose(mem.view(ptr, shape, np.float32), want[k][:2], atol=1e-5)
    # a misaligned view (the second image of the batch) is staged into an aligned buffer
    odd = runner.run_device("focus", dev.ptr + x[0].nbytes, 3, stream)
    stream.synchronize()
    want = ref.run("focus", x[1:])
    for k, (ptr, shape) in odd.items():
        np.testing.assert_allclose(mem.view(ptr, shape, np.float32), want[k], atol=1e-5)
    assert all(s != 0 for s, _ in state.enqueues)
    runner.run_device("focus", dev.ptr, 4, stream)  # left in flight ...
    runner.deactivate()  # ... and waited for before the buffers go
    assert sim.streams.pending() == 0
    ref.deactivate()


def test_static_batch_engines_pad_smaller_batches(fp32_bundle, tmp_path, monkeypatch):
    """An engine built for one batch (DLA) runs every call at that batch; fewer images are
    staged and only their rows are returned."""
    from gfnet_edge.runtime.backends.onnxruntime import OnnxRuntimeRunner

    _, state, _ = _engines_on_simulated_gpu(monkeypatch)
    bundle, entry = _engine_files(fp32_bundle, tmp_path, lo=4, hi=4)
    graphs = {g: fp32_bundle.path(p) for g, p in fp32_bundle.manifest["graphs"]["fp32"].items()}
    P = fp32_bundle.model.patch_size
    x = np.random.default_rng(5).standard_normal((6, 3, P, P)).astype(np.float32)
    with trtb.TensorRTRunner(bundle, entry) as runner, OnnxRuntimeRunner(graphs, "fp32", threads=1) as ref:
        assert runner.max_batch == 4
        got, want = runner.run("focus", x), ref.run("focus", x)  # 4 + 2 (padded to 4)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-5)
    assert set(state.batches) == {4}

def test_runner_feeds_and_reads_engines_through_device_buffers(fp32_bundle, tmp_path, monkeypatch):
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

    _, bufs, _ = _engines_on_simulated_gpu(monkeypatch)
    graphs = fp32_bundle.manifest["graphs"]["fp32"]
    bundle, entry = _engine_files(fp32_bundle, tmp_path, hi=2)
    model = fp32_bundle.model
    S, P = model.image_size, model.patch_size
    rng = np.random.default_rng(0)
    ref = OnnxRuntimeRunner({g: fp32_bundle.path(p) for g, p in graphs.items()}, "fp32", threads=1).activate()
    with trtb.TensorRTRunner(bundle, entry) as runner:
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
        got = driver.run(images, ops.glance(images, P, model.glance_interpolation), None)
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
    _, log = _standin(monkeypatch)
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
    assert log.pool == ("WORKSPACE", 256 << 20) and len(log.loggers) == 1  # one logger for both builds
    bundle = Bundle.load(root)  # hashes and versions verified
    entry = trt_engines.select_engine(bundle, "auto", here={"gpu_name": "Orin", "compute_capability": "8.7"},
                               trt_version="10.3.0")
    assert entry["glance"] == "engines/nvidia-jetson-agx-orin-developer-kit-sm87-trt10.3.0/glance.fp32.engine"
    assert entry["precision"] == "fp32" and entry["build_options"]["max_batch"] == 3
    assert {entry["glance"], entry["focus"]} <= set(bundle.manifest["artifacts"])
    _, bufs, _ = _engines_on_simulated_gpu(monkeypatch)
    model = bundle.model
    S, P = model.image_size, model.patch_size
    images = np.random.default_rng(1).standard_normal((5, 3, S, S)).astype(np.float32)
    with trtb.TensorRTRunner(bundle, entry) as runner:
        driver = Driver(model, runner, HeadSet(load_head_arrays(bundle.heads_path), model), Profiler())
        got = driver.run(images, ops.glance(images, P, model.glance_interpolation), None)
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
    mem, engines, sim = _engines_on_simulated_gpu(monkeypatch)

    def heads(arrays, model, device="cpu", weight_dtype="float32"):
        cpu = HeadSet(arrays, model, weight_dtype=weight_dtype)
        return SimHeads(cpu, mem) if device == "cuda" else cpu

    monkeypatch.setattr(api, "HeadSet", heads)
    return root, mem, engines, sim


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_runtime_runs_the_device_loop_over_tensorrt_engines_on_a_simulated_gpu(fp32_bundle, tmp_path, monkeypatch,
                                                                               cuda_graphs):
    """``Runtime(backend="tensorrt")`` end to end as on a Jetson, with the GPU simulated in host
    memory (tests/sim_device.py) and the stand-in engines built by phase 2: the loop's device
    place over ``TensorRTRunner.run_device`` (input shapes, tensor addresses, execute_async_v3
    on the loop's stream, outputs left in device buffers) and the heads' device steps. Trace
    and early-exit predictions, for float images and for frames of several sizes (pre-processed
    on the "device"), equal ONNX Runtime's on the host; 10 images run as chunks of the engines'
    max batch of 3, and the exits happen at every step, survivors moving rows. With CUDA graphs
    the steps are captured (enqueueV3 included) and replayed, each batch bucket on an execution
    context of its own."""
    from gfnet_edge.runtime import Runtime
    from probs import exits_mid_loop, gap_thresholds
    from sim_device import demo_test_images

    root, _, engines, _ = _simulated_jetson(fp32_bundle, tmp_path, monkeypatch)
    model = fp32_bundle.model
    T = model.steps
    images = demo_test_images(model, 10)
    rng = np.random.default_rng(4)
    frames = [rng.integers(0, 256, (150 + 17 * i, 260 - 9 * i, 3), dtype=np.uint8) for i in range(5)]
    with Runtime(root, backend="tensorrt", precision="fp32", cuda_graphs=cuda_graphs) as rt, \
            Runtime(root, backend="onnxruntime", precision="fp32", threads=1) as ref:
        assert rt.runner.name == "tensorrt" and rt.device_loop and rt.driver.on_device
        assert (rt.driver.place.graphs is not None) == cuda_graphs
        assert not ref.driver.on_device
        got, want = rt.trace(images), ref.trace(images)
        np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got.coords, want.coords)
        runs = [b for _, b in engines.enqueues]
        assert max(runs) == 3 and runs.count(1) >= 1 and not engines.violations  # chunks of 3, 3, 3, 1
        rt.thresholds = ref.thresholds = gap_thresholds(want.probs)
        for inputs in (images, frames):
            a, b = rt.predict(inputs), ref.predict(inputs)
            for f in ("classes", "exit_step", "coords"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
            np.testing.assert_allclose(a.confidence, b.confidence, rtol=0, atol=1e-5)
            if inputs is images:
                assert exits_mid_loop(a.exit_step, T), a.exit_step
        if cuda_graphs:
            cache = rt.driver.place.graphs.cache
            first = rt.predict(images)
            before = (cache.captures, len(engines.enqueues))
            again = rt.predict(images)  # every step of this call was captured by the one before
            for f in ("classes", "exit_step", "coords"):
                np.testing.assert_array_equal(getattr(again, f), getattr(first, f), err_msg=f)
            assert cache.active and cache.captures == before[0] and cache.replays > 0
            assert len(engines.enqueues) == before[1], "a replay must not enqueue through TensorRT again"
            lane, = rt.runner._lanes.values() if len(rt.runner._lanes) == 1 else \
                [v for k, v in rt.runner._lanes.items() if k == int(rt.driver.place.stream.handle)]
            assert lane.per_batch and {b for _, b in lane.batch_contexts} <= {1, 2, 3}
        assert not engines.violations, engines.violations


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
            # each frame's size read where it is: its boxes are mapped onto it
            expected = [host.shape[-3:-1]] * n if isinstance(host, np.ndarray) else sizes
            np.testing.assert_array_equal(a.frame_sizes, expected)
            assert [a[i]["frame_boxes"] for i in range(n)] == [b[i]["frame_boxes"] for i in range(n)]
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
