"""Get the ATen graph the backend's passes see, run passes on it, and keep before/after copies.

Everything here goes through the real ``moe_nvfp4`` backend (Dynamo -> AOT autograd with inductor's
decompositions -> pass manager), attaching an observer to its pass manager: the graphs a test inspects
are the graphs a user's compile with the same ``inner`` produces, with ``meta["val"]`` fake tensors and
symbolic token counts.  Nothing about tracing is re-implemented here.  The kit's default ``inner="eager"``
is fast but skips inductor's own post-grad rewrites, which the default compile runs before the passes (a
shared expert's last ``mm`` and the ``add`` after it become one ``addmm``): test a pass that matches such
ops with ``inner="inductor"`` too.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.fx

from moe_passes.errors import MoEShapeError
from moe_passes.passes import PassManager, default_pipeline, verify_graph
from moe_passes.passes.manager import PassLike
from moe_passes.testing.graph import OpLike, assert_pattern, op_count, resolve_op

__all__ = ["copy_graph_module", "Snapshot", "GraphChecks", "CompileRecord", "RecordingBackend", "PassRun", "trace",
           "run_passes", "run_pipeline", "verify", "expect_shape_error", "unwrap_compile_error", "raises_compile_error",
           "count_kernel_calls", "no_silent_fallback", "mark_token_dims"]


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm``'s graph (nodes, arguments, ``meta``) that shares its tensors.

    Parameters, buffers, tensor constants and tensors in ``gm.meta`` are the same objects as in ``gm``:
    a snapshot records the graph, not the data.  Cloning them fails inside a compile (the fake mode is
    active, so a real constant's storage would be cloned onto ``meta``; transformers' KV cache puts such
    constants in the graph) and would copy a model's weights once per snapshot.
    """
    from torch.utils._pytree import tree_leaves

    tensors = [v for module in gm.modules() for v in vars(module).values() if isinstance(v, torch.Tensor)]
    tensors += list(gm.parameters()) + list(gm.buffers())
    tensors += [v for v in tree_leaves(dict(getattr(gm, "meta", {}))) if isinstance(v, torch.Tensor)]
    return copy.deepcopy(gm, {id(t): t for t in tensors})


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A copy of the graph (:func:`copy_graph_module`) taken ``stage`` (``"before"`` / ``"after"``) pass
    ``pass_name``."""

    stage: str
    pass_name: str
    gm: torch.fx.GraphModule


class GraphChecks:
    """Assertions over a ``before`` / ``after`` pair of graphs (vLLM's TestBackend style)."""

    before: Optional[torch.fx.GraphModule]
    after: Optional[torch.fx.GraphModule]

    def graph(self, before: bool = False) -> torch.fx.GraphModule:
        gm = self.before if before else self.after
        if gm is None:
            raise AssertionError(f"no graph {'before' if before else 'after'} the passes was recorded "
                                 "(did the compile run, or fail before the passes?)")
        return gm

    def op_count(self, op: OpLike, before: bool = False) -> int:
        return op_count(self.graph(before), op)

    def check_before_ops(self, ops: Iterable[OpLike], fully_replaced: bool = True) -> None:
        """Each op occurs before the passes; with ``fully_replaced``, none is left after them."""
        for op in ops:
            if self.op_count(op, before=True) == 0:
                raise AssertionError(f"{resolve_op(op)} not found in the graph before the passes:\n"
                                     f"{self.graph(True).print_readable(print_output=False)}")
            if fully_replaced and self.op_count(op) != 0:
                raise AssertionError(f"{resolve_op(op)} still occurs {self.op_count(op)}x after the passes:\n"
                                     f"{self.graph().print_readable(print_output=False)}")

    def check_after_ops(self, ops: Iterable[OpLike]) -> None:
        """Each op occurs after the passes."""
        for op in ops:
            if self.op_count(op) == 0:
                raise AssertionError(f"{resolve_op(op)} not found in the graph after the passes:\n"
                                     f"{self.graph().print_readable(print_output=False)}")

    def assert_pattern(self, pattern, *, before: bool = False, exact: bool = False, count: Optional[int] = None):
        return assert_pattern(self.graph(before), pattern, exact=exact, count=count)


def _snapshot_list_graph(snapshots: Sequence[Snapshot], stage: str, pass_name: Optional[str]):
    for s in (snapshots if stage == "before" else reversed(snapshots)):
        if s.stage == stage and (pass_name is None or s.pass_name == pass_name):
            return s.gm
    return None


@dataclasses.dataclass
class CompileRecord(GraphChecks):
    """One call of the backend: Dynamo's graph, and a copy of the ATen graph around every pass."""

    dynamo_graph: torch.fx.GraphModule
    snapshots: list = dataclasses.field(default_factory=list)
    error: Optional[BaseException] = None

    @property
    def before(self) -> Optional[torch.fx.GraphModule]:
        """The ATen graph as the first pass received it."""
        return self.snapshots[0].gm if self.snapshots else None

    @property
    def after(self) -> Optional[torch.fx.GraphModule]:
        """The ATen graph after the last pass that completed (what the inner compiler got on success)."""
        return _snapshot_list_graph(self.snapshots, "after", None)

    def graph_at(self, stage: str, pass_name: Optional[str] = None) -> Optional[torch.fx.GraphModule]:
        return _snapshot_list_graph(self.snapshots, stage, pass_name)

    @property
    def pass_names(self) -> list[str]:
        return [s.pass_name for s in self.snapshots if s.stage == "after"]


class _CaptureDone(Exception):
    """Raised by :func:`trace`'s observer to stop the compile once the ATen graph is copied."""


class RecordingBackend(GraphChecks):
    """A ``torch.compile`` backend: the real ``moe_nvfp4`` backend, plus a record of every compile.

    ``torch.compile(model, backend=RecordingBackend(inner="eager", extra_passes=[my_pass]))``.  Options
    are the backend's own (``inner``, ``extra_passes``, ``dump_dir``, ``observers``).  ``compiles`` holds
    one :class:`CompileRecord` per backend call (graph breaks and recompiles each add one);
    ``before`` / ``after`` / ``op_count`` / ``check_*_ops`` look at the latest.
    """

    def __init__(self, *, inner: str = "eager", extra_passes: Sequence[PassLike] = (), dump_dir=None,
                 observers: Sequence[Callable] = (), snapshot_every_pass: bool = True,
                 _stop_before_passes: bool = False):
        self.options = {"inner": inner, "extra_passes": tuple(extra_passes), "dump_dir": dump_dir}
        self.user_observers = tuple(observers)
        self.snapshot_every_pass = snapshot_every_pass
        self._stop = _stop_before_passes
        self.compiles: list[CompileRecord] = []

    @property
    def num_compiles(self) -> int:
        return len(self.compiles)

    @property
    def last(self) -> CompileRecord:
        if not self.compiles:
            raise AssertionError("the backend was never called: nothing compiled (a cache hit, or Dynamo fell "
                                 "back to eager; see no_silent_fallback())")
        return self.compiles[-1]

    @property
    def before(self):
        return self.last.before

    @property
    def after(self):
        return self.last.after

    def _observer(self, record: CompileRecord):
        def observe(stage: str, name: str, gm: torch.fx.GraphModule) -> None:
            snaps = record.snapshots
            if self.snapshot_every_pass or not snaps:
                snaps.append(Snapshot(stage, name, copy_graph_module(gm)))
            elif stage == "after":  # keep only the first "before" and the latest "after"
                del snaps[1:]
                snaps.append(Snapshot(stage, name, copy_graph_module(gm)))
            if self._stop:
                raise _CaptureDone()
        return observe

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        from moe_passes.backend import moe_nvfp4_backend

        record = CompileRecord(dynamo_graph=copy_graph_module(gm))
        self.compiles.append(record)
        options = dict(self.options, observers=(self._observer(record), *self.user_observers))
        try:
            return moe_nvfp4_backend(gm, example_inputs, options=options)
        except BaseException as exc:
            record.error = exc
            raise


def unwrap_compile_error(exc: BaseException) -> BaseException:
    """The error a backend or fake function raised, out of torch.compile's wrappers.

    Backend errors come as ``BackendCompilerFailed`` (ours in ``inner_exception``); errors raised by a
    fake function while Dynamo traces come as ``TorchRuntimeError`` with ours down its exception chain.
    Returns the first :class:`~moe_passes.errors.MoEError` found, else the innermost backend error.
    """
    from moe_passes.errors import MoEError

    seen, current, innermost = set(), exc, exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MoEError):
            return current
        inner = getattr(current, "inner_exception", None)
        if isinstance(inner, BaseException):
            innermost = current = inner
            continue
        current = current.__cause__ or current.__context__
    return innermost


