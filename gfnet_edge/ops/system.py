"""The CPU kernels' settings: threads, the SIMD code path, and the memory-bandwidth probe."""
from __future__ import annotations

from ..argtypes import MAX_THREADS
from ._args import to_int
from ._ext import _C


def get_num_threads() -> int:
    """Threads the CPU kernels use (default: the number of hardware threads)."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the number of threads of the CPU kernels (1 to ``MAX_THREADS``; one pool per process)."""
    _C.set_num_threads(to_int(n, "n", 1, MAX_THREADS))


def simd_level() -> str:
    """The CPU code path in use: ``"avx2"`` (x86), ``"neon"`` (aarch64) or ``"generic"``.

    NEON results are bit-identical to the portable path; AVX2 uses fused multiply-adds in the
    GRU / Linear products, so its results agree with the portable path to float32 rounding."""
    return _C.simd_level()


def set_simd_enabled(enabled: bool) -> None:
    """Turns the SIMD kernels off (the portable path) or back on, for tests and benchmarks
    that compare the two paths (see :func:`simd_level`)."""
    _C.set_simd_enabled(bool(enabled))


def read_pass_seconds(nbytes: int, reps: int = 10) -> float:
    """Best time of ``reps`` parallel read passes over ``nbytes`` bytes: the memory roofline
    the bandwidth-bound kernels are compared with."""
    return float(_C.read_pass_seconds(to_int(nbytes, "nbytes"), to_int(reps, "reps")))
