"""Run-time compilation and launch of a CUDA C++ kernel: NVRTC and the driver API through ctypes.

Why not ``torch.utils.cpp_extension``: it needs a host compiler, ninja and a CUDA toolkit on the user's
machine and takes a minute per build.  Why not ``torch.cuda._compile_kernel``: it is private, and it looks up
CUDA_HOME's headers, so it fails where only the pip CUDA libraries are installed.  NVRTC ships with every
CUDA build of torch (the ``nvidia-cuda-nvrtc`` wheel), and the kernels here include no headers, so this
module needs nothing but ``libnvrtc`` and the driver's ``libcuda``.  Compiling one kernel takes about a
second, so callers keep what :func:`compile_kernel` returns, and its cubin is kept on disk beside inductor's
caches for the next process.

Launches use ``cuLaunchKernelEx`` (cooperative and programmatic-dependent launches are its attributes) on the
torch stream current when the launch is bound (``CudaKernel.bind``; a bound launch keeps that stream, so callers
key what they bind by stream), so they are captured by CUDA graphs like any other kernel.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import tempfile
from typing import Optional, Sequence

import torch

__all__ = ["RtcError", "CudaKernel", "BoundLaunch", "compile_kernel", "cached_cubin", "rtc_available", "tensor_map"]

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CU_LAUNCH_ATTRIBUTE_COOPERATIVE = 2
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):
    """``CUlaunchAttribute``: an id, padding to 8 bytes, and a 64-byte value union (here an int)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """``CUlaunchConfig``."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("count", ctypes.c_uint)]


class RtcError(RuntimeError):
    """NVRTC or the CUDA driver refused: the message carries its log or error string."""


def _load(names: Sequence[str], patterns: Sequence[str]) -> ctypes.CDLL:
    for name in names:  # already loaded by torch, or on the loader's path
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    try:  # the nvidia-* wheels torch depends on
        import nvidia
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:
        for pattern in patterns:
            for path in sorted(glob.glob(os.path.join(root, pattern)), reverse=True):
                try:
                    return ctypes.CDLL(path)
                except OSError:
                    pass
    raise RtcError(f"cannot load any of {list(names)}")


@functools.lru_cache(maxsize=None)
def _nvrtc() -> ctypes.CDLL:
    major = (torch.version.cuda or "13").split(".")[0]
    lib = _load([f"libnvrtc.so.{major}", "libnvrtc.so"],
                [f"*/lib/libnvrtc.so.{major}*", "*/lib/libnvrtc.so*"])
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    lib = _load(["libcuda.so.1", "libcuda.so"], [])
    return lib


def rtc_available() -> bool:
    """NVRTC and the driver library load (says nothing about a GPU being present)."""
    try:
        _nvrtc()
        _driver()
        return True
    except RtcError:
        return False


def _check_nvrtc(lib, result: int, what: str) -> None:
    if result:
        raise RtcError(f"NVRTC {what}: {lib.nvrtcGetErrorString(result).decode()}")


def _check_cu(result: int, what: str) -> None:
    if result:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(text))
        raise RtcError(f"CUDA driver {what}: error {result} ({(text.value or b'?').decode()})")


def _nvrtc_cubin(source: str, name: str, arch: str, options: Sequence[str]) -> bytes:
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    _check_nvrtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None,
                                             None), "create")
    try:
        opts = [f"--gpu-architecture={arch}", "-std=c++17", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        result = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if result:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RtcError(f"NVRTC could not compile {name} for {arch}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class CudaKernel:
    """A compiled ``extern "C"`` kernel of one device, launched through :meth:`bind` with pointers (tensors,
    addresses), 32-bit ints and ``bytes`` (a by-value struct parameter such as a tensor map,
    :func:`tensor_map`).  ``cooperative``: launched as a cooperative kernel, whose contract is that every CTA of
    the grid is resident at once (the driver refuses a grid that cannot be), as a kernel that waits for all its
    CTAs needs.  A launch bound with ``pdl=True`` may start before the previous work in the stream has
    finished (programmatic dependent launch): the kernel must then run ``griddepcontrol.wait`` before it
    touches memory that work may write or read."""

    def __init__(self, cubin: bytes, name: str, device: torch.device, dynamic_smem: int, cooperative: bool = False):
        self.name, self.device, self.dynamic_smem, self.cooperative = name, device, dynamic_smem, cooperative
        drv = _driver()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # the runtime made the device's primary context current
            self._cubin = ctypes.create_string_buffer(cubin, len(cubin))  # kept alive with the module
            self._module = ctypes.c_void_p()
            _check_cu(drv.cuModuleLoadData(ctypes.byref(self._module), self._cubin), f"loading {name}")
            self._func = ctypes.c_void_p()
            _check_cu(drv.cuModuleGetFunction(ctypes.byref(self._func), self._module, name.encode()),
                      f"finding {name}")
            if dynamic_smem > 48 * 1024:
                _check_cu(drv.cuFuncSetAttribute(self._func, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                 dynamic_smem), f"raising {name}'s shared memory to {dynamic_smem}")

    def bind(self, grid: int, block: int, args: Sequence, *, pdl: bool = False) -> "BoundLaunch":
        """This kernel's launch with ``args`` marshalled once, on the device's current torch stream.  A ``None``
        in ``args`` is a pointer given per launch (:meth:`BoundLaunch.__call__`); every tensor's address (or
        ``ctypes.c_void_p``) is fixed in the launch, which keeps no reference to the tensor."""
        return BoundLaunch(self, grid, block, args, pdl, torch.cuda.current_stream(self.device).cuda_stream)


class BoundLaunch:
    """One launch of a :class:`CudaKernel` whose arguments, grid and stream are marshalled once, for a call
    repeated with new addresses in a few places: marshalling some twenty arguments through ctypes costs more
    host time than the launch itself."""

    __slots__ = ("kernel", "pdl", "_values", "_slots", "_params", "_attrs", "_config", "_config_ref", "_launch",
                 "_func")

    def __init__(self, kernel: CudaKernel, grid: int, block: int, args: Sequence, pdl: bool, stream: int):
        self.kernel, self.pdl = kernel, pdl
        values, slots = [], []
        for a in args:
            if a is None:
                v = ctypes.c_void_p(0)
                slots.append(v)
            elif isinstance(a, torch.Tensor):
                v = ctypes.c_void_p(a.data_ptr())
            elif isinstance(a, ctypes.c_void_p):  # an address given as such (holds no reference to its memory)
                v = ctypes.c_void_p(a.value)
            elif isinstance(a, int):
                v = ctypes.c_int32(a)
            elif isinstance(a, bytes):
                v = ctypes.create_string_buffer(a, len(a))
            else:
                raise TypeError(f"{kernel.name}: unsupported kernel argument {type(a).__name__}")
            values.append(v)
        self._values, self._slots = values, tuple(slots)  # the values own the memory the params point at
        self._params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        self._attrs = (_LaunchAttribute * 2)()
        count = 0
        for key, on in ((_CU_LAUNCH_ATTRIBUTE_COOPERATIVE, kernel.cooperative),
                        (_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, pdl)):
            if on:
                self._attrs[count].id, self._attrs[count].value = key, 1
                count += 1
        self._config = _LaunchConfig((grid, 1, 1), (block, 1, 1), kernel.dynamic_smem, ctypes.c_void_p(stream),
                                     self._attrs, count)
        self._config_ref = ctypes.byref(self._config)
        self._launch, self._func = _driver().cuLaunchKernelEx, kernel._func

    def __call__(self, *pointers: int) -> None:
        """Launch with ``pointers`` (device addresses, ints) in the ``None`` places of the bound arguments."""
        if len(pointers) != len(self._slots):
            raise TypeError(f"{self.kernel.name}: {len(self._slots)} per-launch pointers, got {len(pointers)}")
        for slot, p in zip(self._slots, pointers):
            slot.value = p
        result = self._launch(self._config_ref, self._func, self._params, None)
        if result:
            what = " (cooperative)" if self.kernel.cooperative else ""
            _check_cu(result, f"launching {self.kernel.name}{what}"
                              f"{' with programmatic dependent launch' if self.pdl else ''}")


def _nvrtc_version() -> tuple:
    lib = _nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check_nvrtc(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
    return major.value, minor.value


def _cache_root() -> Optional[str]:
    """Where cubins are kept between processes: beside inductor's own caches (``TORCHINDUCTOR_CACHE_DIR``), so
    a fresh or shared inductor cache directory means the same for these; None where inductor's caches are
    turned off (``force_disable_caches``)."""
    from torch._inductor import config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    if config.force_disable_caches:
        return None
    return os.path.join(cache_dir(), "moe_nvfp4_cubin")


def _cubin_path(source: str, name: str, arch: str, options: Sequence[str]) -> Optional[str]:
    root = _cache_root()
    if root is None:
        return None
    key = hashlib.sha256(repr((source, name, arch, tuple(options), _nvrtc_version())).encode()).hexdigest()
    return os.path.join(root, f"{name}-{key[:40]}.cubin")


def _store(path: str, cubin: bytes) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:  # whole, then renamed
            f.write(cubin)
        os.replace(f.name, path)
    except OSError:
        pass


def cached_cubin(source: str, name: str, arch: str, options: Sequence[str] = ()) -> tuple:
    """``(cubin, from_disk)``: :func:`_nvrtc_cubin`'s result, kept on disk under a hash of everything that
    decides it (source, kernel name, architecture, options and NVRTC's version), so a second process loads it
    instead of compiling for a second.  A cache that cannot be read or written is skipped, never an error."""
    path = _cubin_path(source, name, arch, options)
    if path is not None:
        try:
            with open(path, "rb") as f:
                return f.read(), True
        except OSError:
            pass
    cubin = _nvrtc_cubin(source, name, arch, options)
    if path is not None:
        _store(path, cubin)
    return cubin, False


def compile_kernel(source: str, name: str, device: torch.device, dynamic_smem: int = 0,
                   options: Sequence[str] = (), cooperative: bool = False) -> CudaKernel:
    """Compile ``source`` for ``device``'s architecture (``sm_XY``), or take its cubin from the disk cache
    (:func:`cached_cubin`), and load ``name`` from it.  A caller keeps the kernel (``cuda_decode`` keeps one per
    set of defines)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    device = torch.device("cuda", index)
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}"
    cubin, from_disk = cached_cubin(source, name, arch, options)
    try:
        return CudaKernel(cubin, name, device, dynamic_smem, cooperative)
    except RtcError:
        if not from_disk:
            raise
    # a cached cubin the driver refuses (truncated, written for another driver): compile it afresh
    cubin = _nvrtc_cubin(source, name, arch, options)
    _store(_cubin_path(source, name, arch, options), cubin)
    return CudaKernel(cubin, name, device, dynamic_smem, cooperative)