def mark_token_dims(*inputs: Any, dim: int = 0):
    """Mark dimension ``dim`` (the token count) of every tensor input dynamic; returns the inputs.

    Prefer this to ``torch.compile(dynamic=True)``: with ``dynamic=True`` every dimension starts symbolic
    and Dynamo's duck sizing gives equal sizes one symbol, so a first call whose token count equals the
    number of experts (``[8, H]`` hidden states, ``[8, 8]`` logits) ties the token count to the expert
    count, which is then specialized: every other token count recompiles.
    """
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.ndim > dim:
            torch._dynamo.mark_dynamic(t, dim)
    return inputs


def trace(fn: Union[torch.nn.Module, Callable], *example_inputs: Any, token_dim: Optional[int] = 0,
          inner: str = "eager", **kwargs: Any) -> torch.fx.GraphModule:
    """The ATen graph the backend's passes receive for ``fn(*example_inputs)``, before any pass ran.

    ``inner="inductor"``: the graph a default compile's passes get, after inductor's own post-grad rewrites
    (the module docstring says what differs).

    ``fn`` (a module or function) is compiled with the real backend (fullgraph); the compile stops as
    soon as the pass manager is handed the graph, so nothing executes.  Dimension ``token_dim`` of every
    tensor input is marked dynamic, and size-1 examples stay symbolic, so the graph carries a symbolic
    token count (``token_dim=None``: static shapes).  Placeholders carry ``meta["val"]`` fake tensors of
    the compile's own fake mode, so :func:`run_passes` / :func:`verify` can propagate shapes.
    """
    recorder = RecordingBackend(inner=inner, snapshot_every_pass=False, _stop_before_passes=True)
    compiled = torch.compile(fn, backend=recorder, fullgraph=True, dynamic=None if token_dim is not None else False)
    if token_dim is not None:
        mark_token_dims(*example_inputs, dim=token_dim)
    # The aborted compile caches nothing, but earlier compiles of the same code count against Dynamo's
    # recompile limit: lift it so the backend is always reached (and fail loudly rather than fall back).
    with torch.fx.experimental._config.patch(backed_size_oblivious=token_dim is not None), \
            torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20,
                                       fail_on_recompile_limit_hit=True):
        try:
            compiled(*example_inputs, **kwargs)
        except Exception as exc:
            if not isinstance(unwrap_compile_error(exc), _CaptureDone):
                raise
    if not recorder.compiles or recorder.last.before is None:
        raise AssertionError("trace: the moe_nvfp4 backend was not reached (was this code already compiled and "
                             "cached? call torch._dynamo.reset())")
    return recorder.last.before


