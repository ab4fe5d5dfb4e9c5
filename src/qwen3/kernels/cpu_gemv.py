"""qwen3's GEMV for x86 CPUs (cpu_gemv.cpp), built on first use and cached; None where it cannot be.

`int8_gemv(x, q, s)` computes (x q^T) * s for int8 q (N, K) with per-row scales s (N,) and x of a few rows
(float32 or bfloat16), in float32, at close to the memory bandwidth: PyTorch's int8pack kernel keeps too
few memory requests in flight and reads the weights at about 10 GB/s of a ~25 GB/s machine; this one
prefetches (see benchmarks/NOTES.md, "CPU int8"). `float_gemv(x, w)` is the same loop over float32 weights
(x w^T): PyTorch's float32 GEMV reads ~15 GB/s on the 2-core development machine, this one ~40.

The C++ file is compiled with the system C++ compiler (`$CXX`, else `c++`, else `g++`) into a plain shared
library, no ninja and no Python or torch headers, in a few seconds, once per source, instruction set and
compiler: the library lands in torch's extensions directory (`$TORCH_EXTENSIONS_DIR`, else
`~/.cache/torch_extensions`) under a name holding a hash of all three, and later processes load it from
there. It is called through ctypes (which releases the GIL) with OpenMP threads; the OpenMP runtime is
torch's own (the process has already loaded a `libgomp.so.1`, so the library's reference resolves to it).

The instruction set comes from /proc/cpuinfo (AVX-512 F/BW/VL, else AVX2 with FMA), or from
`torch.backends.cpu.get_cpu_capability()` where that file does not exist. Without a compiler, on a CPU
without AVX2, or with `QWEN3_CPU_KERNEL=0` in the environment, `library()` returns None (a failed build says
why in one line on stderr) and Int8Linear and CpuGemvLinear (cpu_linear.py) keep PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
ISA_FLAGS = {
    "avx512": ["-DQWEN3_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"],
    "avx2": ["-DQWEN3_AVX2", "-mavx2", "-mfma"],
}
CPUINFO_FLAGS = {"avx512": {"avx512f", "avx512bw", "avx512vl", "fma"}, "avx2": {"avx2", "fma"}}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # as the C++ function numbers them
BUILD_NOTICE = "qwen3: building the CPU GEMV kernel (once, a few seconds)"

UNAVAILABLE = "CPU GEMV kernel: not available here (no compiler, no AVX2, or QWEN3_CPU_KERNEL=0)"

_libraries: dict[str, ctypes.CDLL | None] = {}  # isa -> the loaded library, or None if it could not be built


class KernelBuildError(RuntimeError):
    """The kernel could not be compiled or loaded (no compiler, a compiler error, an unloadable file)."""


@functools.cache  # read once: every call of the kernels asks (reading /proc/cpuinfo costs ~50 us)
def cpu_isa() -> str | None:
    """The best variant of the kernel this CPU runs: "avx512", "avx2" or None."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        capability = torch.backends.cpu.get_cpu_capability()
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability)
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return next((isa for isa, needed in CPUINFO_FLAGS.items() if needed <= flags), None)


