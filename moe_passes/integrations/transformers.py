"""Replace the MoE blocks of Hugging Face transformers models with NVFP4 FusedMoE layers.

``convert(model)`` walks the model, finds every MoE block, and swaps each supported one for a
:class:`TransformersMoE` adapter that keeps the original router (the gate module computes the router
logits, exactly as before) and the shared experts, and runs the routed experts as one
:class:`~moe_passes.FusedMoE` (weights quantized to NVFP4 once, at conversion).  A block is converted
completely or not at all: every check runs before anything in the model changes, and a block that
fails one is left as it was, with the reason logged and recorded in the returned
:class:`ConversionReport`.

Supported (transformers 5.x, expert weights as fused 3-D parameters):

============================  ==============================================  =====================
block                         routing in transformers                         FusedMoE routing
============================  ==============================================  =====================
``MixtralSparseMoeBlock``     softmax -> top-k -> renormalize                 ``renormalize``
``Qwen3MoeSparseMoeBlock``    softmax -> top-k (-> renormalize if             ``renormalize``
``Qwen2MoeSparseMoeBlock``    ``norm_topk_prob``); Qwen2-MoE adds a           (``default`` when
                              sigmoid-gated shared expert                     ``norm_topk_prob`` off)
``DeepseekV3MoE``             sigmoid + correction bias, top-2-sum group      ``deepseek_v3``
``Glm4MoeMoE``, ``Dots1MoE``  selection, normalize, routed scaling factor;    (only with
                              shared experts added                            ``norm_topk_prob``)
============================  ==============================================  =====================

Softmax is monotonic, so "softmax, top-k, renormalize" picks the same experts with the same weights
as "top-k on the logits, softmax over them" (the ``renormalize`` method).  DeepSeek-style routers
without ``norm_topk_prob`` have no FusedMoE routing method (the kernel always normalizes) and are
left alone.  Any other module holding an ``experts`` child is reported as unsupported.

The adapter takes the block's ``[B, S, H]`` input in the model's dtype, runs the routed experts in
bfloat16 (the kernels' activation dtype) on ``[T, H]``, runs the shared expert on the unrounded input
in the model's dtype, adds the two in that dtype, and returns the block's original convention
(``[B, S, H]`` in the input dtype).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moe_passes.errors import MoEError
from moe_passes.kernels.reference import apply_activation
from moe_passes.layer import FusedMoE

__all__ = ["convert", "ConversionReport", "ConvertedBlock", "SkippedBlock", "TransformersMoE", "SharedExpert",
           "expert_weights", "FAMILIES"]

logger = logging.getLogger(__name__)


# -- what each supported block looks like ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """How one transformers MoE block class maps onto FusedMoE."""

    name: str
    router: str                      # "softmax_topk" or "deepseek"
    shared: Optional[str] = None     # attribute holding the shared expert(s)
    shared_gate: Optional[str] = None  # attribute of a per-token sigmoid gate on the shared expert
    always_renormalize: bool = False  # the router renormalizes regardless of config (Mixtral)


FAMILIES: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family("mixtral", "softmax_topk", always_renormalize=True),
    "Qwen3MoeSparseMoeBlock": Family("qwen3_moe", "softmax_topk"),
    "Qwen2MoeSparseMoeBlock": Family("qwen2_moe", "softmax_topk", shared="shared_expert",
                                     shared_gate="shared_expert_gate"),
    "DeepseekV3MoE": Family("deepseek_v3", "deepseek", shared="shared_experts"),
    "Glm4MoeMoE": Family("glm4_moe", "deepseek", shared="shared_experts"),
    "Dots1MoE": Family("dots1", "deepseek", shared="shared_experts"),
}

# Router classes whose forward we have read and mapped (the routing semantics are pinned to them).
_ROUTERS = {
    "softmax_topk": ("MixtralTopKRouter", "Qwen3MoeTopKRouter", "Qwen2MoeTopKRouter"),
    "deepseek": ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter", "Dots1TopkRouter"),
}


class _Unsupported(Exception):
    """A block cannot be converted; the message is the reason reported to the user."""


# -- report ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvertedBlock:
    name: str
    block: str
    family: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    activation: str
    routing: str
    shared_expert: bool
    kernel: str


@dataclasses.dataclass(frozen=True)
class SkippedBlock:
    name: str
    block: str
    reason: str


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did: every MoE block found is in exactly one of the two lists."""

    converted: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"moe_nvfp4 conversion: {len(self.converted)} MoE block(s) converted, {len(self.skipped)} left alone"]
        for c in self.converted:
            lines.append(f"  converted {c.name} ({c.block}): {c.experts} experts, top-{c.top_k}, {c.activation}, "
                         f"routing={c.routing}{', shared expert' if c.shared_expert else ''}, kernel={c.kernel}")
        for s in self.skipped:
            lines.append(f"  left alone {s.name} ({s.block}): {s.reason}")
        return "\n".join(lines)