@dataclasses.dataclass
class PassRun(GraphChecks):
    """The result of :func:`run_passes`: copies of the graph before and after, per-pass records."""

    before: torch.fx.GraphModule
    after: torch.fx.GraphModule
    records: list
    snapshots: list
    manager: PassManager
    error: Optional[BaseException] = None

    def graph_at(self, stage: str, pass_name: Optional[str] = None) -> Optional[torch.fx.GraphModule]:
        return _snapshot_list_graph(self.snapshots, stage, pass_name)


def run_passes(gm: torch.fx.GraphModule, passes: Union[PassManager, Sequence[PassLike], PassLike], *,
               raise_errors: bool = True, snapshot_every_pass: bool = True) -> PassRun:
    """Run one pass, a list of passes, or a whole :class:`PassManager` on a copy of ``gm``.

    ``gm`` itself is left untouched (trace once, run many).  Passes run through a PassManager, so the
    bookkeeping (dead-code elimination, lint, recompile, timing, logging) is the backend's.  With
    ``raise_errors=False`` a failing pass is stored in ``.error`` and ``.after`` is the graph as it was
    when the failure happened.
    """
    if isinstance(passes, PassManager):
        manager = passes
    else:
        manager = PassManager(list(passes) if isinstance(passes, (list, tuple)) else [passes])
    work = copy_graph_module(gm)
    snapshots: list[Snapshot] = []

    def observe(stage, name, graph_module):
        if snapshot_every_pass:
            snapshots.append(Snapshot(stage, name, copy_graph_module(graph_module)))

    manager.observers.append(observe)
    run = PassRun(before=copy_graph_module(gm), after=work, records=[], snapshots=snapshots, manager=manager)
    start = len(manager.records)
    try:
        manager.run(work)
    except Exception as exc:
        run.error = exc
        if raise_errors:
            raise
    finally:
        manager.observers.remove(observe)
    run.records = list(manager.records[start:])
    return run