def build_directory() -> Path:
    """Where built libraries are cached: torch's extensions directory."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_extensions"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(isa: str) -> Path:
    """Compile the kernel for `isa` unless a cached build exists; return the shared library's path."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++)")
    command = [cxx, "-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17", *ISA_FLAGS[isa]]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *command]).encode()).hexdigest()[:16]
    target = build_directory() / f"qwen3_cpu_gemv_{isa}_{key}.so"
    if target.exists():
        return target
    print(BUILD_NOTICE, file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=target.name, suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([*command, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise KernelBuildError(f"{Path(cxx).name} failed: {first[:300]}")
        os.replace(partial, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The kernel for `isa` (default: this CPU's best), built on first use; None where it cannot be."""
    isa = isa or cpu_isa()
    if isa is None or os.environ.get("QWEN3_CPU_KERNEL", "1") == "0":
        return None
    if isa not in _libraries:
        try:
            lib = ctypes.CDLL(str(build(isa)))
        except (KernelBuildError, OSError, subprocess.SubprocessError) as e:
            print(f"qwen3: CPU GEMV kernel unavailable ({e}); using PyTorch's kernels", file=sys.stderr)
            lib = None
        if lib is not None:
            lib.qwen3_int8_gemv.restype = ctypes.c_int
            lib.qwen3_int8_gemv.argtypes = [
                ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,  # x, dtype, M, K
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,  # q, s, dtype, N
                ctypes.c_void_p, ctypes.c_int,  # y, threads
            ]  # fmt: skip
            lib.qwen3_float_gemv.restype = ctypes.c_int
            lib.qwen3_float_gemv.argtypes = [
                ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,  # x, dtype, M, K
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,  # w, N, y, threads
            ]  # fmt: skip
        _libraries[isa] = lib
    return _libraries[isa]


def available() -> bool:
    """Whether the kernel runs here (builds it on the first call)."""
    return library() is not None


def int8_gemv(x: Tensor, q: Tensor, s: Tensor, isa: str | None = None) -> Tensor:
    """y (..., N) = (x (..., K) q^T) * s, in x's dtype, computed in float32.

    x float32 or bfloat16 on the CPU; q int8 (N, K) contiguous; s (N,) float32 or bfloat16. Made for a few
    rows of x (decode); any number works. Raises RuntimeError where the kernel is not available.
    """
    lib = _library_or_raise(isa)
    N, K = q.shape
    if q.dtype != torch.int8 or not q.is_contiguous() or q.device.type != "cpu":
        raise ValueError(f"q: expected a contiguous int8 CPU matrix, found {q.dtype} on {q.device}")
    _check_x(x, K)
    if s.dtype not in DTYPE_CODES or s.shape != (N,) or s.device.type != "cpu":
        raise ValueError(f"s: expected float32 or bfloat16 ({N},) on the CPU, found {s.dtype} {tuple(s.shape)}")
    s = s.contiguous()
    return _run(x, N, lambda x2d, y, threads: lib.qwen3_int8_gemv(
        x2d.data_ptr(), DTYPE_CODES[x.dtype], x2d.shape[0], K, q.data_ptr(), s.data_ptr(), DTYPE_CODES[s.dtype], N,
        y.data_ptr(), threads))  # fmt: skip


def float_gemv(x: Tensor, w: Tensor, isa: str | None = None) -> Tensor:
    """y (..., N) = x (..., K) w^T for float32 weights w (N, K), contiguous, on the CPU; x float32 or bfloat16,
    computed in float32, returned in x's dtype. Raises RuntimeError where the kernel is not available."""
    lib = _library_or_raise(isa)
    N, K = w.shape
    if w.dtype != torch.float32 or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(f"w: expected a contiguous float32 CPU matrix, found {w.dtype} on {w.device}")
    _check_x(x, K)
    return _run(x, N, lambda x2d, y, threads: lib.qwen3_float_gemv(
        x2d.data_ptr(), DTYPE_CODES[x.dtype], x2d.shape[0], K, w.data_ptr(), N, y.data_ptr(), threads))  # fmt: skip


def _library_or_raise(isa: str | None) -> ctypes.CDLL:
    lib = library(isa)
    if lib is None:
        raise RuntimeError(UNAVAILABLE)
    return lib


def _check_x(x: Tensor, K: int) -> None:
    if x.dtype not in DTYPE_CODES or x.device.type != "cpu" or x.shape[-1] != K:
        raise ValueError(f"x: expected float32 or bfloat16 (..., {K}) on the CPU, found {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")  # fmt: skip


def _run(x: Tensor, N: int, call: Callable[[Tensor, Tensor, int], int]) -> Tensor:
    """y (..., N) in x's dtype from `call(x2d, y, threads)`, one of the library's functions on x as (M, K)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    y = torch.empty(x2d.shape[0], N, dtype=x.dtype)
    if y.numel() and call(x2d, y, torch.get_num_threads()):
        raise MemoryError("CPU GEMV kernel: could not allocate its scratch buffer")
    return y.view(*x.shape[:-1], N)
