"""A small pass manager: declared order, timing, before/after graph logging, a cache key.

A pass is any callable ``pass_(gm: torch.fx.GraphModule) -> PassResult | None``; a :class:`GraphPass`
subclass adds a name and a ``uuid()``.  The manager does the bookkeeping so passes stay small:
dead-code elimination, lint and recompile after a change, timing, and logging of every graph before and
after each pass through torch's own graph logging (``TORCH_LOGS=graph_code``, ``tlparse`` artifacts
and depyf's dump directory all see them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import logging
import time
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx

__all__ = ["PassResult", "GraphPass", "PassManager", "PassRecord", "pass_name", "pass_uuid"]

log = logging.getLogger(__name__)
# Under the "torch" logger tree, where TORCH_LOGS attaches its handlers (TORCH_LOGS=graph_code shows passes).
_graph_code_log = torch._logging.getArtifactLogger("torch.moe_nvfp4.passes", "graph_code")


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a pass did: ``changed`` says whether the graph was modified, ``matches`` how many sites."""

    changed: bool
    matches: int = 0
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class PassRecord:
    name: str
    result: PassResult
    seconds: float


class GraphPass:
    """Base class for passes: subclasses implement :meth:`run`; ``name`` defaults to the class name.

    ``depends_on``: modules (by name) whose code the pass's result depends on beyond its own module, e.g. the
    op fakes it relies on; their source enters :meth:`uuid` with the pass's own module.
    """

    name: str = ""
    depends_on: tuple = ()

    def __init__(self):
        if not self.name:
            self.name = type(self).__name__

    def run(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.run(gm)

    def uuid(self) -> Optional[str]:
        """The compile cache key's part for this pass: the source of its module and of ``depends_on`` (helpers
        beside the class count) and :meth:`cache_state`.  None, which makes inductor bypass its FX graph
        cache, where the source cannot be read (a class defined in a REPL or notebook) or the state's ``repr``
        names an address."""
        import importlib

        sources = [_module_source(type(self))]
        sources += [_module_source(importlib.import_module(m)) for m in self.depends_on]
        return _digest(sources, (type(self).__qualname__, self.cache_state()))

    def cache_state(self):
        """What else the pass's result depends on: its attributes (compared by ``repr``).  A pass holding values
        whose ``repr`` does not show them whole (a large tensor) should return something that does."""
        return sorted(vars(self).items())


PassLike = Union[GraphPass, Callable[[torch.fx.GraphModule], Optional[PassResult]]]


def pass_name(p: PassLike) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def _module_source(obj) -> Optional[str]:
    """The whole source file of ``obj``'s module (``obj`` a class or a module), or None where there is none."""
    try:
        module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
        return inspect.getsource(module) if module is not None else None
    except (OSError, TypeError):
        return None


def _state_text(value) -> str:
    """``repr`` of a pass's state, with tensors by their bytes (a tensor's repr elides its middle)."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return f"Tensor({tuple(data.shape)}, {data.dtype}, {digest})"
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ", ".join(_state_text(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_state_text(k)}: {_state_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _digest(sources: Sequence[Optional[str]], state) -> Optional[str]:
    """A key over ``sources`` and ``state`` (:func:`_state_text`); None where a source is missing or the text
    names an object's address (it would differ from run to run, or hide what changed)."""
    text = _state_text(state)
    if any(s is None for s in sources) or " at 0x" in text:
        return None
    return hashlib.sha256("\0".join([*sources, text]).encode()).hexdigest()


def pass_uuid(p: PassLike) -> Optional[str]:
    """The cache key's part for ``p`` (see :meth:`GraphPass.uuid`).  A plain function counts with its source,
    its defaults and the values its closure captured (a pass built by a factory differs per argument)."""
    if hasattr(p, "uuid"):
        return p.uuid()
    if not inspect.isroutine(p) and not isinstance(p, functools.partial):  # a callable object: as a GraphPass
        return _digest([_module_source(type(p))], (type(p).__qualname__, sorted(getattr(p, "__dict__", {}).items())))
    fn = p.func if isinstance(p, functools.partial) else p  # a partial's bound arguments count below
    owner = getattr(fn, "__self__", None)  # a bound method: its object's attributes are its parameters
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    captured = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    state = (fn.__qualname__ if hasattr(fn, "__qualname__") else None, captured, getattr(fn, "__defaults__", None),
             getattr(fn, "__kwdefaults__", None), getattr(p, "args", None), getattr(p, "keywords", None),
             None if owner is None or inspect.ismodule(owner) else sorted(getattr(owner, "__dict__", {}).items()))
    # the whole module beside the function's own source: helpers and constants it uses count
    return _digest([source, _module_source(fn)], state)


def _log_graph(label: str, gm: torch.fx.GraphModule) -> None:
    # Look the formatter up at call time: depyf replaces it to dump graphs to its directory.
    from torch._dynamo import utils as dynamo_utils

    if _graph_code_log.isEnabledFor(logging.DEBUG):
        _graph_code_log.debug("%s", dynamo_utils.lazy_format_graph_code(label, gm, colored=False))
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": label, "encoding": "string"},
        payload_fn=lambda: gm.print_readable(print_output=False),
    )


class PassManager:
    """Runs passes in the declared order over one graph module.

    ``records`` keeps, per run, what each pass did and how long it took.  ``observers`` are called as
    ``observer(stage, pass_name, gm)`` with stage ``"before"`` / ``"after"`` (the testing kit uses it to
    snapshot graphs).
    """

    def __init__(self, passes: Sequence[PassLike], *, dump_fn: Optional[Callable[[str, torch.fx.GraphModule], None]] = None):
        self.passes = list(passes)
        self.records: list[PassRecord] = []
        self.observers: list[Callable[[str, str, torch.fx.GraphModule], None]] = []
        self.dump_fn = dump_fn

    def uuid(self) -> Optional[str]:
        """One key over every pass's; None (no FX graph cache) when any pass has none."""
        keys = [pass_uuid(p) for p in self.passes]
        if any(k is None for k in keys):
            return None
        return hashlib.sha256("|".join(keys).encode()).hexdigest()

    def _emit(self, stage: str, name: str, gm: torch.fx.GraphModule) -> None:
        label = f"moe_nvfp4 {stage} {name}"
        _log_graph(label, gm)
        if self.dump_fn is not None:
            self.dump_fn(f"{stage}_{name}", gm)
        for observer in self.observers:
            observer(stage, name, gm)

    def __call__(self, gm: torch.fx.GraphModule) -> list[PassRecord]:
        return self.run(gm)

    def run(self, gm: torch.fx.GraphModule) -> list[PassRecord]:
        records = []
        for p in self.passes:
            name = pass_name(p)
            self._emit("before", name, gm)
            start = time.perf_counter()
            result = p(gm)
            if result is None:
                result = PassResult(changed=True, detail="pass returned no PassResult; assumed changed")
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {name} returned {type(result).__name__}, expected PassResult or None")
            if result.changed:
                gm.graph.eliminate_dead_code()
                gm.graph.lint()
                gm.recompile()
            elapsed = time.perf_counter() - start
            records.append(PassRecord(name, result, elapsed))
            self.records.append(records[-1])  # kept as each pass ends, so a failing later pass leaves them
            log.debug("moe_nvfp4 pass %s: %s in %.2f ms", name, result, elapsed * 1e3)
            self._emit("after", name, gm)
        return records

    def extend(self, passes: Iterable[PassLike]) -> None:
        self.passes.extend(passes)
