"""Prove, before anything runs, that no padded tensor meets an unpadded one.

Runs last and always.  Two checks:

1. Fake-tensor propagation over the whole graph in the graph's own fake mode (symbolic token counts
   stay symbolic).  The kernel op's fake function checks its inputs against the shape contract, and
   every other op checks its own shapes; any failure becomes a :class:`MoEShapeError` naming the node,
   the MoE layer upstream of it, the sizes involved and the user's source line.
2. Explicit invariants the fake shapes cannot see: every FusedMoE node was lowered, and a kernel output
   padded wider than its layer is consumed only by a slice back to the layer's width along the hidden
   dimension.  This catches e.g. a padded output that reaches the graph output, or one broadcast
   against a ``[T, 1]`` tensor, where shapes alone would not complain.

Example of a caught bug (an extra pass dropped the slice)::

    y_p = moe_nvfp4.trtllm_nvfp4_moe(x_p, ...)     # [T, 2816]
    out = aten.add.Tensor(y_p, shared)             # [T, 2816] + [T, 2688]  -> MoEShapeError
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import moe_passes
from moe_passes import kernels
from moe_passes.errors import MoEError, MoEShapeError
from moe_passes.ops import FUSED_MOE, KERNEL_OP
from moe_passes.passes.lower_fused_moe import MOE_META, layer_name
from moe_passes.passes.manager import GraphPass, PassResult

__all__ = ["VerifyMoEShapes", "verify_graph", "user_source_line"]

aten = torch.ops.aten
# Frames in these trees are ours or torch's, never the user's line (kernels/ installs apart from moe_passes/).
# kernels is a namespace package (no __file__): take each package's folder from __path__.
_NOT_USER_CODE = tuple(os.path.abspath(path) + os.sep for m in (moe_passes, kernels, torch) for path in m.__path__)
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
    if kernels:
        info = _sizes(kernels[0])
        layer = info["layer"]
        sizes = (info["hidden_padded"], info["hidden"])
        widths = {s[-1] for _, s in shapes if s}
        other = sorted(w for w in widths if w != info["hidden_padded"])
        if node.target is not KERNEL_OP and info["hidden_padded"] in widths and other:
            sizes = (info["hidden_padded"], other[0])
    if isinstance(exc, MoEShapeError):
        message = f"graph node {node.name} ({node.target}): {exc.args[0].splitlines()[0]}"
        sizes = exc.sizes or sizes
    else:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = (f"graph node {node.name} ({node.target}) cannot combine its inputs "
                   + ", ".join(f"{n} {s}" for n, s in shapes) + f": {detail}")
        if sizes and sizes[0] != sizes[1]:
            message += (f"\n  a routed-expert output padded to {sizes[0]} meets a tensor of width {sizes[1]}: "
                        f"slice the kernel output back to the layer's hidden size before combining it")
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
    with enable_python_dispatcher():
        _Prop(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)


def _check_invariants(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.target is FUSED_MOE:
            raise MoEShapeError(f"FusedMoE node {node.name} reached verification unlowered; the lowering pass "
                                "must run before verification", layer=layer_name(node), source=user_source_line(node))
        if node.target is not KERNEL_OP:
            continue
        info = _sizes(node)
        hidden, padded = info["hidden"], info["hidden_padded"]
        if hidden == padded:
            continue
        for user in node.users:
            ok = (user.target is aten.slice.Tensor and len(user.args) >= 4 and user.args[1] in (1, -1)
                  and user.args[2] == 0 and user.args[3] == hidden
                  and (len(user.args) < 5 or user.args[4] == 1))
            if not ok:
                raise MoEShapeError(
                    f"the padded output ({padded} wide) of kernel node {node.name} reaches {user.name} "
                    f"({user.target if user.op == 'call_function' else user.op}) without being sliced back to the "
                    f"layer's hidden size {hidden}", layer=info["layer"], sizes=(padded, hidden),
                    source=user_source_line(user) or user_source_line(node))


def verify_graph(gm: torch.fx.GraphModule) -> None:
    """Raise :class:`MoEShapeError` if the graph lets a padded tensor meet an unpadded one."""
    _propagate(gm)
    _check_invariants(gm)


class VerifyMoEShapes(GraphPass):
    name = "verify_moe_shapes"

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        verify_graph(gm)
        kernels = sum(1 for n in gm.graph.nodes if n.target is KERNEL_OP)
        return PassResult(changed=False, matches=kernels)