def run_pipeline(gm: torch.fx.GraphModule, extra_passes: Sequence[PassLike] = (), **kwargs) -> PassRun:
    """Run the backend's own pipeline (lowering, ``extra_passes``, verification) on a copy of ``gm``."""
    return run_passes(gm, default_pipeline(extra_passes), **kwargs)


def verify(gm: torch.fx.GraphModule) -> None:
    """Run the verifier on (a copy of) any traced graph; raises :class:`MoEShapeError` on a violation."""
    verify_graph(copy_graph_module(gm))


def expect_shape_error(gm: torch.fx.GraphModule) -> MoEShapeError:
    """Run the verifier on a copy of ``gm`` and return the :class:`MoEShapeError` it must raise."""
    try:
        verify(gm)
    except MoEShapeError as exc:
        return exc
    raise AssertionError("the verifier accepted the graph, expected a MoEShapeError:\n"
                         + gm.print_readable(print_output=False))


class _Raised:
    value: Optional[BaseException] = None
    outer: Optional[BaseException] = None


@contextlib.contextmanager
def raises_compile_error(expected: type = MoEShapeError) -> Iterator[_Raised]:
    """``with raises_compile_error() as err: compiled(x)``; ``err.value`` is the backend's own error
    (unwrapped from ``BackendCompilerFailed``), ``err.outer`` what torch.compile raised."""
    info = _Raised()
    try:
        yield info
    except Exception as exc:  # noqa: BLE001 - we re-raise anything unexpected
        inner = unwrap_compile_error(exc)
        if not isinstance(inner, expected):
            raise AssertionError(f"expected {expected.__name__} from the compile, got {type(inner).__name__}: "
                                 f"{inner}") from exc
        info.value, info.outer = inner, exc
    else:
        raise AssertionError(f"expected {expected.__name__} at compile time, nothing was raised")


class KernelCalls:
    def __init__(self):
        self.by_kernel: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.by_kernel.values())


@contextlib.contextmanager
def count_kernel_calls(*kernels: str) -> Iterator[KernelCalls]:
    """Count run-time launches of registered MoE kernels (all of them by default).

    Wraps each kernel's ``run`` in the registry for the duration: a test can assert that a compile
    failed *before anything ran* (``calls.total == 0``).
    """
    from moe_passes.kernels import registry

    names = kernels or tuple(registry.names())
    calls = KernelCalls()
    originals = {}
    table = registry._REGISTRY  # the registry has no public override hook; restored on exit

    def counting(name, run):
        def wrapped(*args, **kwargs):
            calls.by_kernel[name] = calls.by_kernel.get(name, 0) + 1
            return run(*args, **kwargs)
        return wrapped

    try:
        for name in names:
            spec = registry.get(name)
            originals[name] = spec
            table[name] = dataclasses.replace(spec, run=counting(name, spec.run))
        yield calls
    finally:
        table.update(originals)


@contextlib.contextmanager
def no_silent_fallback(recompile_limit: int = 256, *, size_one_shares_compile: bool = True):
    """Compile settings for tests that must exercise the compiled path on every example.

    Dynamo falls back to eager without a word after ``recompile_limit`` (8) recompiles of one code
    object; here hitting the (raised) limit is an error instead.  ``size_one_shares_compile`` turns on
    ``backed_size_oblivious`` so a token count of 1 does not specialize and recompile.
    """
    with torch._dynamo.config.patch(recompile_limit=recompile_limit, accumulated_recompile_limit=max(
            recompile_limit, torch._dynamo.config.accumulated_recompile_limit), fail_on_recompile_limit_hit=True), \
            torch.fx.experimental._config.patch(backed_size_oblivious=size_one_shares_compile):
        yield