# -- the adapter ------------------------------------------------------------------------------------------
class SharedExpert(nn.Module):
    """The shared expert of a block on ``[T, H]``; ``gate`` (Qwen2-MoE) scales its output per token by
    ``sigmoid(gate(x))``."""

    def __init__(self, expert: nn.Module, gate: Optional[nn.Module] = None):
        super().__init__()
        self.expert = expert
        self.gate = gate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.expert(hidden_states)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(hidden_states)) * out
        return out


class TransformersMoE(nn.Module):
    """Drop-in replacement of a transformers MoE block: ``[B, S, H]`` (any float dtype) in and out.

    ``gate`` is the block's original router module (its first output is the router logits);
    ``moe`` the FusedMoE holding the NVFP4 routed experts; ``shared_expert`` (a :class:`SharedExpert`)
    runs on the block's input in the model's own dtype and is added to the routed output, exactly as the
    original block adds it (in the compiled graph that add follows the routed output's slice back to
    ``H``, where the verifier checks it like any other use).
    """

    def __init__(self, gate: nn.Module, moe: FusedMoE, *, shared_expert: Optional[nn.Module] = None,
                 returns_router_logits: bool = False, family: str = ""):
        super().__init__()
        self.gate = gate
        self.moe = moe
        self.shared_expert = shared_expert
        self.returns_router_logits = returns_router_logits
        self.family = family

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        if isinstance(router_logits, (tuple, list)):
            router_logits = router_logits[0]
        out = self.moe(x.to(torch.bfloat16), router_logits).to(hidden_states.dtype)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        out = out.reshape(shape)
        if self.returns_router_logits:
            return out, router_logits
        return out

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


# -- reading transformers expert weights ------------------------------------------------------------------
def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # older transformers: no pluggable gate at all
        return None
    return default


