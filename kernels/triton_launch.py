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

``record(run, inputs, keyed)`` goes one step further for a whole call that is nothing but allocations, views and
bound launches (the Triton MoE above ``graph_tokens``): a dry run collects its launches, and the :class:`Replay`
repeats them with each call's input, output and workspace addresses patched in, with no planning, no argument
keys and no Python between launches.  Pointer arguments go to the launcher as integers, which also spares it a
driver query per pointer.  A dry run that computes anything with torch, or whose launch would take Triton's own
path, raises :class:`Refused`.
"""

from __future__ import annotations

import contextvars
from operator import itemgetter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["launch", "arg_key", "record", "Replay", "Refused"]

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


def _hooks_installed(runtime) -> bool:
    """Hooks see launches only through Triton's own path, so neither a bound launch nor a replay may bypass it."""
    return _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)


def _grid3(grid: tuple) -> tuple:
    n = len(grid)
    return grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1


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
    """``fn[grid](*args, **kwargs)``; the positional ``args`` are the kernel's leading parameters.  Under
    :func:`record`, the launch is recorded instead (or refused where it would take Triton's own path)."""
    recorder = _RECORDER.get()
    if grid.__class__ is not tuple:
        return _unbound(recorder, fn, grid, args, kwargs, "its grid is a callable")
    site = _KERNELS.get(fn)
    if site is None:
        if JITFunction is None or not isinstance(fn, JITFunction):
            return _unbound(recorder, fn, grid, args, kwargs, "this Triton's launches are not bound")
        site = _KERNELS[fn] = _Kernel(fn)
    runtime = knobs.runtime
    if _hooks_installed(runtime):
        return _unbound(recorder, fn, grid, args, kwargs, "a launch hook is installed")
    device = driver.active.get_current_device()
    names = tuple(kwargs)
    params = site.runtime
    try:  # keyword constexprs and launch options count by type and value (True == 1 == 1.0 as dict keys)
        key = (device, runtime.debug, names, *map(arg_key, args),
               *[arg_key(v) if k in params else (v.__class__, v) for k, v in kwargs.items()])
        hit = site.bound.get(key)
    except (_Unkeyable, TypeError):  # TypeError: an unhashable constexpr
        return _unbound(recorder, fn, grid, args, kwargs, "an argument has no key")
    if hit is None:
        if recorder is not None:
            raise Refused(f"{getattr(fn, '__name__', fn)} has no compiled kernel for these arguments yet")
        kernel = fn[grid](*args, **kwargs)
        site.bound[key] = site.bind(kernel, len(args), names)
        return kernel
    kernel, getter, defaults = hit
    values = getter((*args, *kwargs.values(), *defaults))
    if recorder is not None:
        recorder.add(kernel, grid, values, device)
        return kernel
    kernel.run(*_grid3(grid), driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata,
               None, None, None, *values)
    return kernel


def _unbound(recorder, fn, grid, args, kwargs, why: str):
    if recorder is not None:
        raise Refused(f"{getattr(fn, '__name__', fn)}: {why}")
    return fn[grid](*args, **kwargs)


class Refused(Exception):
    """A dry run met something a replay could not repeat; the message says what."""


_RECORDER: contextvars.ContextVar = contextvars.ContextVar("moe_nvfp4_launch_recorder", default=None)
_aten = torch.ops.aten
# The ops a recorded call may run besides its launches: allocations (their memory becomes the replay's workspace)
# and views (metadata only).  Anything else computes, and a replay would skip it.
_ALLOCATIONS = frozenset((_aten.empty.memory_format, _aten.empty_strided.default, _aten.empty_like.default,
                          _aten.new_empty.default, _aten.new_empty_strided.default))
# Workspace buffers start on this boundary inside the replay's one allocation (the caching allocator's is 512).
_WORKSPACE_ALIGN = 256


class _Recorder(TorchDispatchMode):
    """One dry run: its allocations (kept alive to its end, so no two share memory) and bound launches."""

    def __init__(self):
        super().__init__()
        self.allocations = []
        self.launches = []  # (kernel, (gx, gy, gz), signature-ordered values)
        self.device = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _ALLOCATIONS and not func.is_view:
            raise Refused(f"the call runs {func}, which a replay of its launches would skip")
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.allocations.append(out)
        return out

    def add(self, kernel, grid: tuple, values: tuple, device: int) -> None:
        if self.device is None:
            self.device = device
        elif device != self.device:
            raise Refused("the call launches on two devices")
        self.launches.append((kernel, _grid3(grid), values))


