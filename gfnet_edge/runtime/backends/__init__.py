"""The runtime's backends, found by name in one registry.

Each :class:`Backend` names what it runs on and how to make its runner for a bundle
(:class:`RunnerRequest`); the runtime asks :func:`get` for a backend and the CLI's
``--backend`` options list :func:`choices`. A backend's module (ONNX Runtime, TensorRT, torch)
is imported only when one of its runners is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from ...errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Runner

#: ``--backend auto``: TensorRT when it, a GPU and engines for them are here, else ONNX Runtime.
AUTO = "auto"


@dataclass(frozen=True)
class RunnerRequest:
    """What a backend needs to make a runner for a bundle.

    Attributes:
        bundle: the loaded :class:`~gfnet_edge.bundle.Bundle`.
        precision: the graph set or engine precision (``auto``, ``fp32``, ``int8-cpu`` ...).
        threads: CPU threads (``None``: the library's default).
        device: ``cpu`` / ``cuda`` for backends that run on either (torch), else ``None``.
        dla_core: TensorRT: the engines built for this DLA core (``None``: the GPU's).
    """

    bundle: Any
    precision: str = AUTO
    threads: Optional[int] = None
    device: Optional[str] = None
    dla_core: Optional[int] = None


@dataclass(frozen=True)
class Backend:
    """One way to run a bundle's glance/focus graphs.

    Attributes:
        name: the name users pass (``Runtime(backend=...)``, ``--backend``).
        summary: one line for help texts.
        device: the device its graphs always run on (``cpu`` / ``cuda``), ``None``: either.
        builds: ``gfnet-edge build-engine --backend NAME`` builds what it runs.
        load: makes the (inactive) runner for a request; imports the backend's module.
    """

    name: str
    summary: str
    device: Optional[str]
    builds: bool
    load: Callable[[RunnerRequest], "Runner"]

    @property
    def places(self) -> Tuple[str, ...]:
        """The devices it runs on (``("cpu",)``, ``("cuda",)`` or both)."""
        return (self.device,) if self.device else ("cpu", "cuda")

    def make_runner(self, request: RunnerRequest) -> "Runner":
        """The backend's runner for ``request`` (not yet activated)."""
        return self.load(request)


def _load_onnxruntime(request: RunnerRequest) -> "Runner":
    from .onnxruntime import load_runner

    return load_runner(request)


def _load_tensorrt(request: RunnerRequest) -> "Runner":
    from .tensorrt import load_runner

    return load_runner(request)


def _load_torch(request: RunnerRequest) -> "Runner":
    from .torch import load_runner

    return load_runner(request)


_REGISTRY: Dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Adds ``backend`` to the registry (a name is registered once)."""
    if backend.name in _REGISTRY or backend.name == AUTO:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


register(Backend("tensorrt", "TensorRT engines built for this GPU or DLA core", "cuda", True, _load_tensorrt))
register(Backend("onnxruntime", "the bundle's ONNX graphs on ONNX Runtime (CPU)", "cpu", True, _load_onnxruntime))
register(Backend("torch", "the checkpoint in the bundle, on torch (CPU or CUDA)", None, False, _load_torch))


def get(name: str) -> Backend:
    """The registered backend ``name``.

    Raises:
        InputError: no such backend.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r} (choose from {', '.join(names())})") from None


def names() -> Tuple[str, ...]:
    """The registered backends, in registration order."""
    return tuple(_REGISTRY)


def choices(builds: bool = False) -> Tuple[str, ...]:
    """``--backend`` choices: ``auto`` and every backend (``builds``: those that build bundles)."""
    return (AUTO,) + tuple(b.name for b in _REGISTRY.values() if b.builds or not builds)