def _activation_of(experts: nn.Module, gated: bool) -> str:
    act = getattr(experts, "act_fn", None)
    kind = type(act).__name__
    if gated:
        if kind in ("SiLUActivation", "SiLU"):
            return "silu"
        if kind == "GELUActivation" and getattr(act, "act", None) in (F.gelu, None):
            return "gelu"
        if kind == "GELUTanh" or kind == "NewGELUActivation":
            return "gelu_tanh"
        raise _Unsupported(f"gated expert activation {kind} has no FusedMoE equivalent "
                           "(supported: SiLU, GELU (erf), GELU (tanh))")
    if kind == "ReLUSquaredActivation":
        return "relu2"
    raise _Unsupported(f"non-gated expert activation {kind} has no FusedMoE equivalent (supported: relu2)")


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(w13 [E, 2I, H] gate rows then up rows (or [E, I, H]), w2 [E, H, I], activation)`` of a
    transformers 5.x experts module (fused 3-D parameters, ``@use_experts_implementation`` flags)."""
    flags = {k: getattr(experts, k, None) for k in ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                                                     "has_post_expert_norm")}
    if flags["has_gate"] is None:
        raise _Unsupported(f"experts module {type(experts).__name__} does not store fused 3-D expert weights "
                           "(no @use_experts_implementation layout flags)")
    if flags["has_bias"]:
        raise _Unsupported("experts carry biases; FusedMoE experts have none")
    if flags["has_post_expert_norm"]:
        raise _Unsupported("experts apply a post-expert norm; FusedMoE has no such step")
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate is not _default_apply_gate():
        raise _Unsupported(f"{type(experts).__name__} overrides the gated activation (_apply_gate)")
    gated = bool(flags["has_gate"])
    w13 = getattr(experts, "gate_up_proj" if gated else "up_proj", None)
    w2 = getattr(experts, "down_proj", None)
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor) or w13.ndim != 3 or w2.ndim != 3:
        raise _Unsupported("expert weights are not 3-D tensors named gate_up_proj/up_proj and down_proj")
    w13, w2 = w13.detach(), w2.detach()
    if flags["is_transposed"]:  # stored [E, H, 2I] and [E, I, H]
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    if gated and flags["is_concatenated"] is False:  # interleaved rows gate0, up0, gate1, up1, ...
        w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1)
    activation = _activation_of(experts, gated)
    return w13.contiguous(), w2.contiguous(), activation


@torch.no_grad()
def _check_layout(experts: nn.Module, w13: torch.Tensor, w2: torch.Tensor, activation: str) -> None:
    """Run the original experts on a few random tokens, every expert with weight 1, and compare with
    the float computation on the extracted ``w13`` / ``w2``: catches a misread layout before conversion."""
    num_experts, _, hidden = w13.shape
    dtype = w13.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, hidden, generator=gen).to(device=w13.device, dtype=dtype)
    index = torch.arange(num_experts, device=w13.device).expand(3, num_experts).contiguous()
    weights = torch.ones(3, num_experts, device=w13.device, dtype=dtype)
    got = experts(x, index, weights).float()
    want = torch.zeros(3, hidden, device=w13.device)
    for e in range(num_experts):
        want += apply_activation(x.float() @ w13[e].float().t(), activation) @ w2[e].float().t()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    err = (got - want).norm() / want.norm().clamp_min(1e-30)
    if not bool(err <= tol):
        raise _Unsupported(f"the experts' forward disagrees with the weight layout read from them "
                           f"(relative error {float(err):.3g} > {tol}); refusing to convert a misread layout")


# -- routing ------------------------------------------------------------------------------------------------
def _routing_of(family: Family, gate: nn.Module, num_experts: int) -> dict:
    allowed = _ROUTERS[family.router]
    if type(gate).__name__ not in allowed:
        raise _Unsupported(f"router {type(gate).__name__} is not one whose semantics were mapped ({', '.join(allowed)})")
    top_k = int(gate.top_k)
    if getattr(gate, "num_experts", num_experts) != num_experts:
        raise _Unsupported(f"router scores {gate.num_experts} experts but the experts module holds {num_experts}")
    if family.router == "softmax_topk":
        renorm = family.always_renormalize or bool(getattr(gate, "norm_topk_prob", False))
        return dict(top_k=top_k, routing="renormalize" if renorm else "default")
    if not getattr(gate, "norm_topk_prob", True):
        raise _Unsupported("DeepSeek-style routing with norm_topk_prob=False: the kernel's DeepSeekV3 routing "
                           "always normalizes the top-k weights, and no other routing method matches")
    bias = getattr(gate, "e_score_correction_bias", None)
    return dict(top_k=top_k, routing="deepseek_v3", n_group=int(gate.num_group), topk_group=int(gate.topk_group),
                routed_scaling_factor=float(gate.routed_scaling_factor),
                routing_bias=None if bias is None else bias.detach().float().clone())


# -- calibration ------------------------------------------------------------------------------------------
def _collect_calibration(model: nn.Module, blocks: dict[str, nn.Module], calibration) -> dict[str, torch.Tensor]:
    """Run ``calibration`` through the model and keep each block's input hidden states ``[N, H]``."""
    seen: dict[str, list] = {name: [] for name in blocks}
    hooks = []
    for name, block in blocks.items():
        def hook(_module, args, kwargs, name=name):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[name].append(x.detach().reshape(-1, x.shape[-1]).float())
        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            if callable(calibration):
                calibration(model)
            elif isinstance(calibration, dict):
                model(**calibration)
            else:
                model(calibration)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items() if xs}