def record(run, inputs: tuple, keyed: tuple) -> "Replay":
    """Dry-run ``run()`` and return a :class:`Replay` of its launches, or raise :class:`Refused`.

    The dry run launches nothing.  Every tensor one of its launches reads must lie in an ``inputs`` tensor (read
    at each replay from the tensors passed to it, which must have the shapes and dtypes of these), in a buffer
    the call allocated (the replay allocates them again, in one workspace), or elsewhere: in one of ``keyed``
    (the weights and scales, which the caller's key names by address, so they are passed as addresses) or in
    memory some kernel state holds (the replay keeps a reference to it).  ``run`` must return one of its own
    allocations, contiguous: the replay's output.
    """
    recorder = _Recorder()
    token = _RECORDER.set(recorder)
    try:
        with recorder:
            out = run()
    finally:
        _RECORDER.reset(token)
    return Replay(recorder, out, inputs, keyed)


def _extent(t: torch.Tensor):
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class Replay:
    """A recorded call's launches, repeated with each call's inputs, output and workspace (see :func:`record`).

    ``replay(*inputs)`` -> the output, or None where the replay does not apply (a launch hook is installed, the
    current device changed, an input's 16-byte alignment differs from the recorded one: Triton's kernels and the
    call's planning specialize on it); the caller then runs the call itself.
    """

    __slots__ = ("device", "align", "out_shape", "out_dtype", "workspace", "launches", "keep")

    def __init__(self, recorder: _Recorder, out, inputs: tuple, keyed: tuple):
        if not recorder.launches:
            raise Refused("the call launched no kernel")
        owners = {a.untyped_storage().data_ptr(): a for a in recorder.allocations}
        # the output is allocated alone at each replay: it must be a whole allocation of the call, not part of one
        if (not isinstance(out, torch.Tensor) or not out.is_contiguous() or out.data_ptr() not in owners
                or out.untyped_storage().data_ptr() != out.data_ptr()
                or out.untyped_storage().nbytes() != out.numel() * out.element_size()):
            raise Refused("the call's output is not one of its allocations")
        self.device, self.out_shape, self.out_dtype = recorder.device, tuple(out.shape), out.dtype
        self.align = tuple(t.data_ptr() & 15 for t in inputs)
        # sources: 0..n-1 the inputs, n the output, n + 1 the workspace
        n = len(inputs)
        spans = [(*_extent(t), i, 0) for i, t in enumerate(inputs)]
        out_storage = out.untyped_storage()
        spans.append((out_storage.data_ptr(), out_storage.data_ptr() + out_storage.nbytes(), n, 0))
        offset = 0
        for start, a in owners.items():
            if start == out_storage.data_ptr():
                continue
            size = a.untyped_storage().nbytes()
            spans.append((start, start + size, n + 1, offset))
            offset += -(-size // _WORKSPACE_ALIGN) * _WORKSPACE_ALIGN
        self.workspace = offset
        keyed_spans = [_extent(t) for t in keyed if t is not None]
        self.keep = []
        self.launches = []
        for kernel, grid, values in recorder.launches:
            values = list(values)
            patches = []
            for i, v in enumerate(values):
                if not isinstance(v, torch.Tensor):
                    continue
                p = v.data_ptr()
                values[i] = p
                span = next((s for s in spans if s[0] <= p < s[1]), None)
                if span is not None:
                    patches.append((i, span[2], span[3] + p - span[0]))
                elif p and not any(s <= p < e for s, e in keyed_spans):
                    self.keep.append(v)  # kernel state: its address stays valid while referenced
            launcher = kernel.run
            if getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1):
                fn, head = launcher, (*grid, None, kernel.function)
            else:  # no scratch to allocate per launch: the compiled launcher as CudaLauncher.__call__ calls it
                fn, head = launcher.launch, (*grid, None, kernel.function, launcher.launch_cooperative_grid,
                                             launcher.launch_pdl, None, None)
            head += (kernel.packed_metadata, None, None, None)
            self.launches.append((fn, (*head, *values), tuple((len(head) + i, s, o) for i, s, o in patches)))

    def __call__(self, *inputs):
        if _hooks_installed(knobs.runtime):
            return None
        if tuple(t.data_ptr() & 15 for t in inputs) != self.align:
            return None
        device = self.device
        if driver.active.get_current_device() != device:
            return None
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=inputs[0].device)
        workspace = torch.empty(self.workspace, dtype=torch.uint8, device=out.device) if self.workspace else None
        bases = (*(t.data_ptr() for t in inputs), out.data_ptr(), 0 if workspace is None else workspace.data_ptr())
        stream = driver.active.get_current_stream(device)
        for fn, template, patches in self.launches:
            args = list(template)
            args[3] = stream
            for i, source, offset in patches:
                args[i] = bases[source] + offset
            fn(*args)
        return out
