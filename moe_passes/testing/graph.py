"""Inspect FX graphs in tests: find ops by friendly names, count them, assert data-flow chains.

Ops can be named by alias (``"pad"``, ``"kernel"``/``"trtllm_nvfp4_moe"``, ``"slice"``, ``"add"``, ...), by
dotted name (``"aten.mul.Tensor"``, ``"moe_nvfp4.fused_moe"``; a name without an overload matches every
overload), or given as the op object itself (``torch.ops.aten.add.Tensor``).  Failures print the part of
the graph that matters, one node per line with its fake shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx

from moe_passes.ops import FUSED_MOE, KERNEL_OP

__all__ = ["OpMatcher", "resolve_op", "ALIASES", "find_nodes", "op_count", "assert_pattern", "assert_no_ops",
           "format_node", "format_graph", "parse_pattern"]

aten = torch.ops.aten

OpLike = Union[str, torch._ops.OpOverload, torch._ops.OpOverloadPacket, Callable, "OpMatcher"]

# Friendly names for the nodes MoE passes produce.  Extend per test with resolve_op(...) on op objects.
ALIASES: dict[str, tuple] = {
    "pad": (aten.constant_pad_nd.default, aten.pad.default),
    "slice": (aten.slice.Tensor,),
    "narrow": (aten.narrow.default,),
    "add": (aten.add.Tensor,),
    "mul": (aten.mul.Tensor,),
    "mm": (aten.mm.default,),
    "cat": (aten.cat.default,),
    "clone": (aten.clone.default,),
    "kernel": (KERNEL_OP,),
    "trtllm_nvfp4_moe": (KERNEL_OP,),
    "fused_moe": (FUSED_MOE,),
}


@dataclasses.dataclass(frozen=True)
class OpMatcher:
    """Matches ``call_function`` nodes whose target is one of ``targets`` (or an overload of a packet)."""

    name: str
    targets: tuple

    def __call__(self, node: torch.fx.Node) -> bool:
        if node.op != "call_function":
            return False
        target = node.target
        for t in self.targets:
            if target is t or target == t:
                return True
            if isinstance(t, torch._ops.OpOverloadPacket) and getattr(target, "overloadpacket", None) is t:
                return True
        return False

    def __str__(self) -> str:
        return self.name


def _lookup_dotted(name: str):
    parts = name.split(".")
    if len(parts) < 2:
        return None
    obj = torch.ops
    try:
        for part in parts:
            obj = getattr(obj, part)
    except (AttributeError, RuntimeError):
        return None
    return obj if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else None


def resolve_op(op: OpLike) -> OpMatcher:
    """Turn an alias, a dotted op name, an op object or a matcher into an :class:`OpMatcher`."""
    if isinstance(op, OpMatcher):
        return op
    if isinstance(op, str):
        name = op.strip()
        if name in ALIASES:
            return OpMatcher(name, ALIASES[name])
        found = _lookup_dotted(name) or _lookup_dotted("aten." + name)
        if found is None:
            raise ValueError(f"unknown op {op!r}: use an alias ({', '.join(sorted(ALIASES))}), a dotted name such "
                             "as 'aten.mul.Tensor', or the op object")
        return OpMatcher(name, (found,))
    if isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return OpMatcher(str(op), (op,))
    return OpMatcher(getattr(op, "__name__", repr(op)), (op,))


def parse_pattern(pattern: Union[str, Sequence[OpLike]]) -> list[OpMatcher]:
    """``"pad -> kernel -> slice"`` or a list of op-likes into matchers."""
    items = [p for p in pattern.split("->")] if isinstance(pattern, str) else list(pattern)
    matchers = [resolve_op(p) for p in items]
    if not matchers:
        raise ValueError("empty pattern")
    return matchers


def find_nodes(gm: Union[torch.fx.GraphModule, torch.fx.Graph], op: OpLike) -> list[torch.fx.Node]:
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    matcher = resolve_op(op)
    return [n for n in graph.nodes if matcher(n)]


def op_count(gm: Union[torch.fx.GraphModule, torch.fx.Graph], op: OpLike) -> int:
    """How many nodes of ``gm`` call ``op``."""
    return len(find_nodes(gm, op))


# -- formatting ---------------------------------------------------------------------------------------

def _val_str(node: torch.fx.Node) -> str:
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).replace("torch.", "")
        return f"{dtype}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join(f"[{', '.join(str(s) for s in v.shape)}]" for v in val) + ")"
    return "" if val is None else type(val).__name__


def _arg_str(arg: Any, limit: int = 6) -> str:
    if isinstance(arg, torch.fx.Node):
        return "%" + arg.name
    if isinstance(arg, (list, tuple)):
        inner = [_arg_str(a, limit) for a in arg[:limit]]
        if len(arg) > limit:
            inner.append("...")
        return ("[" if isinstance(arg, list) else "(") + ", ".join(inner) + ("]" if isinstance(arg, list) else ")")
    text = repr(arg)
    return text if len(text) <= 40 else text[:37] + "..."


def _target_str(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        return str(node.target) if isinstance(node.target, torch._ops.OpOverload) else getattr(
            node.target, "__name__", str(node.target))
    return f"{node.op}:{node.target}"


def format_node(node: torch.fx.Node, max_args: int = 6) -> str:
    """``%name: bf16[s0, 2816] = aten.constant_pad_nd.default(%x, [0, 128], 0.0)``."""
    val = _val_str(node)
    args = [_arg_str(a) for a in node.args[:max_args]]
    if len(node.args) > max_args:
        args.append(f"... +{len(node.args) - max_args}")
    args += [f"{k}={_arg_str(v)}" for k, v in node.kwargs.items()]
    head = f"%{node.name}" + (f": {val}" if val else "")
    if node.op == "placeholder":
        return f"{head} = placeholder"
    if node.op == "output":
        return f"output({_arg_str(node.args[0])})"
    return f"{head} = {_target_str(node)}({', '.join(args)})"


def format_graph(gm: Union[torch.fx.GraphModule, torch.fx.Graph], *, focus: Iterable[torch.fx.Node] = (),
                 context: int = 3, placeholders: bool = False, max_lines: int = 80) -> str:
    """The graph one node per line; with ``focus``, only those nodes (marked ``>>``) and ``context``
    neighbours each side, the rest elided."""
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    nodes = [n for n in graph.nodes if placeholders or n.op != "placeholder"]
    focus = set(focus)
    keep = set(range(len(nodes)))
    if focus:
        idx = [i for i, n in enumerate(nodes) if n in focus]
        keep = {j for i in idx for j in range(i - context, i + context + 1) if 0 <= j < len(nodes)}
    lines, last = [], -1
    for i, n in enumerate(nodes):
        if i not in keep:
            continue
        if i != last + 1:
            lines.append("    ...")
        lines.append(("  >> " if n in focus else "     ") + format_node(n))
        last = i
    if last != len(nodes) - 1:
        lines.append("    ...")
    if len(lines) > max_lines:
        lines = lines[:max_lines] + [f"    ... ({len(lines) - max_lines} more lines)"]
    return "\n".join(lines)


# -- patterns -----------------------------------------------------------------------------------------

def _chains_from(node: torch.fx.Node, matchers: list[OpMatcher]):
    """All data-flow chains starting at ``node`` (which matches matchers[0]); also the longest prefix."""
    if len(matchers) == 1:
        return [[node]], [node]
    full, best = [], [node]
    for user in node.users:
        if matchers[1](user):
            sub_full, sub_best = _chains_from(user, matchers[1:])
            full += [[node] + c for c in sub_full]
            if 1 + len(sub_best) > len(best):
                best = [node] + sub_best
    return full, best


def _describe_partial(best: list[torch.fx.Node], matchers: list[OpMatcher]) -> str:
    last = best[-1]
    users = ", ".join(f"%{u.name} ({_target_str(u)})" for u in last.users) or "none"
    return (f"{' -> '.join('%' + n.name for n in best)}; the users of %{last.name} are [{users}], "
            f"expected {matchers[len(best)]}")


def _exact_violations(graph: torch.fx.Graph, matchers: list[OpMatcher], chains, starts):
    """What ``exact=True`` rejects: a chain value used off the chain, or a chain that starts and stops."""
    problems, focus, seen = [], [], set()
    for chain in chains:  # each value goes to its own chain's next node only: two chains may not share one
        for node, nxt in zip(chain, chain[1:]):
            off = [u for u in node.users if u is not nxt]
            if off and node not in seen:
                seen.add(node)
                problems.append(f"%{node.name} is on the chain, but its output is also used off the chain by "
                                + ", ".join(f"%{u.name} ({_target_str(u)})" for u in off))
                focus += [node, *off]
    on_chains = {n for c in chains for n in c}  # a match starting inside a full chain is that chain's tail
    for node, best in starts:
        if node not in on_chains and len(best) >= 2:
            problems.append(f"a partial match {_describe_partial(best, matchers)}")
            focus += best
    return problems, focus


def assert_pattern(gm: Union[torch.fx.GraphModule, torch.fx.Graph], pattern: Union[str, Sequence[OpLike]], *,
                   exact: bool = False, count: Optional[int] = None) -> list[list[torch.fx.Node]]:
    """Assert a data-flow chain ``a -> b -> c``: a node calling ``a`` whose output feeds a node calling ``b``...

    ``count``: how many distinct chains must exist (default: at least one; 0: none).  ``exact=True`` is about the
    chains' own nodes, not the rest of the graph (a real model has many other adds and slices): the value of
    every node on a chain but the last goes only to the next node (e.g. a padded kernel output feeds nothing
    but its slice), and every match of the pattern's first two ops goes on to a full chain (no
    ``pad -> kernel`` whose kernel output skips the slice).  Returns the chains found (lists of nodes).
    """
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    matchers = parse_pattern(pattern)
    shown = " -> ".join(str(m) for m in matchers)
    chains, best, starts = [], [], []
    for node in graph.nodes:
        if matchers[0](node):
            full, partial = _chains_from(node, matchers)
            chains += full
            starts.append((node, partial))
            if len(partial) > len(best):
                best = partial
    if (count is None and not chains) or (count is not None and len(chains) != count):
        if not chains and best:
            why = f"longest partial match: {_describe_partial(best, matchers)}"
        elif not chains:
            why = f"no node calls {matchers[0]}"
        else:
            why = f"found {len(chains)} chains, expected {count}"
        focus = [n for c in chains for n in c] or best or [n for m in matchers for n in graph.nodes if m(n)]
        raise AssertionError(f"expected the data-flow chain {shown}: {why}\n"
                             f"graph (>> marks the nodes involved):\n{format_graph(graph, focus=focus)}")
    if exact:
        problems, focus = _exact_violations(graph, matchers, chains, starts)
        if problems:
            raise AssertionError(f"chain {shown} found, but not exactly: " + "; ".join(problems)
                                 + f"\ngraph (>> marks the nodes involved):\n{format_graph(graph, focus=focus)}")
    return chains


def assert_no_ops(gm: Union[torch.fx.GraphModule, torch.fx.Graph], *ops: OpLike) -> None:
    """Assert that no node calls any of ``ops``; the failure shows where they are."""
    found = [n for op in ops for n in find_nodes(gm, op)]
    if found:
        names = ", ".join(f"%{n.name} ({_target_str(n)})" for n in found)
        raise AssertionError(f"expected no {', '.join(str(resolve_op(o)) for o in ops)} nodes, found {names}\n"
                             f"{format_graph(gm, focus=found)}")
