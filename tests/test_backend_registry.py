"""The backend registry: the runtime finds its runners there and the CLI's --backend lists it."""
from __future__ import annotations

import argparse

import pytest

from gfnet_edge.cli import build_parser
from gfnet_edge.errors import InputError
from gfnet_edge.runtime import backends
from gfnet_edge.runtime.backends.base import Runner


def _choices(command: str, option: str = "--backend") -> tuple:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices[command]._actions if option in a.option_strings)
    return tuple(action.choices)


def test_cli_backend_choices_are_the_registry():
    assert backends.names() == ("tensorrt", "onnxruntime", "torch")
    assert _choices("predict") == ("auto", "tensorrt", "onnxruntime", "torch")
    assert _choices("build-engine") == ("auto", "tensorrt", "onnxruntime")  # torch builds no bundle
    assert {b: backends.get(b).device for b in backends.names()} == {"tensorrt": "cuda", "onnxruntime": "cpu",
                                                                     "torch": None}


def test_unknown_backend_is_refused_with_the_choices(capsys):
    with pytest.raises(InputError, match=r"unknown backend 'nope' \(choose from tensorrt, onnxruntime, torch\)"):
        backends.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        backends.register(backends.get("torch"))
    from gfnet_edge.cli import main

    assert main(["predict", "B", "x.png", "--backend", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_each_backend_makes_its_runner(demo_onnx_bundle):
    """The registry's loaders: ONNX Runtime runs the bundle's graphs; TensorRT and torch say what
    the bundle lacks for them (no engines, no checkpoint inside)."""
    from gfnet_edge.runtime import Runtime

    request = backends.RunnerRequest(demo_onnx_bundle, "auto", threads=1)
    runner = backends.get("onnxruntime").make_runner(request)
    assert isinstance(runner, Runner) and runner.name == "onnxruntime" and runner.precision == "fp32"
    assert not runner.active
    with pytest.raises(InputError, match="no TensorRT engines in this bundle"):
        backends.get("tensorrt").make_runner(request)
    with pytest.raises(InputError, match="needs the checkpoint inside the bundle"):
        backends.get("torch").make_runner(request)
    with pytest.raises(InputError, match="runs the checkpoint in fp32 or fp16"):
        backends.get("torch").make_runner(backends.RunnerRequest(demo_onnx_bundle, "int8-cpu"))
    with Runtime(demo_onnx_bundle, backend="onnxruntime", threads=1) as rt:
        assert type(rt.runner) is type(runner) and rt.runner.precision == "fp32"
