"""A stand-in for the ``tensorrt`` Python module (10.x or 11.x) for tests on machines without it.

It has the calls gfnet-edge makes, with TensorRT's behaviour where it matters:

* enum values from the headers (``include/NvInfer*.h`` of TensorRT 10.3 and 11.1): e.g.
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is 1 on 10.x and 0 (deprecated) on 11.x,
  and 11.x has no precision builder flags; dtypes are ``DataType`` members, not strings;
* one process logger expected: every ``Builder`` / ``Runtime`` logger is recorded;
* ``set_tensor_address`` refuses addresses not 256-byte aligned (returns False);
* a new execution context of an engine whose profile fixes the batch (min == max) reports that
  batch as its input shape, but ``execute_async_v3`` fails until ``set_input_shape`` was called;
* ``execute_async_v3`` only enqueues on the simulated device's stream
  (``tests/sim_device.py``); the engine runs when that stream is synchronized, reading its
  input then and writing its outputs then (a missing synchronization reads stale memory);
* a DLA engine runs on the DLA core the ``Runtime`` names before deserialising it, on core 0
  where none is named (``state.dla_core_run``);
* DLA placement as TensorRT reports it: one ``{ForeignNode[first...last]}`` per run of
  consecutive DLA layers (a DLA loadable), in the builder's layer report and the inspector;
* DLA rules: a DLA build with a dynamic batch profile or a batch above 4096, or of a Q/DQ
  INT8 or FP32 network, places no layer on the DLA (with GPU fallback: all on the GPU, as the
  builder's layer report says; without: the build fails);
* timing caches carry the device and version they were made on; a foreign one is rejected
  by ``set_timing_cache`` and ``combine``;
* injectable failures (``faults``): ``parse``, ``build``, ``profile`` (add_optimization_profile
  returns -1), ``context`` (create_execution_context returns None), ``enqueue``, ``skew``
  (engines compute outputs off by 0.5), ``cache_serialize`` (ITimingCache.serialize returns None).

"Engines" are the parsed ONNX graphs (run by ONNX Runtime on the simulated device memory)
behind a small header with the profile's batch range; bytes without the header do not
deserialize.
"""
from __future__ import annotations

import enum
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

MAGIC = b"SIMTRT01"
DEVICE = "Orin/8.7"


class _TrtEnum(enum.IntEnum):
    """An IntEnum printed as pybind11 prints TensorRT's enums (``DataType.HALF``)."""

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


def _enum(name, members):
    return _TrtEnum(name, members)


