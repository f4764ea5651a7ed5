"""Lower each FusedMoE node into explicit, kernel-ready graph nodes.

Before (``H = 2688``, a TRTLLM-aligned kernel pads to ``Hp = 2816``)::

    routed = moe_nvfp4.fused_moe(x, logits, w13, ..., hidden_size=2688, ...)      # [T, 2688]
    out = aten.add.Tensor(routed, shared)                                        # [T, 2688]

After::

    x_p = aten.constant_pad_nd.default(x, [0, 128], 0.0)                         # [T, 2816]
    y_p = moe_nvfp4.trtllm_nvfp4_moe(x_p, logits, w13, ..., kernel, layer)        # [T, 2816]
    routed = aten.slice.Tensor(y_p, 1, 0, 2688)                                  # [T, 2688]
    out = aten.add.Tensor(routed, shared)                                        # [T, 2688]

When ``H`` is already aligned (``H == Hp``, e.g. 2048) there is no pad and no slice::

    routed = moe_nvfp4.trtllm_nvfp4_moe(x, logits, w13, ..., kernel, layer)      # [T, 2048]

The shared-expert add is untouched and so stays in the unpadded domain.  Each new node inherits the
FusedMoE node's metadata (source line, module stack), and the kernel node records the layer's sizes in
``meta["moe_nvfp4"]`` for the verifier.
"""

from __future__ import annotations

import re

import torch
import torch.fx

from moe_passes.errors import MoEConfigError
from moe_passes.ops import FUSED_MOE, KERNEL_OP
from moe_passes.passes.manager import GraphPass, PassResult

__all__ = ["LowerFusedMoE", "layer_name", "MOE_META", "LOWERED", "bind_args", "set_fake_value", "inherited_meta"]

aten = torch.ops.aten
MOE_META = "moe_nvfp4"
# The pad and the slice this pass makes say so ("pad" / "slice"): later passes must not take a user's own pad or
# slice of the same op for them.
LOWERED = "moe_nvfp4_lowered"
_DYNAMO_PREFIX = re.compile(r"^L\['[^']*'\]\.?|^L__self___?")
_DYNAMO_GLOBAL = re.compile(r"^G\['([^']*)'\]")  # a module-level model: its variable's name leads the path


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return _DYNAMO_PREFIX.sub("", _DYNAMO_GLOBAL.sub(r"\1", str(path))) or "<root>"


def layer_name(node: torch.fx.Node) -> str:
    """The user-facing name of the MoE layer behind ``node``: its given name, else its module path."""
    named = node.kwargs.get("layer")
    if named is None and node.target in (FUSED_MOE, KERNEL_OP):
        schema_names = [a.name for a in node.target._schema.arguments]
        if "layer" in schema_names and len(node.args) > schema_names.index("layer"):
            named = node.args[schema_names.index("layer")]
    return named or _module_path(node) or node.name


def bind_args(node: torch.fx.Node) -> dict:
    """A MoE op node's arguments by schema name, defaults filled in."""
    names = [a.name for a in node.target._schema.arguments]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    for a in node.target._schema.arguments:
        if a.name not in bound and a.has_default_value():
            bound[a.name] = a.default_value
    return bound


class LowerFusedMoE(GraphPass):
    name = "lower_fused_moe"
    depends_on = ("moe_passes.ops", "moe_passes.contract")  # the ops it emits and the padded sizes

    def run(self, gm: torch.fx.GraphModule) -> PassResult:
        graph, count = gm.graph, 0
        kernel_args = [a.name for a in KERNEL_OP._schema.arguments]
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not FUSED_MOE:
                continue
            bound = bind_args(node)
            x, hidden = bound["hidden_states"], bound["hidden_size"]
            w2 = bound["w2"]
            hidden_padded = w2.meta["val"].shape[1] if isinstance(w2, torch.fx.Node) and "val" in w2.meta else None
            if hidden_padded is None:
                raise MoEConfigError(f"{node.format_node()}: w2 carries no fake value; lowering runs on the ATen "
                                     "graph the backend traces (see moe_passes.testing.trace)")
            layer = layer_name(node)
            bound["layer"] = layer
            with graph.inserting_before(node):
                if hidden_padded != hidden:
                    x = graph.call_function(aten.constant_pad_nd.default, (x, [0, hidden_padded - hidden], 0.0))
                    x.meta.update(inherited_meta(node))
                    x.meta[LOWERED] = "pad"
                bound["hidden_states"] = x
                kernel = graph.call_function(KERNEL_OP, tuple(bound[a] for a in kernel_args))
                kernel.meta.update(inherited_meta(node))
                kernel.meta[MOE_META] = {"layer": layer, "hidden": hidden, "hidden_padded": hidden_padded}
                out = kernel
                if hidden_padded != hidden:
                    out = graph.call_function(aten.slice.Tensor, (kernel, 1, 0, hidden))
                    out.meta.update(inherited_meta(node))
                    out.meta[LOWERED] = "slice"
            for new in (x, kernel, out) if hidden_padded != hidden else (kernel,):
                set_fake_value(new)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            count += 1
        return PassResult(changed=count > 0, matches=count)


def set_fake_value(node: torch.fx.Node) -> None:
    """Give a new node its ``meta["val"]`` now, so later user passes can read its shape before verification."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode

    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    fake_mode = detect_fake_mode([v for v in torch.utils._pytree.tree_leaves((args, kwargs))
                                  if isinstance(v, torch.Tensor)])
    if fake_mode is None:
        return
    with enable_python_dispatcher(), fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)


def inherited_meta(node: torch.fx.Node) -> dict:
    """The metadata a node made in place of ``node`` keeps: its source line and module stack."""
    return {k: node.meta[k] for k in ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr") if k in node.meta}
