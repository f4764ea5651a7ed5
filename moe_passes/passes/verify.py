"""Prove, before anything runs, that no padded tensor meets an unpadded one.

Runs last and always.  Two checks:

1. Fake-tensor propagation over the whole graph in the graph's own fake mode (symbolic token counts
   stay symbolic).  The kernel op's fake function checks its inputs against the shape contract, and
   every other op checks its own shapes; any failure becomes a :class:`MoEShapeError` naming the node,
   the MoE layer upstream of it, the sizes involved and the user's source line.
2. What the fake shapes cannot see: every FusedMoE node was lowered, and the padding columns of every
   padded kernel output are followed column by column through elementwise ops, views, transposes, pads,
   slices and concatenations.  Any route is accepted (e.g. pad the shared output, add in the padded
   domain, slice later), but the padding must be sliced away before it reaches anything else (the graph
   output, a reduction, a matmul, another kernel), a kernel output's columns must never meet shifted ones
   or land a real column on its padding (a shared output padded on the left), and the kernel's input must
   hold the layer's columns in order, then pad zeros.  Shapes alone would accept a padded output returned
   from the graph, broadcast against a ``[T, 1]`` tensor, sliced from the wrong offset, or activations
   padded on the left.

Example of a caught bug (an extra pass dropped the slice)::

    y_p = moe_nvfp4.trtllm_nvfp4_moe(x_p, ...)     # [T, 2816]
    out = aten.add.Tensor(y_p, shared)             # [T, 2816] + [T, 2688]  -> MoEShapeError
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Optional

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import moe_passes
from moe_passes.errors import MoEError, MoEShapeError
from moe_passes.ops import FUSED_MOE, KERNEL_OP
from moe_passes.passes.lower_fused_moe import MOE_META, layer_name
from moe_passes.passes.manager import GraphPass, PassResult

__all__ = ["VerifyMoEShapes", "verify_graph", "user_source_line"]

aten = torch.ops.aten
# Frames in these trees are ours or torch's, never the user's line (moe_passes/kernels links to kernels/, whose
# real path a traceback may show too).
_NOT_USER_CODE = tuple({os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (moe_passes, torch)}
                       | {os.path.realpath(os.path.join(os.path.dirname(moe_passes.__file__), "kernels")) + os.sep})
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)')


def user_source_line(node: torch.fx.Node) -> Optional[str]:
    """The user's line behind ``node``: the innermost recorded frame outside this package and torch.

    Returned as ``File "...", line N, in f`` plus its code line; when the innermost frame is inside this
    package (e.g. FusedMoE.forward's shared-expert add) it follows as ``via ...``.
    """
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = trace.rstrip().splitlines()
    frames = []
    for i, line in enumerate(lines):
        match = _FRAME.match(line)
        if match:
            code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
            frames.append((match.group(1), line.strip() + ("\n" + code if code else "")))
    if not frames:
        return None
    user = [text for path, text in frames if not os.path.abspath(path).startswith(_NOT_USER_CODE)]
    innermost = frames[-1][1]
    if not user:
        return innermost
    return user[-1] if user[-1] == innermost else f"{user[-1]}\nvia {innermost}"


def _shape(v) -> Optional[tuple]:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _kernel_ancestors(node: torch.fx.Node, limit: int = 64) -> list[torch.fx.Node]:
    """Kernel op nodes feeding ``node`` (breadth first, nearest first)."""
    seen, frontier, found = set(), [node], []
    while frontier and len(seen) < limit:
        current = frontier.pop(0)
        for inp in current.all_input_nodes:
            if inp in seen:
                continue
            seen.add(inp)
            if inp.target is KERNEL_OP:
                found.append(inp)
            else:
                frontier.append(inp)
    return found


def _sizes(node: torch.fx.Node) -> dict:
    info = node.meta.get(MOE_META)
    if info:
        return info
    val = node.meta.get("val")
    hidden_padded = val.shape[-1] if isinstance(val, torch.Tensor) else None
    x = node.args[0] if node.args else None
    hidden = hidden_padded
    if isinstance(x, torch.fx.Node) and x.target is aten.constant_pad_nd.default:
        src = x.args[0].meta.get("val") if isinstance(x.args[0], torch.fx.Node) else None
        hidden = src.shape[-1] if isinstance(src, torch.Tensor) else hidden
    return {"layer": layer_name(node), "hidden": hidden, "hidden_padded": hidden_padded}


def _describe_failure(node: torch.fx.Node, exc: Exception) -> MoEShapeError:
    shapes = [(a.name, _shape(a.meta.get("val"))) for a in node.all_input_nodes]
    kernels = [node] if node.target is KERNEL_OP else _kernel_ancestors(node)
    layer, sizes = None, None
    routed = None  # the width of the input that carries the kernel's output, where it meets another width
    if kernels:
        info = _sizes(kernels[0])
        layer = info["layer"]
        sizes = (info["hidden_padded"], info["hidden"])
        if node.target is not KERNEL_OP:
            derived = [a is kernels[0] or kernels[0] in _kernel_ancestors(a) for a in node.all_input_nodes]
            mine = [s[-1] for (_, s), d in zip(shapes, derived) if s and d]
            others = [s[-1] for (_, s), d in zip(shapes, derived) if s and not d and mine and s[-1] != mine[0]]
            if mine and others:  # prefer the layer's hidden size among the other widths (a matmul has more)
                routed = mine[0]
                sizes = (routed, info["hidden"] if info["hidden"] in others else others[0])
    if isinstance(exc, MoEShapeError):
        message = f"graph node {node.name} ({node.target}): {exc.args[0].splitlines()[0]}"
        sizes = exc.sizes or sizes
    else:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = (f"graph node {node.name} ({node.target}) cannot combine its inputs "
                   + ", ".join(f"{n} {s}" for n, s in shapes) + f": {detail}")
        if routed is not None and routed == info["hidden_padded"]:
            message += (f"\n  a routed-expert output padded to {sizes[0]} meets a tensor of width {sizes[1]}: "
                        f"slice the kernel output back to the layer's hidden size before combining it")
        elif routed is not None:
            message += (f"\n  a routed-expert output {routed} wide meets a tensor of width {sizes[1]}: slice the "
                        f"kernel output to the layer's hidden size {info['hidden']} (it is {info['hidden_padded']} "
                        f"wide)")
    return MoEShapeError(message, layer=layer or (exc.layer if isinstance(exc, MoEShapeError) else None),
                         sizes=sizes, source=user_source_line(node))


class _Prop(FakeTensorProp):
    def run_node(self, n: torch.fx.Node):
        try:
            return super().run_node(n)
        except MoEShapeError as exc:
            raise _describe_failure(n, exc) from exc
        except MoEError:
            raise
        except Exception as exc:  # a shape/dtype error raised by an ATen fake kernel
            raise _describe_failure(n, exc) from exc


def _fake_inputs(gm: torch.fx.GraphModule):
    vals = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val", node.meta.get("example_value"))
        if val is None:
            raise MoEShapeError(f"placeholder {node.name} carries no fake value; verify needs an AOT/ATen graph "
                                "traced with fake tensors (see moe_passes.testing.trace)")
        vals.append(val)
    return vals


def _propagate(gm: torch.fx.GraphModule) -> None:
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode

    inputs = _fake_inputs(gm)
    fake_mode = detect_fake_mode(inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        inputs = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    # A shape error is reported as a MoEShapeError; the fake mode would also log its traceback at ERROR.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with enable_python_dispatcher():
            _Prop(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)
    finally:
        fake_log.setLevel(level)


# Column tracking: for a value derived from a padded kernel output, what each position along one dimension
# holds: a column index of the layer's hidden state, the kernel's padding (_PAD, unspecified contents) or a
# zero written by a constant pad (_ZERO).  Values that hold neither padding nor pad zeros are not tracked.
_PAD, _ZERO = -1, -2


@dataclasses.dataclass(frozen=True)
class _Cols:
    dim: int  # counted from the right (-1: the last dimension), so broadcasting keeps it
    cols: tuple
    kernel: Optional[torch.fx.Node]  # the kernel whose output this derives from (None: another value)

    @property
    def padded(self) -> bool:
        return self.kernel is not None and _PAD in self.cols


_IDENTITY_OPS = {aten._to_copy.default, aten.alias.default, aten.detach.default, aten.clone.default}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default}


def _size_along(val, dim: int):
    return val.shape[dim] if isinstance(val, torch.Tensor) and val.ndim >= -dim else None


def _state_of(arg, states: dict, dim: int) -> Optional[_Cols]:
    """``arg``'s columns along ``dim``: tracked, or the identity for a plain tensor of static width."""
    if not isinstance(arg, torch.fx.Node):
        return None
    state = states.get(arg)
    if state is not None:
        return state if state.dim == dim else None
    width = _size_along(arg.meta.get("val"), dim)
    return _Cols(dim, tuple(range(width)), None) if isinstance(width, int) else None


class _Escape(Exception):
    """A tracked value with kernel padding reached ``node``, where its columns can no longer be followed."""

    def __init__(self, node: torch.fx.Node, state: _Cols, why: str, shifted: bool = False):
        super().__init__(why)
        self.node, self.state, self.why, self.shifted = node, state, why, shifted


def _combine(node: torch.fx.Node, inputs: list, states: dict, dim: int) -> Optional[_Cols]:
    """Position by position, for inputs that line up along ``dim`` (elementwise ops, cat on another dim)."""
    out_width = _size_along(node.meta.get("val"), dim)
    tracked = [states[a] for a in inputs if isinstance(a, torch.fx.Node) and a in states and states[a].dim == dim]
    if not tracked:
        return None
    padded = next((s for s in tracked if s.padded), None)
    owned = padded or next((s for s in tracked if s.kernel is not None), None)
    if not isinstance(out_width, int):
        if padded is not None:
            raise _Escape(node, padded, "gives it a width that is not a number")
        return None
    parts = []
    for arg in inputs:
        width = _size_along(arg.meta.get("val"), dim) if isinstance(arg, torch.fx.Node) else None
        if width is None or width == 1 and out_width != 1:
            continue  # a scalar or a broadcast: the same for every position
        state = _state_of(arg, states, dim)
        if state is None:
            if padded is not None:
                raise _Escape(node, padded, f"meets {arg.name}, whose columns cannot be followed")
            return None
        parts.append((arg, state))
    cols = []
    for p in range(out_width):
        data = [(a, s.cols[p]) for a, s in parts if s.cols[p] >= 0]
        if any(s.cols[p] == _PAD for _, s in parts):
            if data:  # a real column would vanish into padding that is sliced away
                raise _Escape(node, padded, f"column {data[0][1]} of {data[0][0].name} lands on the kernel's padding "
                                            f"(at position {p})", shifted=True)
            cols.append(_PAD)
        elif len({c for _, c in data}) > 1:
            if owned is not None:  # a kernel's output meets columns that do not line up with its own
                (a, ca), (b, cb) = data[:2]
                raise _Escape(node, owned, f"column {ca} of {a.name} meets column {cb} of {b.name} (at position {p})",
                              shifted=True)
            return None  # the model's own arithmetic on shifted columns: not ours to judge
        else:
            cols.append(data[0][1] if data else _ZERO)
    return _Cols(dim, tuple(cols), owned.kernel if owned is not None else None)


def _transfer(node: torch.fx.Node, states: dict) -> Optional[_Cols]:
    """The columns of ``node``'s value, given its inputs'; raises :class:`_Escape` when padding is lost track of."""
    target, args = node.target, node.args
    if node.op != "call_function":
        return None
    val = node.meta.get("val")
    if target is aten.constant_pad_nd.default:
        return _pad(node, states)
    if target is aten.slice.Tensor and isinstance(args[0], torch.fx.Node):
        return _slice(node, states)
    ins = [a for a in node.all_input_nodes if a in states]
    if not ins:
        return None
    src = states[ins[0]]
    padded = next((states[a] for a in ins if states[a].padded), None)

    def lose(why: str) -> None:
        if padded is not None:
            raise _Escape(node, padded, why)
        return None

    if target is aten.cat.default:
        tensors = list(args[0])
        dim = args[1] if len(args) > 1 else 0
        dim = dim - val.ndim if dim >= 0 else dim
        dims = {states[a].dim for a in ins}
        if len(dims) != 1:
            return lose("concatenates values tracked along different dimensions")
        (tracked_dim,) = dims
        if dim != tracked_dim:
            return _tracked(_combine(node, tensors, states, tracked_dim))
        parts = [_state_of(a, states, tracked_dim) for a in tensors]
        if any(p is None for p in parts):
            return lose("concatenates it with a value whose columns cannot be followed")
        return _tracked(_Cols(tracked_dim, tuple(c for p in parts for c in p.cols), padded and padded.kernel))
    if isinstance(target, torch._ops.OpOverload) and (torch.Tag.pointwise in target.tags or target in _IDENTITY_OPS):
        dims = {states[a].dim for a in ins}
        if len(dims) != 1:
            return lose("combines values tracked along different dimensions")
        return _tracked(_combine(node, list(node.all_input_nodes), states, dims.pop()))
    if target in _VIEW_OPS and args[0] in states:
        before, after = args[0].meta["val"].shape, val.shape
        keep = -src.dim
        if len(after) >= keep and tuple(after[-keep:]) == tuple(before[-keep:]):
            return src
        return lose("reshapes the padded dimension")
    if target in (aten.permute.default, aten.transpose.int, aten.t.default) and args[0] in states:
        ndim = val.ndim
        order = list(range(ndim))
        if target is aten.permute.default:
            order = [d % ndim for d in args[1]]
        elif ndim > 1:
            a, b = (args[1] % ndim, args[2] % ndim) if target is aten.transpose.int else (0, 1)
            order[a], order[b] = order[b], order[a]
        return dataclasses.replace(src, dim=order.index(ndim + src.dim) - ndim)
    return lose("uses it, and the padding columns would take part")


def _slice(node: torch.fx.Node, states: dict) -> Optional[_Cols]:
    """``slice``: the kept columns of a tracked value, or of a plain one (a shift of it would move them)."""
    x, args = node.args[0], node.args
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.ndim:
        return None
    dim = args[1] if len(args) > 1 else 0
    dim = dim - val.ndim if dim >= 0 else dim
    state = states.get(x)
    if state is not None and state.dim != dim:
        return state  # another dimension: the tracked columns stay as they are
    start, end, step = (list(args[2:5]) + [None, None, 1][len(args[2:5]):])
    if not all(isinstance(v, int) or v is None for v in (start, end, step)):
        if state is not None and state.padded:
            raise _Escape(node, state, "slices it by a symbolic range")
        return None
    state = state if state is not None else _state_of(x, states, dim)
    return None if state is None else _tracked(dataclasses.replace(state, cols=state.cols[slice(start, end, step)]))


def _pad(node: torch.fx.Node, states: dict) -> Optional[_Cols]:
    """``constant_pad_nd``: zeros around the columns (also of an untracked value, to check what it meets)."""
    x, pads = node.args[0], list(node.args[1])
    state = states.get(x)
    if state is None:
        if not any(pads[:2]):
            return None
        state = _state_of(x, states, -1)
        if state is None:
            return None
    k = -state.dim - 1
    if len(pads) <= 2 * k:
        return state
    left, right = pads[2 * k], pads[2 * k + 1] if len(pads) > 2 * k + 1 else 0
    cols = list(state.cols)[max(-left, 0):len(state.cols) + min(right, 0)]
    cols = [_ZERO] * max(left, 0) + cols + [_ZERO] * max(right, 0)
    return _tracked(dataclasses.replace(state, cols=tuple(cols)))


def _tracked(state: Optional[_Cols]) -> Optional[_Cols]:
    """Stop tracking a value whose columns are its own, in order: from there on it is an ordinary tensor.  A
    value holding pad zeros or shifted columns stays tracked (and keeps the kernel it derives from)."""
    if state is None or state.cols == tuple(range(len(state.cols))):
        return None
    return state


def _check_padding(gm: torch.fx.GraphModule) -> None:
    """Follow the padding columns of every padded kernel output: they may take any route through elementwise
    ops, views, pads, slices and concatenations, but must be sliced away before the value reaches anything
    else (the graph output, a matmul, a reduction, another kernel) and must never line up a padded
    tensor's columns with shifted ones."""
    states: dict = {}
    for node in gm.graph.nodes:
        try:
            if node.op == "output":
                for arg in node.all_input_nodes:
                    if arg in states and states[arg].padded:
                        raise _Escape(node, states[arg], f"reaches the graph output as {arg.name}")
                continue
            if node.target is KERNEL_OP:
                for arg in node.all_input_nodes:  # pad zeros may go in (the lowering's own pad), padding may not
                    if arg in states and states[arg].padded:
                        raise _Escape(node, states[arg], f"feeds it to a kernel as {arg.name}")
                info = _sizes(node)
                _check_kernel_input(node, states, info)
                if info["hidden"] != info["hidden_padded"]:
                    cols = tuple(range(info["hidden"])) + (_PAD,) * (info["hidden_padded"] - info["hidden"])
                    states[node] = _Cols(-1, cols, node)
                continue
            state = _transfer(node, states)
            if state is not None:
                states[node] = state
        except _Escape as esc:
            kernel = esc.state.kernel
            info = _sizes(kernel)
            user = esc.node
            where = f"{user.name} ({user.target if user.op == 'call_function' else user.op})"
            what = ("meets columns that do not line up with its own at" if esc.shifted else
                    f"reaches, without being sliced back to the layer's hidden size {info['hidden']},")
            raise MoEShapeError(
                f"the padded output ({info['hidden_padded']} wide) of kernel node {kernel.name} {what} graph node "
                f"{where}: {esc.why}" + (f" (the layer's hidden size is {info['hidden']})" if esc.shifted else ""),
                layer=info["layer"], sizes=(info["hidden_padded"], info["hidden"]),
                source=user_source_line(user) or user_source_line(kernel)) from None


def _check_kernel_input(node: torch.fx.Node, states: dict, info: dict) -> None:
    """The kernel's hidden states must hold the layer's columns in order, then pad zeros: the weights' columns
    are those (a left pad or a shifted slice would multiply every column by another column's weights)."""
    x = node.args[0] if node.args else None
    state = states.get(x) if isinstance(x, torch.fx.Node) else None
    if state is None or state.dim != -1:
        return
    hidden, cols = info["hidden"], state.cols
    want = tuple(range(hidden))
    if cols[:hidden] != want or any(c != _ZERO for c in cols[hidden:]):
        p = next((i for i, c in enumerate(cols) if (c != i if i < hidden else c != _ZERO)), 0)
        got = "a pad zero" if cols[p] == _ZERO else f"column {cols[p]}"
        raise MoEShapeError(
            f"kernel graph node {node.name} takes hidden states {x.name} whose position {p} holds {got}, not "
            + (f"column {p}" if p < hidden else "a pad zero") + f": the kernel's input must be the layer's "
            f"{hidden} columns in order, padded with zeros on the right to {info['hidden_padded']}",
            layer=info["layer"], sizes=(info["hidden_padded"], hidden),
            source=user_source_line(x) or user_source_line(node))


def _check_invariants(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.target is FUSED_MOE:
            raise MoEShapeError(f"FusedMoE node {node.name} reached verification unlowered; the lowering pass "
                                "must run before verification", layer=layer_name(node), source=user_source_line(node))
    _check_padding(gm)


def verify_graph(gm: torch.fx.GraphModule) -> None:
    """Raise :class:`MoEShapeError` if the graph lets a padded tensor meet an unpadded one (or a sharded
    layer's partial output meet a full one)."""
    from moe_passes.passes.combine_parallel import check_parallel_invariants

    _propagate(gm)
    _check_invariants(gm)
    check_parallel_invariants(gm)


class VerifyMoEShapes(GraphPass):
    name = "verify_moe_shapes"
    # the op fakes and the contract decide what propagation accepts; the parallel invariants live there
    depends_on = ("moe_passes.ops", "moe_passes.contract", "moe_passes.passes.lower_fused_moe",
                  "moe_passes.passes.combine_parallel")

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        verify_graph(gm)
        kernels = sum(1 for n in gm.graph.nodes if n.target is KERNEL_OP)
        return PassResult(changed=False, matches=kernels)