# -- conversion -------------------------------------------------------------------------------------------
def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE blocks: supported classes, and any other module with an ``experts`` child (outermost only)."""
    found, claimed = [], []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        if isinstance(module, TransformersMoE):
            claimed.append(name)
            continue
        if type(module).__name__ in FAMILIES or isinstance(getattr(module, "experts", None), nn.Module):
            found.append((name, module))
            claimed.append(name)
    return found


def _build(name: str, block: nn.Module, *, calibration: Optional[torch.Tensor], kernel: Optional[str],
           check_layout: bool, parallel=None) -> tuple[TransformersMoE, ConvertedBlock]:
    family = FAMILIES.get(type(block).__name__)
    if family is None:
        raise _Unsupported(f"no FusedMoE mapping for block class {type(block).__name__} "
                           f"(supported: {', '.join(sorted(FAMILIES))})")
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if not isinstance(gate, nn.Module) or not isinstance(experts, nn.Module):
        raise _Unsupported("block has no gate/experts submodules")
    if getattr(experts, "_is_expert_parallel", False):
        raise _Unsupported("experts are expert-parallel (sharded); convert the unsharded model")
    w13, w2, activation = expert_weights(experts)
    routing = _routing_of(family, gate, w13.shape[0])
    if check_layout:
        _check_layout(experts, w13, w2, activation)
    shared = None
    if family.shared is not None:
        expert = getattr(block, family.shared, None)
        shared_gate = getattr(block, family.shared_gate) if family.shared_gate else None
        if not isinstance(expert, nn.Module) or (family.shared_gate and not isinstance(shared_gate, nn.Module)):
            raise _Unsupported(f"block lacks its shared expert {family.shared!r}")
        shared = SharedExpert(expert, shared_gate)
    try:
        moe = FusedMoE.from_float(w13, w2, activation=activation, calibration=calibration,
                                  kernel=kernel, name=name, parallel=parallel, **routing)
    except MoEError as exc:
        raise _Unsupported(f"FusedMoE rejected the layer: {exc}") from exc
    adapter = TransformersMoE(gate, moe, shared_expert=shared, family=family.name)
    info = ConvertedBlock(name=name, block=type(block).__name__, family=family.name, experts=w13.shape[0],
                          top_k=routing["top_k"], hidden=w13.shape[2], intermediate=w2.shape[2],
                          activation=activation, routing=routing["routing"], shared_expert=shared is not None,
                          kernel=moe.kernel)
    return adapter, info


def convert(model: nn.Module, *, calibration: Union[None, torch.Tensor, dict, Callable[[nn.Module], Any]] = None,
            kernel: Optional[str] = None, check_layout: bool = True,
            include: Optional[Callable[[str, nn.Module], bool]] = None, parallel=None) -> ConversionReport:
    """Replace the supported MoE blocks of ``model`` in place with NVFP4 :class:`TransformersMoE` adapters.

    ``calibration``: input ids ``[B, S]``, a dict of model keyword arguments, or a callable
    ``fn(model)`` that runs forward passes; each block's inputs then set its static activation scales
    (without it FusedMoE assumes an activation amax, see ``layer.DEFAULT_ACTIVATION_AMAX``).
    ``kernel``: force a registered kernel (default: the best one for the weights' device).
    ``check_layout``: before converting a block, check its experts' forward against the weight layout read
    from it.  ``include(name, block)``: convert only the blocks it accepts (others are reported as skipped).
    ``parallel``: shard every converted layer (``moe_passes.parallel.ExpertParallel`` / ``TensorParallel``);
    every rank converts the same unsharded model and keeps its own shard.

    Returns a :class:`ConversionReport`; it is also logged (INFO), each skipped block with its reason (WARNING).
    """
    report = ConversionReport()
    blocks = _find_blocks(model)
    candidates: dict[str, nn.Module] = {}
    for name, block in blocks:
        if include is not None and not include(name, block):
            report.skipped.append(SkippedBlock(name, type(block).__name__, "excluded by include="))
        else:
            candidates[name] = block
    calib = _collect_calibration(model, candidates, calibration) if calibration is not None else {}
    replacements = []
    for name, block in candidates.items():
        try:
            adapter, info = _build(name, block, calibration=calib.get(name), kernel=kernel, check_layout=check_layout,
                                   parallel=parallel)
        except _Unsupported as exc:
            report.skipped.append(SkippedBlock(name, type(block).__name__, str(exc)))
            logger.warning("moe_nvfp4: left %s (%s) unconverted: %s", name, type(block).__name__, exc)
            continue
        replacements.append((name, adapter))
        report.converted.append(info)
    # Swap only once every block is built: an error above never leaves the model half-converted.
    for name, adapter in replacements:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, adapter)
    if not blocks:
        logger.info("moe_nvfp4: no MoE blocks found in %s", type(model).__name__)
    else:
        logger.info("%s", report)
    return report