_CU_TENSOR_MAP_DATA_TYPE_UINT32 = 2
_CU_TENSOR_MAP_L2_PROMOTION_L2_256B = 3


def tensor_map(tensor: torch.Tensor, dims: Sequence[int], strides: Sequence[int], box: Sequence[int]) -> bytes:
    """A ``CUtensorMap`` (128 bytes, to pass by value) over ``tensor``'s memory seen as an array of 32-bit
    words of rank ``len(dims)`` (1-5): ``dims`` innermost first, the byte ``strides`` of dims 1.., ``box`` the
    tile one copy moves.  No swizzle; reads past ``dims`` fill with zeros.  The map holds ``tensor``'s
    address: remake it if the memory moves."""
    rank = len(dims)
    if not 1 <= rank <= 5 or len(strides) != rank - 1 or len(box) != rank:
        raise ValueError(f"tensor_map: dims {list(dims)}, strides {list(strides)} and box {list(box)} disagree")
    fn = _driver().cuTensorMapEncodeTiled
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    out = (ctypes.c_uint64 * 16)()
    gdim = (ctypes.c_uint64 * rank)(*dims)
    gstride = (ctypes.c_uint64 * max(1, rank - 1))(*strides)
    boxdim = (ctypes.c_uint32 * rank)(*box)
    ones = (ctypes.c_uint32 * rank)(*([1] * rank))
    _check_cu(fn(ctypes.byref(out), _CU_TENSOR_MAP_DATA_TYPE_UINT32, rank, ctypes.c_void_p(tensor.data_ptr()), gdim,
                 gstride, boxdim, ones, 0, 0, _CU_TENSOR_MAP_L2_PROMOTION_L2_256B, 0),
              f"encoding a tensor map of dims {list(dims)}, strides {list(strides)}, box {list(box)}")
    return bytes(out)
