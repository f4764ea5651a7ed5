"""``launch(fn, grid, *args, **kwargs)``: a Triton kernel launch as ``fn[grid](*args, **kwargs)``, with
Triton's per-launch front end run once per specialization instead of on every launch.

``fn[grid](...)`` specializes every argument, builds a cache key (the ``str`` of the launch options included),
builds launch metadata for the launch hooks and only then calls the compiled kernel's launcher: 19.2 us a launch
of a 24-argument kernel on an H100 host, against 5.7 us for the launcher alone
(``benchmarks/launch_cost.py``).  A MoE call above ``graph_tokens`` launches up to nine kernels, and in the
default mode (no CUDA graphs) its host time is what the GPU waits on.

``launch`` keys the compiled kernel on what Triton specializes on, read with plain Python (each tensor's dtype
and 16-byte alignment, each integer's width and whether it is 1 or a multiple of 16, the constexprs, the launch
options, the current device, Triton's debug flag), and on a hit calls the kernel's launcher directly.  A miss, a
callable grid, an argument it cannot key, an installed launch hook (profilers), the interpreter or a Triton
release other than 3.6, the one it is tested on (the launcher's calling convention is private), take Triton's own
path, which also compiles.
"""

from __future__ import annotations

from operator import itemgetter

import torch

__all__ = ["launch", "arg_key"]

try:
    import triton
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton, one older than 3.4 or a stand-in: every launch takes ``fn[grid]``
    knobs = driver = JITFunction = None
else:  # the compiled launcher's calling convention is Triton's private API: bind only on the release tested
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) != (3, 6):
        knobs = driver = JITFunction = None

_I32 = 1 << 31
_I64 = 1 << 63


class _Unkeyable(Exception):
    """An argument whose specialization this module does not model: Triton's own path takes the launch."""


def arg_key(v):
    """What Triton's specialization of one non-constexpr argument depends on (``native_specialize_impl``)."""
    if isinstance(v, torch.Tensor):
        return v.dtype, not v.data_ptr() & 15
    c = v.__class__
    if c is int:  # Triton: 1 is a constexpr; else i32 / i64 / u64 by range, "D" where divisible by 16
        return int, v == 1, not v & 15, 0 if -_I32 <= v < _I32 else 1 if -_I64 <= v < _I64 else 2
    if c is bool or c is float or v is None:  # bools and floats are not specialized; None is a constexpr
        return c
    raise _Unkeyable(c)


def _hooked(hook) -> bool:
    """A launch hook is installed: Triton >= 3.5 keeps a chain of them (``HookChain.calls``), older ones one."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or len(calls) > 0


class _Kernel:
    """One jitted function's bound launches: its non-constexpr parameter names and, per key, the compiled kernel
    with the getter that orders a call's arguments as the kernel's signature does."""

    __slots__ = ("runtime", "params", "bound")

    def __init__(self, fn):
        self.runtime = frozenset(p.name for p in fn.params if not p.is_constexpr)
        self.params = [(p.name, p.default) for p in fn.params]
        self.bound = {}

    def bind(self, kernel, nargs: int, names: tuple):
        """The getter of a launch's signature-ordered arguments out of ``args + kwargs values + defaults``."""
        index, defaults = [], []
        position = {name: nargs + i for i, name in enumerate(names)}
        extra = nargs + len(names)
        for i, (name, default) in enumerate(self.params):
            if i < nargs:
                index.append(i)
            elif name in position:
                index.append(position[name])
            else:
                index.append(extra + len(defaults))
                defaults.append(default)
        getter = itemgetter(*index) if len(index) > 1 else (lambda values, _i=index[0]: (values[_i],))
        return kernel, getter, tuple(defaults)


_KERNELS: dict = {}


def launch(fn, grid, *args, **kwargs):
    """``fn[grid](*args, **kwargs)``; the positional ``args`` are the kernel's leading parameters."""
    if grid.__class__ is not tuple:
        return fn[grid](*args, **kwargs)
    site = _KERNELS.get(fn)
    if site is None:
        if JITFunction is None or not isinstance(fn, JITFunction):
            return fn[grid](*args, **kwargs)
        site = _KERNELS[fn] = _Kernel(fn)
    runtime = knobs.runtime
    if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
        return fn[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    names = tuple(kwargs)
    params = site.runtime
    try:  # keyword constexprs and launch options count by type and value (True == 1 == 1.0 as dict keys)
        key = (device, runtime.debug, names, *map(arg_key, args),
               *[arg_key(v) if k in params else (v.__class__, v) for k, v in kwargs.items()])
        hit = site.bound.get(key)
    except (_Unkeyable, TypeError):  # TypeError: an unhashable constexpr
        return fn[grid](*args, **kwargs)
    if hit is None:
        kernel = fn[grid](*args, **kwargs)
        site.bound[key] = site.bind(kernel, len(args), names)
        return kernel
    kernel, getter, defaults = hit
    values = getter((*args, *kwargs.values(), *defaults))
    n = len(grid)
    kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, driver.active.get_current_stream(device),
               kernel.function, kernel.packed_metadata, None, None, None, *values)
    return kernel
