"""Combine the partial outputs of sharded MoE layers with functional collectives, visibly in the graph.

A layer sharded when it was prepared (``FusedMoE(..., parallel=ExpertParallel(group))`` or
``TensorParallel(group)``) lowers to a kernel node whose ``group_name`` argument says that its output is
this rank's partial sum.  Runs after the lowering; before (expert or tensor parallel, ``H = 2688``)::

    x_p = aten.constant_pad_nd.default(x, [0, 128], 0.0)                          # [T, 2816]
    y_p = moe_nvfp4.trtllm_nvfp4_moe(x_p, logits, ..., group_name="0", data_parallel=False)   # partial
    routed = aten.slice.Tensor(y_p, 1, 0, 2688)                                   # [T, 2688] partial
    out = aten.add.Tensor(routed, shared)                                         # full + partial: wrong

After::

    ...
    routed = aten.slice.Tensor(y_p, 1, 0, 2688)                                   # [T, 2688] partial
    r = _c10d_functional.all_reduce.default(routed, "sum", "0")
    full = _c10d_functional.wait_tensor.default(r)                                # [T, 2688] full
    out = aten.add.Tensor(full, shared)                                           # the shared expert, once

The reduction runs on the unpadded width (fewer bytes than the padded one).  With ``data_parallel`` each
rank brings its own ``T`` tokens (the same ``T`` on every rank, so every collective has a static, equal
size): the hidden states and the router logits are gathered before the pad, and the partial output is
reduce-scattered back instead of all-reduced::

    xg = wait_tensor(all_gather_into_tensor(x, W, "0"))                           # [W*T, 2688]
    lg = wait_tensor(all_gather_into_tensor(logits, W, "0"))                      # [W*T, E]
    x_p = aten.constant_pad_nd.default(xg, [0, 128], 0.0)
    y_p = moe_nvfp4.trtllm_nvfp4_moe(x_p, lg, ..., data_parallel=True)           # [W*T, 2816] partial
    routed = aten.slice.Tensor(y_p, 1, 0, 2688)
    full = wait_tensor(reduce_scatter_tensor(routed, "sum", W, "0"))              # [T, 2688] full

Each inserted node inherits the kernel node's source line and carries ``meta["moe_nvfp4_parallel"]``
(``"partial"`` before the combine, ``"full"`` after) for the verifier.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx

from moe_passes.errors import MoEConfigError
from moe_passes.ops import KERNEL_OP
from moe_passes.passes.lower_fused_moe import (LOWERED, MOE_META, bind_args, inherited_meta, layer_name,
                                               set_fake_value)
from moe_passes.passes.manager import GraphPass, PassResult

__all__ = ["CombineParallelMoE", "PARALLEL_META", "check_parallel_invariants"]

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
PARALLEL_META = "moe_nvfp4_parallel"


def _partial_group(node: torch.fx.Node) -> tuple[str, bool]:
    bound = bind_args(node)
    return bound.get("group_name") or "", bool(bound.get("data_parallel"))


def _routed_output(kernel: torch.fx.Node) -> torch.fx.Node:
    """The slice back to ``H`` when the lowering made one (by its tag: a user's own slice of the output is not it),
    else the kernel node itself."""
    users = list(kernel.users)
    if len(users) == 1 and users[0].meta.get(LOWERED) == "slice":
        return users[0]
    return kernel


def _lowered_pad(value) -> Optional[torch.fx.Node]:
    """``value`` when it is the lowering's pad of the activations (not a user's pad), else None."""
    return value if isinstance(value, torch.fx.Node) and value.meta.get(LOWERED) == "pad" else None


class CombineParallelMoE(GraphPass):
    """``parallel``: the backend's option (``ExpertParallel`` / ``TensorParallel``); every sharded layer must
    use its group.  None (tests of the pass) combines whatever the layers were sharded over."""

    name = "combine_parallel_moe"

    def __init__(self, parallel: Optional[object] = None):
        super().__init__()
        self.parallel = parallel

    depends_on = ("moe_passes.ops", "moe_passes.parallel")

    def cache_state(self):
        # The compiled code differs per rank (the experts' offsets) and per group: all go into the cache key.
        return self.parallel.describe() if self.parallel is not None else "from the graph"

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        from moe_passes.parallel import group_size

        graph, count = gm.graph, 0
        for kernel in list(graph.find_nodes(op="call_function", target=KERNEL_OP)):
            group, dp = _partial_group(kernel)
            if not group or kernel.meta.get(PARALLEL_META) == "partial":
                continue
            if self.parallel is not None and group != self.parallel.group_name:
                raise MoEConfigError(f"MoE layer {layer_name(kernel)!r} is sharded over process group {group!r}, "
                                     f"but the backend was given parallel={self.parallel.describe()}")
            world = group_size(group)
            inherited = inherited_meta(kernel)
            new_nodes = []

            def add(target, args, tag, before=None, after=None):
                ctx = graph.inserting_before(before) if before is not None else graph.inserting_after(after)
                with ctx:
                    node = graph.call_function(target, args)
                node.meta.update(inherited)
                node.meta[PARALLEL_META] = tag
                new_nodes.append(node)
                return node

            if dp:
                bound = bind_args(kernel)
                x, logits = bound["hidden_states"], bound["router_logits"]
                # Gather the unpadded activations (fewer bytes), i.e. before the lowering's pad.
                pad = _lowered_pad(x)
                src = pad.args[0] if pad is not None else x
                anchor = pad if pad is not None else kernel
                for value, consumer in ((src, pad if pad is not None else kernel), (logits, kernel)):
                    gathered = add(c10d.all_gather_into_tensor.default, (value, world, group), "gathered",
                                   before=anchor)
                    waited = add(c10d.wait_tensor.default, (gathered,), "gathered", before=anchor)
                    consumer.replace_input_with(value, waited)
            routed = _routed_output(kernel)
            for node in (kernel, routed):
                node.meta[PARALLEL_META] = "partial"
            if dp:
                reduced = add(c10d.reduce_scatter_tensor.default, (routed, "sum", world, group), "partial",
                              after=routed)
            else:
                reduced = add(c10d.all_reduce.default, (routed, "sum", group), "partial", after=routed)
            full = add(c10d.wait_tensor.default, (reduced,), "full", after=reduced)
            routed.replace_all_uses_with(full, delete_user_cb=lambda user: user is not reduced)
            info = dict(kernel.meta.get(MOE_META) or {})
            info.update(group=group, world_size=world, data_parallel=dp)
            kernel.meta[MOE_META] = info
            # New fake values in graph order (with data_parallel the pad and the kernel see more tokens now).
            stale = set(new_nodes) | ({pad, kernel, routed} if dp else set())
            for node in [n for n in graph.nodes if n in stale]:
                set_fake_value(node)
            count += 1
        return PassResult(changed=count > 0, matches=count)


def _known(cond) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(cond))


def _fail(message: str, kernel: torch.fx.Node, at: torch.fx.Node, sizes=None):
    from moe_passes.errors import MoEShapeError
    from moe_passes.passes.verify import user_source_line

    raise MoEShapeError(message, layer=layer_name(kernel), sizes=sizes,
                        source=user_source_line(at) or user_source_line(kernel))


def _val_shape(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _gathered_input(kernel: torch.fx.Node, value, world: int, group: str) -> bool:
    # data_parallel: the input must come (through the pad, for the activations) from an all-gather of `group`.
    if _lowered_pad(value) is not None:
        value = value.args[0]
    if not (isinstance(value, torch.fx.Node) and value.target is c10d.wait_tensor.default):
        return False
    gather = value.args[0]
    return (gather.target is c10d.all_gather_into_tensor.default and gather.args[1] == world
            and gather.args[2] == group)


def check_parallel_invariants(gm: torch.fx.GraphModule) -> None:
    """No partial (pre-combine) MoE output meets a full one, and every combine has the right group and shapes.

    For each kernel node marked partial by its ``group_name`` argument: its routed output (the slice back to
    ``H``, or the kernel itself when unpadded) is used only by one ``all_reduce`` (``reduce_scatter_tensor``
    with ``data_parallel``) summing over that group, on the layer's unpadded width, followed by its
    ``wait_tensor`` whose shape is the layer's ``[T, H]``; with ``data_parallel`` both kernel inputs are
    all-gathered over the group.  Raises :class:`MoEShapeError` otherwise (the same bug class as a padded
    output meeting an unpadded one: the sum of one rank's experts is not the layer's output).
    """
    from moe_passes.parallel import group_size

    for kernel in gm.graph.find_nodes(op="call_function", target=KERNEL_OP):
        group, dp = _partial_group(kernel)
        if not group:
            continue
        world = group_size(group)
        routed = _routed_output(kernel)
        hidden = (kernel.meta.get(MOE_META) or {}).get("hidden") or _val_shape(routed)[-1]
        expected = c10d.reduce_scatter_tensor.default if dp else c10d.all_reduce.default
        users = list(routed.users)
        bad = [u for u in users if u.target is not expected]
        if bad or len(users) != 1:
            at = bad[0] if bad else (users[1] if users else routed)
            _fail(f"the partial output of kernel node {kernel.name} (this rank's share of process group {group!r}) "
                  f"reaches {at.name} ({at.target if at.op == 'call_function' else at.op}) without being combined: "
                  f"it must go through exactly one {expected.name()} over the group before meeting any other tensor "
                  f"(compile a sharded model with options={{'parallel': <its ExpertParallel / TensorParallel>}})",
                  kernel, at)
        reduce = users[0]
        op_args = reduce.args[1:]
        want = ("sum", world, group) if dp else ("sum", group)
        if tuple(op_args) != want:
            _fail(f"collective {reduce.name} combines the partial output of kernel node {kernel.name} with arguments "
                  f"{tuple(op_args)}, expected {want}", kernel, reduce)
        waits = list(reduce.users)
        if len(waits) != 1 or waits[0].target is not c10d.wait_tensor.default:
            _fail(f"collective {reduce.name} of kernel node {kernel.name} must be waited on exactly once "
                  f"(wait_tensor) before its result is used", kernel, reduce)
        in_shape, out_shape = _val_shape(routed), _val_shape(waits[0])
        if in_shape is None or out_shape is None or len(in_shape) != 2 or not _known(in_shape[1] == hidden):
            _fail(f"collective {reduce.name} of kernel node {kernel.name} reduces a tensor of shape {in_shape}, "
                  f"expected [tokens, {hidden}] (the layer's unpadded width)", kernel, reduce,
                  sizes=(in_shape[-1] if in_shape else None, hidden))
        rows = in_shape[0] // world if dp else in_shape[0]
        if not (_known(out_shape[0] == rows) and _known(out_shape[1] == hidden)) or (dp and not _known(
                in_shape[0] % world == 0)):
            _fail(f"collective {reduce.name} of kernel node {kernel.name} turns {in_shape} into {out_shape}, "
                  f"expected [{rows}, {hidden}]", kernel, reduce)
        if dp:
            bound = bind_args(kernel)
            for arg in ("hidden_states", "router_logits"):
                if not _gathered_input(kernel, bound[arg], world, group):
                    _fail(f"data-parallel kernel node {kernel.name} takes {arg} that were not all-gathered over "
                          f"process group {group!r}: its rows would not be the tokens the reduce-scatter returns",
                          kernel, kernel)