def make_trt(version="10.3.0", mem=None, faults=(), dla_cores=0, device=DEVICE, typed_flag=True):
    """A stand-in ``tensorrt`` module and its log (``state``).

    Args:
        version: TensorRT version it claims (10.x or 11.x enums and flags).
        mem: the simulated device memory (``sim_device.SimMemory``) engines run on.
        faults: names of failures to inject (see the module docstring).
        dla_cores: DLA cores the device has.
        device: the device tag written into timing caches made here.
        typed_flag: 10.x: whether ``STRONGLY_TYPED`` exists.
    """
    major = int(version.split(".")[0])
    faults = set(faults)
    state = SimpleNamespace(loggers=set(), set_flags=[], network_flags=None, parsed=None, profile=None, pool=None,
                            config={}, batches=[], enqueues=[], contexts=0, host_code=[], dla_core_at_load=[],
                            dla_core_run=[], violations=[], engines_built=0)

    Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})
    DataType = _enum("DataType", dict({"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6,
                                       "BF16": 7, "INT64": 8, "INT4": 9}, **({"FP4": 10, "E8M0": 11} if major >= 11 else {})))
    TensorIOMode = _enum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    AllocationStrategy = _enum("ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1,
                                                                     "USER_MANAGED": 2})
    DeviceType = _enum("DeviceType", {"GPU": 0, "DLA": 1})
    MemoryPoolType = _enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2,
                                              "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4, "TACTIC_SHARED_MEMORY": 5})
    ProfilingVerbosity = _enum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    LayerInformationFormat = _enum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
    if major >= 11:
        creation = {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}
        flags = {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
                 "SPARSE_WEIGHTS": 7, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
                 "ERROR_ON_TIMING_CACHE_MISS": 15, "STRIP_PLAN": 18, "WEIGHT_STREAMING": 20}
    else:
        creation = {"EXPLICIT_BATCH": 0, **({"STRONGLY_TYPED": 1} if typed_flag else {})}
        flags = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5,
                 "TF32": 6, "SPARSE_WEIGHTS": 7, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10,
                 "FP8": 15, "BF16": 17}
    Creation = _enum("NetworkDefinitionCreationFlag", creation)
    BuilderFlag = _enum("BuilderFlag", flags)

    class ILogger:
        def __init__(self):
            self._trt_init = True

        def log(self, severity, msg):
            raise NotImplementedError

    ILogger.Severity = Severity

    class Logger(ILogger):
        WARNING = Severity.WARNING

        def __init__(self, min_severity=Severity.WARNING):
            super().__init__()

        def log(self, severity, msg):
            pass

    def _use_logger(log):
        assert isinstance(log, ILogger) and getattr(log, "_trt_init", False), "logger must be an initialised ILogger"
        state.loggers.add(id(log))

    # ------------------------------------------------------------- timing cache
    class TimingCache:
        def __init__(self, dev, ver, entries):
            self.dev, self.ver, self.entries = dev, ver, dict(entries)

        def serialize(self):
            if "cache_serialize" in faults:
                return None  # ITimingCache::serialize returns nullptr on failure
            return json.dumps({"device": self.dev, "version": self.ver, "entries": self.entries}).encode()

        def combine(self, other, ignore_mismatch):
            if other.ver != self.ver or (other.dev != self.dev and not ignore_mismatch):
                return False
            for k, v in other.entries.items():
                self.entries.setdefault(k, v)
            return True

    # ------------------------------------------------------------------ builder
    class Input:
        def __init__(self, shape):
            self.name, self.shape = "image", shape

    class Network:
        def __init__(self, flags):
            self.flags, self.shape, self.onnx, self.qdq = flags, (-1, 3, 96, 96), None, False

        num_inputs = 1

        def get_input(self, i):
            assert i == 0
            return Input(self.shape)

    class Parser:
        def __init__(self, network, log):
            _use_logger(log)
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            state.parsed = path
            if "parse" in faults:
                self.num_errors = 2
                return False
            blob = Path(path).read_bytes()
            self.network.onnx = blob
            try:
                import onnx

                m = onnx.load_from_string(blob)
                dims = m.graph.input[0].type.tensor_type.shape.dim
                self.network.shape = tuple(d.dim_value if d.dim_value else -1 for d in dims)
                self.network.qdq = any(n.op_type == "QuantizeLinear" for n in m.graph.node)
                self.network.layers = [n.name or n.op_type for n in m.graph.node]
            except Exception:
                self.network.layers = ["layer0", "layer1"]
            return True

        def get_error(self, i):
            return f"node {i}: unsupported operator"

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            # TensorRT's Python binding returns None and raises RuntimeError on inconsistent shapes
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)) or min(lo) < 0:
                raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
            self.shapes = (name, tuple(lo), tuple(opt), tuple(hi))

    class Config:
        def __init__(self):
            object.__setattr__(self, "cache", None)
            object.__setattr__(self, "profiles", [])

        #: IBuilderConfig attributes of TensorRT 10 / 11 that gfnet-edge sets (a misspelt one,
        #: which real TensorRT refuses with AttributeError, fails here too)
        ATTRIBUTES = ("profiling_verbosity", "builder_optimization_level", "default_device_type", "DLA_core",
                      "engine_capability", "hardware_compatibility_level", "avg_timing_iterations")

        def __setattr__(self, name, value):
            if name not in self.ATTRIBUTES:
                raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute '{name}'")
            state.config[name] = value
            object.__setattr__(self, name, value)

        def set_memory_pool_limit(self, pool, size):
            assert isinstance(pool, MemoryPoolType)
            state.pool = (pool.name, size)

        def set_flag(self, flag):
            assert isinstance(flag, BuilderFlag), flag
            state.set_flags.append(flag.name)

        def create_timing_cache(self, blob):
            blob = bytes(blob)
            if not blob:
                return TimingCache(device, version, {})
            try:
                d = json.loads(blob)
            except ValueError:
                return None
            return TimingCache(d["device"], d["version"], d["entries"])

        def set_timing_cache(self, cache, ignore_mismatch):
            if (cache.dev, cache.ver) != (device, version) and not ignore_mismatch:
                return False
            object.__setattr__(self, "cache", cache)
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            if "profile" in faults:
                return -1
            self.profiles.append(profile)
            state.profile = profile.shapes
            return len(self.profiles) - 1

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, log):
            _use_logger(log)
            self.log = log

        def create_network(self, flags):
            state.network_flags = flags
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def _placement(self, network, config):
            """(DLA loadables, gpu layers) the way TensorRT's DLA rules place them. TensorRT
            compiles each run of consecutive DLA layers into one DLA loadable, which its layer
            report and the engine inspector name ``{ForeignNode[first...last]}``
            (``{ForeignNode[only]}`` for one layer)."""
            layers = list(getattr(network, "layers", ["layer0"]))
            if getattr(config, "default_device_type", DeviceType.GPU) != DeviceType.DLA:
                return None
            _, lo, _, hi = config.profiles[0].shapes
            fp16 = "FP16" in state.set_flags or (network.flags and not network.qdq and major >= 11)
            why = ("dynamic shapes" if lo != hi else "batch sizes above 4096" if hi[0] > 4096
                   else "explicit quantization" if network.qdq else None if fp16 else "FP32")
            if why is None:  # DLA takes all but the last layer here: one run, one loadable
                run = layers[:-1]
                return ["{ForeignNode[%s]}" % ("...".join((run[0], run[-1])) if len(run) > 1 else run[0])], layers[-1:]
            self.log.log(Severity.WARNING, f"DLA does not support {why}; layers default to GPU")
            return [], layers

        def build_serialized_network(self, network, config):
            if "build" in faults or network.onnx is None:
                return None
            placement = self._placement(network, config)
            if placement is not None:
                dla, gpu = placement
                if not dla and "GPU_FALLBACK" not in state.set_flags:
                    self.log.log(Severity.ERROR, "DLA cannot run this network and GPU fallback is off")
                    return None
                self.log.log(Severity.INFO, "---------- Layers Running on DLA ----------")
                for n in dla:
                    self.log.log(Severity.INFO, f"[DlaLayer] {n}")
                self.log.log(Severity.INFO, "---------- Layers Running on GPU ----------")
                for n in gpu:
                    self.log.log(Severity.INFO, f"[GpuLayer] CONVOLUTION: {n}")  # TensorRT 8.4+: type, name
            if config.cache is not None:
                config.cache.entries[f"tactic-{Path(state.parsed).name}"] = 1
            state.engines_built += 1
            _, lo, _, hi = config.profiles[0].shapes
            head = json.dumps({"min": lo[0], "max": hi[0], "layers": placement}).encode()
            return bytearray(MAGIC + len(head).to_bytes(4, "little") + head + network.onnx)

    # ------------------------------------------------------------------ runtime
    class Inspector:
        def __init__(self, engine):
            self.engine = engine

        def get_engine_information(self, fmt):
            assert isinstance(fmt, LayerInformationFormat)
            dla, gpu = self.engine.placement or ([], self.engine.names)
            # a DLA engine also lists the copies of its inputs and outputs to and from the DLA's
            # memory, as trtexec's per-layer profile of one shows (NVIDIA/TensorRT#3143)
            moves = [{"Name": f"{t} {how}", "LayerType": "Reformat"} for t in ("image", "logits")
                     for how in ("to nvm", "from nvm", "copy finish")] if dla else []
            layers = moves[:1] + [{"Name": n, "LayerType": "DLA"} for n in dla] + \
                moves[1:] + [{"Name": n, "LayerType": "Convolution"} for n in gpu]
            return json.dumps({"Layers": layers, "Bindings": self.engine.names})

    class Engine:
        def __init__(self, blob):
            import onnxruntime as ort

            n = int.from_bytes(blob[8:12], "little")
            head = json.loads(blob[12:12 + n])
            self.min, self.max, self.placement = head["min"], head["max"], head["layers"]
            self.dtypes = head.get("dtypes", {})  # tensor name -> DataType member name (default FLOAT)
            self.sess = ort.InferenceSession(bytes(blob[12 + n:]), providers=["CPUExecutionProvider"])
            self.names = ["image"] + [o.name for o in self.sess.get_outputs()]
            self.shapes = {"image": tuple(d if isinstance(d, int) else -1 for d in self.sess.get_inputs()[0].shape)}
            for o in self.sess.get_outputs():
                self.shapes[o.name] = tuple(d if isinstance(d, int) else -1 for d in o.shape)

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "image" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return getattr(DataType, self.dtypes.get(name, "FLOAT"))

        def get_tensor_shape(self, name):
            return self.shapes[name]

        #: activation memory a context needs (any profile shape): 1 KiB per image of the max batch
        device_memory_size_v2 = property(lambda self: 1024 * self.max)

        def create_execution_context(self, strategy=AllocationStrategy.STATIC):
            assert isinstance(strategy, AllocationStrategy)
            if "context" in faults:
                return None
            state.contexts += 1
            return Context(self, strategy == AllocationStrategy.USER_MANAGED)

        def create_engine_inspector(self):
            return Inspector(self)

    class Context:
        def __init__(self, engine, user_memory=False):
            self.engine, self.batch, self.addr, self.stream = engine, None, {}, None
            self.memory = None if user_memory else (0, engine.device_memory_size_v2)

        def set_device_memory(self, memory, size):
            if int(memory) % 256 or int(size) < self.engine.device_memory_size_v2:
                raise RuntimeError("device memory too small or misaligned")
            self.memory = (int(memory), int(size))
            self.dirty = True  # TensorRT: the first enqueue after creation / a shape change must not be captured

        def set_input_shape(self, name, shape):
            if name != "image" or tuple(shape[1:]) != self.engine.shapes["image"][1:]:
                return False  # TensorRT logs the error and refuses
            state.batches.append(int(shape[0]))
            if not self.engine.min <= shape[0] <= self.engine.max:  # outside the optimisation profile
                return False
            self.dirty = True  # conservative: any set_input_shape needs an uncaptured enqueue before capture
            self.batch = int(shape[0])
            return True

        def get_tensor_shape(self, name):
            if self.batch is None:
                # TensorRT reports a runtime dimension the profile fixes to one value (min == max)
                # before set_input_shape (IExecutionContext::getTensorShape); enqueueV3 still needs
                # the input shape set (IExecutionContext::inferShapes)
                fixed = self.engine.min if self.engine.min == self.engine.max else -1
                return (fixed,) + self.engine.shapes[name][1:]
            return (self.batch,) + self.engine.shapes[name][1:]

        def set_tensor_address(self, name, ptr):
            if name not in self.engine.names or int(ptr) % 256:
                return False  # TensorRT: "The pointer must have at least 256-byte alignment."
            self.addr[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            stream = int(stream)
            if ("enqueue" in faults or self.batch is None or set(self.addr) != set(self.engine.names)
                    or self.memory is None):
                return False
            if stream == 0:
                state.violations.append("execute_async_v3 on the legacy default stream")
            if self.stream not in (None, stream) and mem.streams.pending(self.stream):
                state.violations.append("one execution context used on two streams with work in flight")
            self.stream = stream
            if mem.capturing is not None and self.dirty:
                state.violations.append("captured the first enqueueV3 after a context's creation or shape change")
            if mem.capturing is None:
                self.dirty = False
            addr, batch, eng = dict(self.addr), self.batch, self.engine
            state.enqueues.append((stream, batch))

            def run():
                x = np.array(mem.view(addr["image"], (batch,) + eng.shapes["image"][1:], np.float32))
                for name, y in zip(eng.names[1:], eng.sess.run(None, {"image": x})):
                    mem.view(addr[name], y.shape, np.float32)[...] = y + (0.5 if "skew" in faults else 0.0)
            if mem.capturing is not None:  # inside a (simulated) CUDA graph capture: recorded
                mem.capturing.append(run)
            else:
                mem.streams.enqueue(stream, run)
            return True

    class Runtime:
        def __init__(self, log):
            _use_logger(log)
            self.engine_host_code_allowed = True
            self.num_DLA_cores = dla_cores
            self.DLA_core = -1

        def deserialize_cuda_engine(self, blob):
            state.host_code.append(self.engine_host_code_allowed)
            state.dla_core_at_load.append(self.DLA_core)
            blob = bytes(blob)
            if not blob.startswith(MAGIC):
                return None
            try:
                engine = Engine(blob)
            except Exception:
                return None
            if engine.placement and engine.placement[0]:
                # a DLA engine runs on the core the runtime names; unset (-1), on core 0, whichever
                # core it was built for (microsoft/onnxruntime#26680, jkjung-avt/tensorrt_demos#463)
                state.dla_core_run.append(self.DLA_core if self.DLA_core >= 0 else 0)
            return engine

    trt = SimpleNamespace(
        __version__=version, ILogger=ILogger, Logger=Logger, Builder=Builder, Runtime=Runtime, OnnxParser=Parser,
        DataType=DataType, TensorIOMode=TensorIOMode, ExecutionContextAllocationStrategy=AllocationStrategy, DeviceType=DeviceType, MemoryPoolType=MemoryPoolType,
        ProfilingVerbosity=ProfilingVerbosity, LayerInformationFormat=LayerInformationFormat,
        NetworkDefinitionCreationFlag=Creation, BuilderFlag=BuilderFlag, float32=DataType.FLOAT,
        float16=DataType.HALF, int8=DataType.INT8, int32=DataType.INT32,
        nptype=lambda dt: {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
                           DataType.INT32: np.int32}[dt],
    )
    return trt, state
