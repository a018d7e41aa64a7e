"""Argument groups that several subcommands share, defined once.

* :func:`add_runtime_options` -- how a bundle runs (``--backend``, ``--precision``,
  ``--budget``, ``--threads``, ``--dla-core``, ``--head-dtype``); :func:`runtime_kwargs` turns
  them into :class:`~gfnet_edge.runtime.Runtime` arguments.
* :func:`add_trt_build_options` -- the TensorRT builder's options; :func:`trt_build_options`
  turns them into a checked :class:`~gfnet_edge.runtime.backends.tensorrt_build.BuildOptions`.

The ``--backend`` choices come from the backend registry (:mod:`gfnet_edge.runtime.backends`).
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Dict

from ..argtypes import NON_NEGATIVE, THREADS, int_range
from ..runtime import backends
from ..runtime.heads import HEAD_DTYPES

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime.backends.tensorrt_build import BuildOptions


def add_runtime_options(parser: argparse.ArgumentParser, verb: str = "run", budget: bool = True) -> None:
    """Adds the options that choose how a bundle runs, as the group "runtime".

    Args:
        verb: what the subcommand does with the engines (``run``, ``calibrate``), for the help.
        budget: add ``--budget`` (subcommands that fit budgets have their own options).
    """
    g = parser.add_argument_group("runtime")
    g.add_argument("--backend", choices=backends.choices(), default=backends.AUTO,
                   help="auto (default): TensorRT when it, a GPU and engines for them are here, else ONNX Runtime")
    g.add_argument("--precision", default="auto",
                   help="ONNX Runtime: the graph set (auto: int8-cpu if present, else fp32; fp32, int8-cpu, "
                        "int8-tensorrt); TensorRT: the engine precision (auto: int8 > fp16 > fp32, int8, fp16, "
                        "fp32); default auto")
    if budget:
        g.add_argument("--budget", help="named budget (default: the bundle's default)")
    g.add_argument("--threads", type=THREADS,
                   help="CPU threads of ONNX Runtime and the extension (default: ONNX Runtime's own choice, and "
                        "one extension thread per CPU core or $GFNET_EDGE_NUM_THREADS)")
    g.add_argument("--dla-core", type=NON_NEGATIVE,
                   help=f"TensorRT: {verb} the engines built for this DLA core (Jetson) instead of the GPU engines")
    g.add_argument("--head-dtype", choices=HEAD_DTYPES, default="float32",
                   help="weights of the GRU / Linear heads: float16 halves the bytes their memory-bound steps read "
                        "(about 1e-3 relative error; default float32, equal to the reference)")


def runtime_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The :class:`~gfnet_edge.runtime.Runtime` keyword arguments the runtime options give."""
    return {"backend": args.backend, "precision": args.precision, "budget": getattr(args, "budget", None),
            "threads": args.threads, "dla_core": args.dla_core, "head_dtype": args.head_dtype}


def add_trt_build_options(parser: argparse.ArgumentParser) -> None:
    """Adds the TensorRT builder's options, as the group "TensorRT" (``--precision`` is the
    subcommand's own: it also chooses the portable graphs)."""
    from ..runtime.backends.tensorrt_build import BuildOptions

    d = BuildOptions()
    g = parser.add_argument_group("TensorRT")
    g.add_argument("--workspace", type=int_range(16, 1 << 24), default=None,
                   help=f"workspace limit in MiB (default {d.workspace_mb})")
    g.add_argument("--opt-level", type=int, help="builder optimisation level 0-5 (TensorRT default 3)")
    g.add_argument("--timing-cache", help="timing cache file (read and updated)")
    g.add_argument("--dla-core", type=NON_NEGATIVE,
                   help="build for this DLA core (Jetson), with GPU fallback (default: for the GPU)")
    g.add_argument("--no-gpu-fallback", action="store_true", help="with --dla-core: fail on layers DLA cannot run")
    g.add_argument("--max-batch", type=int_range(1, 65536), default=None,
                   help=f"largest batch of the optimisation profile (default {d.max_batch})")
    g.add_argument("--opt-batch", type=int_range(1, 65536), default=None, help=f"batch the profile is tuned for (default {d.opt_batch})")


def trt_build_options(args: argparse.Namespace) -> "BuildOptions":
    """The checked TensorRT build options of ``args`` (raises ``InputError`` naming a bad one)."""
    from ..runtime.backends.tensorrt_build import BuildOptions

    given = {key: value for key, value in (("workspace_mb", args.workspace), ("max_batch", args.max_batch),
                                            ("opt_batch", args.opt_batch)) if value is not None}
    return BuildOptions(precision=args.precision, opt_level=args.opt_level, timing_cache=args.timing_cache,
                        dla_core=args.dla_core, gpu_fallback=not args.no_gpu_fallback, **given).validate()

