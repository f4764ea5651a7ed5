"""Replace the routed experts of Hugging Face transformers MoE blocks with NVFP4 FusedMoE layers.

``convert(model)`` finds MoE blocks by what they are, not by class name: a module with an ``experts``
child whose weights read as ``w13 [E, 2I | I, H]`` / ``w2 [E, H, I]`` (transformers 5 stacks them as
``gate_up_proj`` / ``up_proj`` and ``down_proj`` parameters; DBRX as 2-D ``w1`` / ``v1`` / ``w2`` in its experts'
``mlp``) and a router child (``gate`` or ``router``)
that returns ``(logits or probabilities, top-k weights, top-k ids)``, the protocol every transformers 5
block follows: ``_, w, ids = router(x); experts(x', ids, w)``.

A converted block keeps its own ``forward``: only two children change.  The router is wrapped in
:class:`RouterLogits`, which runs the original router (so router-logit recording still works) and hands
the kernel's router logits on in place of its top-k weights; the experts become a
:class:`TransformersMoE`, which runs one NVFP4 :class:`~moe_passes.FusedMoE` on those logits.  Whatever
else the block does (shared experts and their gates, latent projections, norms around the experts,
Gemma-4's MoE inside its decoder layer) stays the block's own code.

The routing is read from the router and mapped onto a kernel routing method, then checked on random
inputs against the router's own top-k weights and ids:

* routers with a correction bias (DeepSeek-V3, GLM4-MoE, dots1, NemotronH, AFMoE, MiniMax-M2, ...):
  ``deepseek_v3`` with the router's groups, bias and scale; ``norm_topk_prob=False`` is refused (the
  kernels always normalize).  A bias the block hands its router as an argument is read from the block;
* routers without one: ``renormalize`` (top-k, softmax over the k: the same experts and weights as softmax,
  top-k, renormalize) or ``default`` (softmax, top-k), a routed scale folded into ``w2`` (DeepSeek-V2);
  ``deepseek_v3`` with one group (sigmoid, normalize); ``llama4`` at top-1: whichever matches;
  ``sparsemixer`` with the router's ``router_jitter_noise`` first where it has one (PhiMoE, top-2); failing
  all, the same methods times one uniform scale no attribute names, measured and folded into ``w2`` (OpenAI's
  privacy filter divides its weights by top-k);
* a router whose first output is probabilities (Gemma-4) gives the kernel their logarithm, which routes
  identically, and one that biases softmax probabilities (ERNIE-4.5) their inverse sigmoid, on which
  ``deepseek_v3`` routes identically (:func:`kernel_logits`); a per-expert output scale (Gemma-4's
  ``per_expert_scale``) is folded into ``w2``.

A block whose experts take no routing arguments because the block scales their input by the router's
top-1 sigmoid score (Llama4) is replaced whole by :class:`InputScaledMoE`, which scales the input
itself and lets the kernel route top-1 with weight 1.  Experts with biases (gpt-oss's
``gate_up_proj_bias`` / ``down_proj_bias``) keep them as FusedMoE expert biases, and a custom gated activation
(``_apply_gate``) is read by what it does: the experts' own activation of the gate times up, gpt-oss's clamped
SwiGLU (``swiglu_oai`` with the experts' own ``alpha`` and ``limit``) or that without alpha and ``+ 1``
(``swiglu_oai`` with alpha 1, beta 0).  No match, or anything else unexpected, leaves the block alone with the
reason logged; so does any other custom gated activation.  Two more checks run
before a block is converted: the experts' own forward against the weights read (every expert at weight
1), and, where the block runs on its own, the whole block against the same block with the router and
experts replaced by a float emulation of the conversion.  A block is converted completely or not at
all, and the model changes only after every block is built.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moe_passes.contract import SwigluOAI
from moe_passes.errors import KernelUnavailableError, MoEError
from moe_passes.kernels import registry
from moe_passes.kernels.reference import apply_activation, route
from moe_passes.layer import FusedMoE

__all__ = ["convert", "ConversionReport", "ConvertedBlock", "SkippedBlock", "TransformersMoE", "RouterLogits",
           "InputScaledMoE", "expert_weights", "kernel_logits"]

logger = logging.getLogger(__name__)

_ROUTER_NAMES = ("gate", "router")


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
    # what the kernel takes of the router's scores (kernel_logits): "logits", "log_probs", "logit_of_softmax";
    # "input_scaled" for a block replaced whole (InputScaledMoE)
    router_output: str = "logits"
    expert_scale: bool = False
    expert_bias: bool = False


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


# -- what replaces the block's children (or, for Llama4, the block) ------------------------------------
class RouterLogits(nn.Module):
    """Wraps a block's router: returns its outputs with the second one (the top-k weights) replaced by the
    router logits the kernel routes on, which the block then passes to its experts (a
    :class:`TransformersMoE`).  ``scores``: what the kernel takes of the router's scores (see
    :func:`kernel_logits`): ``"logits"`` as they are, ``"log_probs"`` (the router returns probabilities: their
    logarithm, same top-k and renormalized weights), ``"logit_of_softmax"`` (a softmax router whose
    probabilities the block treats as DeepSeek-V3 treats sigmoid scores: their inverse sigmoid)."""

    def __init__(self, router: nn.Module, *, scores: str = "logits", scores_at: int = 0, log_probs: bool = False):
        super().__init__()
        self.router = router
        self.scores = "log_probs" if log_probs else scores
        self.scores_at = scores_at

    def forward(self, *args, **kwargs):
        out = self.router(*args, **kwargs)
        return (out[0], kernel_logits(out[self.scores_at], self.scores), *out[2:])

    def extra_repr(self) -> str:
        return f"scores={self.scores!r}"


def kernel_logits(scores: torch.Tensor, transform: str) -> torch.Tensor:
    """The router logits the kernel routes on, from a router's scores.  ``"log_probs"``: ``log p``, whose
    softmax is ``p`` again.  ``"logit_of_softmax"``: ``log p - log(1 - p)`` for ``p = softmax(scores)``, whose
    sigmoid is ``p`` again, so that ``deepseek_v3`` routing (sigmoid, bias, top-k, normalize) works on the
    probabilities themselves (ERNIE-4.5's router).  It is clamped to +-100 (fp32 sigmoid 1 and 4e-44), which
    only touches ``p == 1`` and ``p < 4e-44``, instead of handing the kernel infinities."""
    if transform == "logits":
        return scores
    if transform == "log_probs":
        return torch.log(scores)
    if transform == "logit_of_softmax":
        logp = torch.log_softmax(scores.float(), dim=-1)
        return (logp - torch.log1p(-logp.exp())).clamp(-100.0, 100.0)
    raise ValueError(f"unknown router score transform {transform!r}")


class TransformersMoE(nn.Module):
    """Drop-in replacement of a transformers experts module: ``experts(x [T, H], top_k_index, router_logits)``.

    The block calls its experts with the router's second output, which :class:`RouterLogits` sets to the
    router logits; ``top_k_index`` is ignored (the kernel routes).  ``moe`` (a FusedMoE) runs in
    ``compute_dtype`` (bfloat16, the kernels' activation dtype); the result is cast back to ``x``'s dtype.
    """

    def __init__(self, moe: nn.Module, *, family: str = "", compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.moe = moe
        self.family = family
        self.compute_dtype = compute_dtype

    def forward(self, hidden_states: torch.Tensor, top_k_index: Optional[torch.Tensor] = None,
                router_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        # DBRX hands its experts the block's [B, S, H] input and takes [B, S, H] back; the kernel takes [T, H]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = self.moe(x.to(self.compute_dtype), router_logits).to(hidden_states.dtype)
        return out.reshape(hidden_states.shape)

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


class _FloatMoE(nn.Module):
    """The conversion in float, unquantized: what the block must compute after conversion, up to NVFP4."""

    def __init__(self, w13, w2, activation, top_k, routing, extras: Optional["_Extras"] = None):
        super().__init__()
        self.w13, self.w2, self.activation, self.top_k, self.routing = w13.float(), w2.float(), activation, top_k, routing
        self.extras = extras or _Extras()

    def forward(self, x, router_logits):
        x = x.reshape(-1, x.shape[-1])  # TransformersMoE hands [T, H]; kept for a direct call on [B, S, H]
        weights, ids = route(router_logits.float(), self.top_k, **self.routing)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for k in range(self.top_k):
            for e in ids[:, k].unique().tolist():
                rows = (ids[:, k] == e).nonzero()[:, 0]
                h = _expert_forward(x[rows].float(), self.w13[e], self.w2[e], self.activation, self.extras, e)
                out.index_add_(0, rows, h * weights[rows, k, None])
        return out


@dataclasses.dataclass(frozen=True)
class _Extras:
    """What an experts module adds to ``w13`` / ``w2``: biases (fp32, ``[E, N1]`` gate half then up half, and
    ``[E, H]``) and the parameters of a parametric activation."""
    w13_bias: Optional[torch.Tensor] = None
    w2_bias: Optional[torch.Tensor] = None
    activation_params: Optional[SwigluOAI] = None

    @property
    def has_bias(self) -> bool:
        return self.w13_bias is not None or self.w2_bias is not None


def _expert_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str, extras: _Extras,
                    e: int) -> torch.Tensor:
    """One expert in fp32: ``act(x w13^T + b13) w2^T + b2`` (the bias of w2 before any routing weight)."""
    h = x @ w13.float().t()
    if extras.w13_bias is not None:
        h = h + extras.w13_bias[e].to(h.device)
    y = apply_activation(h, activation, extras.activation_params) @ w2.float().t()
    if extras.w2_bias is not None:
        y = y + extras.w2_bias[e].to(y.device)
    return y


class InputScaledMoE(nn.Module):
    """Replaces a whole block whose router scores multiply the experts' *input* (Llama4: top-1, sigmoid):
    ``out = shared_expert(x) + expert_e(s * x)`` with ``e`` the top logit and ``s = sigmoid(logit_e)``.

    With one expert per token the score is one scalar per token, so the input is scaled here and the
    kernel routes top-1 with weight exactly 1 (``renormalize`` over one logit): exact, and no kernel needs
    an input-scaling routing (the TRTLLM NVFP4 kernel has none).  Returns ``(out, router_logits)`` in the
    block's own shape convention, as the block did.
    """

    def __init__(self, router: nn.Module, experts: nn.Module, shared_expert: Optional[nn.Module], *,
                 family: str = ""):
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.family = family

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        scores, router_logits = self.router(x)[:2]
        # the chosen expert's sigmoid score; the others are sigmoid(-inf) = 0
        scaled = x * scores.amax(dim=-1, keepdim=True).to(x.dtype)
        out = self.experts(scaled, None, router_logits)
        if self.shared_expert is not None:
            out = self.shared_expert(x) + out
        return out, router_logits

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


# -- reading transformers expert weights ------------------------------------------------------------------
def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as default
    except ImportError:  # older transformers: no pluggable gate at all
        return None
    return default


def _activation_of(experts: nn.Module, gated: bool, act: Any = None) -> str:
    act = getattr(experts, "act_fn", None) if act is None else act
    # a module (transformers' ACT2FN), or the torch function itself (LFM2-MoE's F.silu)
    kind = {F.silu: "SiLU", F.gelu: "GELUActivation", F.relu: "ReLU"}.get(act, type(act).__name__)
    if gated:
        if kind in ("SiLUActivation", "SiLU"):
            return "silu"
        if kind == "GELUActivation" and getattr(act, "act", None) in (F.gelu, None):
            return "gelu"
        if kind in ("GELUTanh", "NewGELUActivation", "PytorchGELUTanh", "GELUPytorchTanh"):
            return "gelu_tanh"
        raise _Unsupported(f"gated expert activation {kind} has no FusedMoE equivalent "
                           "(supported: SiLU, GELU (erf), GELU (tanh))")
    if kind == "ReLUSquaredActivation":
        return "relu2"
    raise _Unsupported(f"non-gated expert activation {kind} has no FusedMoE equivalent (supported: relu2)")


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(w13 [E, 2I, H] gate rows then up rows (or [E, I, H]), w2 [E, H, I], activation)`` of a
    transformers 5.x experts module (fused 3-D parameters, ``@use_experts_implementation`` flags)."""
    if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        raise _Unsupported("experts are a list of expert modules (an older layout); only fused 3-D expert "
                           "parameters are read")
    if not _takes_routing(experts):
        raise _Unsupported("the experts' forward takes no top-k ids and weights, and the block is not an "
                           "input-scaled top-1 block")
    quantized = [n for n, t in [*experts.named_parameters(), *experts.named_buffers()]
                 if (t.dtype.is_floating_point and t.dtype.itemsize == 1) or n.endswith(("_scale_inv", "weight_scale"))]
    if quantized:
        raise _Unsupported(f"the experts hold quantized weights ({', '.join(quantized[:3])}): convert reads float "
                           "weights; load an NVFP4 checkpoint (integrations.checkpoint) or dequantize first")
    split = _split_glu_weights(experts)
    if split is not None:
        return split
    flags = _layout_flags(experts)
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
    activation = _custom_gate(experts, flags)[0] if _overrides_gate(experts) else _activation_of(experts, gated)
    return w13.contiguous(), w2.contiguous(), activation


def _split_glu(experts: nn.Module) -> Optional[nn.Module]:
    """The child holding DBRX's layout: 2-D ``w1`` (gate), ``v1`` (up) and ``w2`` (down), each ``[E * I, H]``."""
    mlp = getattr(experts, "mlp", None)
    if not isinstance(mlp, nn.Module):
        return None
    ws = [getattr(mlp, n, None) for n in ("w1", "v1", "w2")]
    if not all(isinstance(w, torch.Tensor) and w.ndim == 2 for w in ws) or len({tuple(w.shape) for w in ws}) != 1:
        return None
    return mlp


def _split_glu_weights(experts: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor, str]]:
    """DBRX's experts, read as ``w13 [E, 2I, H]`` / ``w2 [E, H, I]``: expert ``e`` owns rows ``e*I .. e*I+I-1``
    of ``w1`` / ``v1`` / ``w2`` and computes ``(act(x w1_e^T) * x v1_e^T) w2_e`` (``w2`` is not transposed).
    None when the experts are not laid out so."""
    mlp = _split_glu(experts)
    if mlp is None:
        return None
    biases = sorted(n for n, _ in experts.named_parameters() if "bias" in n)
    if biases:
        raise _Unsupported(f"experts carry biases ({', '.join(biases)}) beside their w1 / v1 / w2 weights")
    rows, hidden = mlp.w1.shape
    num_experts = getattr(experts, "num_experts", None) or getattr(mlp, "moe_num_experts", None)
    if not isinstance(num_experts, int) or num_experts <= 0 or rows % num_experts:
        raise _Unsupported(f"experts stack w1 / v1 / w2 as [{rows}, {hidden}] with no expert count that divides "
                           f"{rows}")
    shape = (num_experts, rows // num_experts, hidden)
    w1, v1, w2 = (getattr(mlp, n).detach().reshape(shape) for n in ("w1", "v1", "w2"))
    activation = _activation_of(mlp, True, getattr(mlp, "activation_fn", None))
    return torch.cat([w1, v1], dim=1).contiguous(), w2.transpose(1, 2).contiguous(), activation


def _layout_flags(experts: nn.Module) -> dict:
    flags = {k: getattr(experts, k, None) for k in ("has_gate", "has_bias", "is_transposed", "is_concatenated",
                                                     "has_post_expert_norm")}
    if flags["has_gate"] is None:
        raise _Unsupported(f"experts module {type(experts).__name__} does not store fused 3-D expert weights "
                           "(no @use_experts_implementation layout flags)")
    # Ergo declares no such flag: its experts subclass the decorated projections and add the norm around them.
    if flags["has_post_expert_norm"] or isinstance(getattr(experts, "post_expert_norm", None), nn.Module):
        raise _Unsupported("experts apply a post-expert norm; FusedMoE has no such step")
    if not flags["has_bias"]:
        biases = sorted(n for n, _ in experts.named_parameters() if "bias" in n)
        if biases:  # biases outside the layout transformers declares: not read, so not converted
            raise _Unsupported(f"experts carry biases ({', '.join(biases)}) their layout flags do not declare")
    return flags


def _overrides_gate(experts: nn.Module) -> bool:
    apply_gate = getattr(type(experts), "_apply_gate", None)
    return apply_gate is not None and apply_gate is not _default_apply_gate()


@torch.no_grad()
def _custom_gate(experts: nn.Module, flags: dict) -> tuple[str, Optional[SwigluOAI]]:
    """An overridden ``_apply_gate``, read by what it does on random values reaching well past any limit: the
    experts' own activation of the gate times up (Beam's, which only computes it in fp32; Step-3.7's without a
    limit), gpt-oss's clamped SwiGLU (``swiglu_oai`` with the experts' ``alpha`` and ``limit``, beta 1: the ``+ 1``
    on up) or a clamped SiLU gate times the clamped up (``swiglu_oai`` with alpha 1 and beta 0: HY-V4's).  The
    first that reproduces ``_apply_gate`` is taken; none: refused."""
    name = type(experts).__name__

    def first(*names):  # gpt-oss names them alpha / limit, MiniMax-M3 swiglu_alpha / swiglu_limit
        return next((getattr(experts, n) for n in names if getattr(experts, n, None) is not None), None)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not flags["has_gate"]:
        raise _Unsupported(f"{name} overrides the activation (_apply_gate) of experts without a gate")
    alpha, limit = first("alpha", "swiglu_alpha"), first("limit", "swiglu_limit")
    candidates = []
    try:
        candidates.append((_activation_of(experts, True), None))
    except _Unsupported:
        pass
    if number(limit) and limit > 0:
        candidates += [("swiglu_oai", SwigluOAI(alpha=float(alpha) if number(alpha) else 1.0, beta=beta,
                                                limit=float(limit))) for beta in (1.0, 0.0)]
    inter = 64
    reach = 2 * float(limit) if number(limit) and limit > 0 else 20.0
    h = torch.randn(16, 2 * inter, generator=torch.Generator().manual_seed(5)) * reach
    laid_out = h  # in the experts' own layout: interleaved gate0, up0, ... unless concatenated
    if flags["is_concatenated"] is False:
        laid_out = torch.stack([h[:, :inter], h[:, inter:]], dim=-1).reshape(16, 2 * inter)
    try:
        got = experts._apply_gate(laid_out).float()
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot read it
        raise _Unsupported(f"{name}._apply_gate fails on a probe ({type(exc).__name__}: {exc})") from None
    tried = []
    for activation, params in candidates:
        want = apply_activation(h, activation, params)
        if tuple(got.shape) == tuple(want.shape) and _rel_err(got, want) <= 1e-5:
            return activation, params
        tried.append(f"{activation}(gate) * up" if params is None else
                     f"swiglu_oai (alpha={params.alpha:g}, beta={params.beta:g}, limit={params.limit:g})")
    if not tried:
        raise _Unsupported(f"{name} overrides the gated activation (_apply_gate) with no activation FusedMoE has and "
                           "no limit attribute to read it as swiglu_oai")
    raise _Unsupported(f"{name} overrides the gated activation (_apply_gate) with something other than "
                       f"{' or '.join(tried)}")


def _expert_extras(experts: nn.Module, activation: str) -> _Extras:
    """Biases (``gate_up_proj_bias`` / ``up_proj_bias``, ``down_proj_bias``, de-interleaved like the weights)
    and activation parameters of a fused 3-D experts module."""
    if _split_glu(experts) is not None:  # DBRX: no biases (refused when read), no parametric activation
        return _Extras()
    flags = _layout_flags(experts)
    params = _custom_gate(experts, flags)[1] if _overrides_gate(experts) else None
    if not flags["has_bias"]:
        return _Extras(activation_params=params)
    gated = bool(flags["has_gate"])
    b13 = getattr(experts, "gate_up_proj_bias" if gated else "up_proj_bias", None)
    b2 = getattr(experts, "down_proj_bias", None)
    for bname, b in (("gate_up_proj_bias" if gated else "up_proj_bias", b13), ("down_proj_bias", b2)):
        if b is not None and (not isinstance(b, torch.Tensor) or b.ndim != 2):
            raise _Unsupported(f"expert bias {bname} is not a 2-D [experts, features] tensor")
    if b13 is None and b2 is None:
        raise _Unsupported("experts declare biases (has_bias) but have no gate_up_proj_bias / down_proj_bias")
    if b13 is not None:
        b13 = b13.detach().float()
        if gated and flags["is_concatenated"] is False:  # interleaved like the rows of gate_up_proj
            b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1)
        b13 = b13.contiguous()
    return _Extras(b13, None if b2 is None else b2.detach().float().contiguous(), params)


def _takes_routing(experts: nn.Module) -> bool:
    """Does ``experts.forward`` take ``(hidden_states, top_k_index, top_k_weights)``?  A wrapper that hides
    the signature behind ``*args`` counts as yes: the layout, routing and block checks decide after."""
    params = list(inspect.signature(experts.forward).parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3


def _dense_expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Experts that run every expert on its own slice of ``[E * T, H]`` (Llama4): ``gate_up_proj [E, H, 2I]``
    (gate columns then up columns) and ``down_proj [E, I, H]``, read as ``w13 [E, 2I, H]`` / ``w2 [E, H, I]``."""
    biases = sorted(n for n, _ in experts.named_parameters() if "bias" in n)
    if biases:
        raise _Unsupported(f"experts carry biases ({', '.join(biases)}); the kernels have no expert-bias path")
    w13, w2 = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor) or w13.ndim != 3 or w2.ndim != 3:
        raise _Unsupported("expert weights are not 3-D tensors named gate_up_proj and down_proj")
    num_experts, hidden = w13.shape[0], w13.shape[1]
    if w13.shape[2] % 2 or tuple(w2.shape) != (num_experts, w13.shape[2] // 2, hidden):
        raise _Unsupported(f"gate_up_proj {tuple(w13.shape)} and down_proj {tuple(w2.shape)} are not "
                           "[E, H, 2I] and [E, I, H]")
    w13, w2 = w13.detach().transpose(1, 2), w2.detach().transpose(1, 2)
    return w13.contiguous(), w2.contiguous(), _activation_of(experts, gated=True)


@torch.no_grad()
def _check_dense_layout(experts: nn.Module, w13: torch.Tensor, w2: torch.Tensor, activation: str) -> None:
    """The :func:`_check_layout` of experts that take ``[E * T, H]``, expert ``e`` on rows ``e*T .. e*T+T-1``."""
    num_experts, _, hidden = w13.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(num_experts * 3, hidden, generator=gen).to(device=w13.device, dtype=w13.dtype)
    got = experts(x).float().view(num_experts, 3, hidden)
    want = torch.stack([apply_activation(x[3 * e:3 * e + 3].float() @ w13[e].float().t(), activation)
                        @ w2[e].float().t() for e in range(num_experts)])
    tol = _tolerance(w13.dtype)
    err = _rel_err(got, want)
    if not err <= tol:
        raise _Unsupported(f"the experts' forward disagrees with the weight layout read from them "
                           f"(relative error {err:.3g} > {tol}); refusing to convert a misread layout")


@torch.no_grad()
def _check_input_scaled_router(router: nn.Module, num_experts: int) -> None:
    """The router must return ``(scores, logits)``: top-1 of the logits, its sigmoid at the chosen expert and
    0 elsewhere (the score that multiplies the experts' input)."""
    name = type(router).__name__
    param = next(router.parameters())
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(64, _router_input_size(router, num_experts), generator=gen).to(param.device, param.dtype)
    out = router(x)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise _Unsupported(f"router {name} of an input-scaled block does not return (scores, logits)")
    scores, logits = out
    if tuple(scores.shape) != (64, num_experts) or tuple(logits.shape) != (64, num_experts):
        raise _Unsupported(f"router {name} returns shapes {tuple(scores.shape)}, {tuple(logits.shape)}")
    top, ids = logits.float().topk(1, dim=-1)
    want = torch.zeros(64, num_experts, device=x.device).scatter(1, ids, torch.sigmoid(top))
    err = _rel_err(scores, want)
    if not err <= _tolerance(scores.dtype):
        raise _Unsupported(f"router {name}: its input scores are not the top-1 sigmoid of its logits (relative "
                           f"error {err:.3g}); only top-1 input scaling is expressible (one score per token)")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 3e-2


@torch.no_grad()
def _check_layout(experts: nn.Module, w13: torch.Tensor, w2: torch.Tensor, activation: str,
                  extras: Optional[_Extras] = None) -> None:
    """Run the original experts on a few random tokens, every expert with weight 1, and compare with
    the float computation on the extracted ``w13`` / ``w2`` (and biases): catches a misread layout before
    conversion."""
    extras = extras or _Extras()
    num_experts, _, hidden = w13.shape
    dtype = w13.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, hidden, generator=gen).to(device=w13.device, dtype=dtype)
    index = torch.arange(num_experts, device=w13.device).expand(3, num_experts).contiguous()
    weights = torch.ones(3, num_experts, device=w13.device, dtype=dtype)
    got = experts(x, index, weights).float()
    want = torch.zeros(3, hidden, device=w13.device)
    for e in range(num_experts):
        want += _expert_forward(x.float(), w13[e], w2[e], activation, extras, e)
    if got.numel() == want.numel():  # DBRX's experts return [3, 1, H] for [3, H]
        got = got.reshape(want.shape)
    tol = _tolerance(dtype)
    err = _rel_err(got, want)
    if not err <= tol:
        raise _Unsupported(f"the experts' forward disagrees with the weight layout read from them "
                           f"(relative error {err:.3g} > {tol}); refusing to convert a misread layout")


# -- routing ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Routing:
    kwargs: dict                       # FusedMoE routing arguments (routing, n_group, ...), top_k excluded
    top_k: int
    scores: str                        # what the kernel takes of the router's scores (kernel_logits)
    block_routes: bool                 # the router returns logits only; the block's route_tokens_to_experts routes
    expert_scale: Optional[torch.Tensor]  # per-expert output scale [E], folded into w2
    scores_at: int = 0                 # where the router's scores are among its outputs (0, or 2 after the ids)


# Attribute names of the routing parameters, read from the router (and its children), then the block.
_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")
_SCALE_NAMES = ("routed_scaling_factor", "route_scale", "router_scaling_factor")


def _router_candidates(router: nn.Module, block: nn.Module, num_experts: int, top_k: int) -> list[tuple[dict, float]]:
    """The kernel routing methods the routing attributes allow, most specific first, each with the uniform
    scale to fold into ``w2`` (1 when the method applies it itself).  An attribute is read from the router,
    its children (ERNIE-4.5 keeps its bias in ``moe_statics``), then the block (AFMoE, MiniMax-M2 and
    LFM2-MoE keep it there and hand it to the router)."""
    sources = (*router.modules(), block)

    def attr(*names):
        for src in sources:
            for n in names:
                if getattr(src, n, None) is not None:
                    return getattr(src, n)
        return None

    bias, scale, norm = attr(*_BIAS_NAMES), attr(*_SCALE_NAMES), attr("norm_topk_prob")
    scale = 1.0 if scale is None else float(scale)
    groups = int(attr("num_group", "n_group") or 1)
    deepseek = dict(routing="deepseek_v3", n_group=groups, topk_group=int(attr("topk_group") or groups),
                    routed_scaling_factor=scale, routing_bias=None)
    if bias is not None:
        if norm is not None and not norm:
            raise _Unsupported("DeepSeek-style routing with norm_topk_prob=False: the kernel's DeepSeekV3 routing "
                               "always normalizes the top-k weights, and no other routing method matches")
        if not isinstance(bias, torch.Tensor) or bias.numel() != num_experts:
            raise _Unsupported(f"the routing bias is not one value per expert ({num_experts})")
        biased = dict(deepseek, routing_bias=bias.detach().float().reshape(num_experts).clone())
        # A scale the router does not apply may be the block's own step after the experts (MiniMax-M3): then the
        # router matches unscaled routing, and the block keeps its step (the whole-block check confirms it).
        return [(biased, 1.0)] + ([(dict(biased, routed_scaling_factor=1.0), 1.0)] if scale != 1.0 else [])
    # No bias: softmax routers (a routed scale, as DeepSeek-V2's, folded into w2: it multiplies every expert's
    # output), sigmoid routers that normalize (DeepSeek-V3 routing with one group and no bias), top-1 sigmoid.
    out = [(dict(routing="renormalize"), scale), (dict(routing="default"), scale)]
    # PhiMoE's top-2 sparsemixer, with the router's jitter_eps (config.router_jitter_noise), tried first
    jitter = attr("router_jitter_noise")
    if jitter is not None and top_k == 2:
        out.insert(0, (dict(routing="sparsemixer", routing_params=[jitter]), scale))
    if norm is None or norm:
        out.append((deepseek, 1.0))
    if top_k == 1 and scale == 1.0:
        out.append((dict(routing="llama4"), 1.0))
    return out


class _PassLogits:
    """Stands in for a block's ``route_tokens_to_experts(router_logits) -> (ids, weights)`` (the layout of
    older transformers 5 releases, where the router returns logits only): hands the logits on in the
    weights' place, for the experts (a :class:`TransformersMoE`) to route."""

    def __init__(self, scores: str = "logits"):
        self.scores = scores

    def __call__(self, *args):  # (router_logits) or (hidden_states, router_logits)
        logits = kernel_logits(args[-1], self.scores)
        return logits, logits


def _router_input_size(router: nn.Module, num_experts: int) -> int:
    for p in router.parameters():
        if p.ndim == 2 and p.shape[0] == num_experts:
            return p.shape[1]
    # LongCat-Flash: zero-computation experts, which pass the token through scaled by its weight; ZAYA: a skip
    # expert, which returns nothing (its scoring projection is the narrowest; wider ones are hidden layers)
    wider = sorted(p.shape[0] for p in router.parameters() if p.ndim == 2 and p.shape[0] > num_experts)
    if wider:
        raise _Unsupported(f"router {type(router).__name__} scores {wider[0]} choices for {num_experts} experts: "
                           "the others are experts without weights (zero-computation experts, which return the "
                           "token scaled by its routing weight, or nothing); FusedMoE routes only over experts it "
                           "holds")
    raise _Unsupported(f"router {type(router).__name__} has no [experts, hidden] projection weight")


def _router_args(router: nn.Module, block: nn.Module) -> tuple:
    """Tensors the router's forward takes after the hidden states, which the block hands it from its own
    attributes of the same names (AFMoE's and LFM2-MoE's ``expert_bias``, MiniMax-M2's
    ``e_score_correction_bias``)."""
    args = []
    for p in list(inspect.signature(router.forward).parameters.values())[1:]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        value = getattr(block, p.name, None)
        if isinstance(value, torch.Tensor):
            args.append(value)
        elif p.default is p.empty:
            raise _Unsupported(f"router {type(router).__name__} takes {p.name!r}, which the block does not hold")
        else:
            break
    return tuple(args)


@torch.no_grad()
def _read_routing(router: nn.Module, num_experts: int, block: nn.Module) -> _Routing:
    """Map the router onto a kernel routing method and check it on random tokens against the router's own
    top-k weights and ids (or, where the router returns logits only, the block's ``route_tokens_to_experts``)."""
    name = type(router).__name__
    param = next(router.parameters())
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = 64
    x = torch.randn(tokens, _router_input_size(router, num_experts), generator=gen).to(param.device, param.dtype)
    args = _router_args(router, block)
    try:
        out = router(x, *args)
    except Exception:  # noqa: BLE001 - a router that takes the block's [B, S, H] input (AFMoE)
        out = router(x[None], *args)
    block_routes = isinstance(out, torch.Tensor) and callable(getattr(block, "route_tokens_to_experts", None))
    if block_routes:
        # route_tokens_to_experts(router_logits), or (hidden_states, router_logits) in some releases (Jamba)
        takes_x = len(inspect.signature(block.route_tokens_to_experts).parameters) == 2
        pair = block.route_tokens_to_experts(*((x,) if takes_x else ()), out)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise _Unsupported("the block's route_tokens_to_experts does not return (top-k ids, top-k weights)")
        ids, weights = pair if not pair[0].is_floating_point() else pair[::-1]
        out = (out, weights, ids)
    if not isinstance(out, (tuple, list)) or len(out) < 3 or not all(isinstance(t, torch.Tensor) for t in out[:3]):
        raise _Unsupported(f"router {name} does not return (logits, top-k weights, top-k ids)")
    # (scores [T, E], top-k weights, top-k ids); some releases return the ids first and the scores last.  The
    # weights are second either way, which is where the block takes what it hands its experts.
    scores_at = 2 if (not out[0].is_floating_point() and out[2].is_floating_point()) else 0
    first, weights, ids = out[scores_at], out[1], out[2 - scores_at]
    # top-k read from what the router returns (routers keep it as top_k, or only in their config)
    top_k = ids.shape[-1] if ids.ndim == 2 else 0
    if not 0 < top_k <= num_experts:
        raise _Unsupported(f"router {name} returns top-k ids of shape {tuple(ids.shape)}")
    if (tuple(first.shape) != (tokens, num_experts) or tuple(ids.shape) != (tokens, top_k)
            or tuple(weights.shape) != (tokens, top_k)):
        raise _Unsupported(f"router {name} returns shapes {tuple(first.shape)}, {tuple(weights.shape)}, "
                           f"{tuple(ids.shape)}; expected [T, {num_experts}], [T, {top_k}], [T, {top_k}]")
    candidates = _router_candidates(router, block, num_experts, top_k)
    want = torch.zeros(tokens, num_experts, device=x.device).scatter(1, ids.long(), weights.float())
    expert_scale = getattr(router, "per_expert_scale", None)
    if not isinstance(expert_scale, torch.Tensor) or tuple(expert_scale.shape) != (num_experts,):
        expert_scale = None
    ones = torch.ones(num_experts, device=x.device)
    probabilities = bool((first >= 0).all()) and bool(
        torch.allclose(first.float().sum(-1), torch.ones(tokens, device=x.device), atol=1e-3))
    # What the kernel may take of the scores: the logits; the log of probabilities (Gemma-4); the inverse
    # sigmoid of a softmax, for sigmoid-score routing on softmax probabilities (ERNIE-4.5).
    transforms = ["logits", "log_probs" if probabilities else "logit_of_softmax"]
    tol = _tolerance(weights.dtype)
    if top_k < num_experts and bool((first.float().amax(-1) == first.float().amin(-1)).all()):
        raise _Unsupported(f"router {name} scores every expert the same on every probe token (untrained, zero "
                           "weights?): its routing method cannot be read")
    tried = []
    # Second pass: the same methods up to one uniform scale that no attribute names (OpenAI's privacy filter
    # divides its weights by top_k, and its block multiplies the experts' output back): measured on the probe
    # tokens, checked on every one of them, and folded into w2 like a routed scale.
    for measured in (False, True):
        for transform in transforms:
            logits = kernel_logits(first.float(), transform)
            # Tokens whose k-th and (k+1)-th logits are equal (bf16 logits over many experts tie now and then)
            # may pick either expert on either side: they say nothing about the method, so they are not compared.
            clear = torch.ones(tokens, dtype=torch.bool, device=x.device)
            if top_k < num_experts:
                ranked = logits.topk(top_k + 1, dim=-1).values
                clear = ranked[:, top_k - 1] != ranked[:, top_k]
            if not bool(clear.any()):
                continue
            for cand, fold in candidates:
                if transform == "logit_of_softmax" and cand["routing"] != "deepseek_v3":
                    continue  # the inverse sigmoid only serves sigmoid-score routing
                if measured and (fold != 1.0 or expert_scale is not None):
                    continue  # a scale is already applied: no second one
                scale = (ones if expert_scale is None else expert_scale.detach().float().to(x.device)) * fold
                try:
                    w, i = route(logits, top_k, **cand)
                except MoEError:  # arguments this method refuses (groups that do not divide the experts)
                    continue
                w = w * scale[i]
                got = torch.zeros_like(want).scatter(1, i, w)
                if measured:
                    uniform = float(want[clear].sum() / got[clear].sum())
                    if not uniform > 0:
                        continue
                    scale, got = scale * uniform, got * uniform
                if _rel_err(got[clear], want[clear]) <= tol:
                    keep = expert_scale is not None or fold != 1.0 or measured
                    return _Routing(dict(cand), top_k, transform, block_routes, scale.clone() if keep else None,
                                    scores_at)
                if not measured:
                    tried.append(f"{cand['routing']} on {transform.replace('_', ' ')}"
                                 + (" with per-expert scale" if expert_scale is not None else "")
                                 + (f" scaled by {fold:g}" if fold != 1.0 else ""))
    raise _Unsupported(f"router {name}: its top-k weights match none of the routing methods the kernels support, "
                       f"nor any of them times one uniform scale (tried {', '.join(tried)})")


# -- the whole-block check --------------------------------------------------------------------------------
_UNSET = object()


@torch.no_grad()
def _check_block(block: nn.Module, swaps: dict, hidden: int) -> bool:
    """Run the block on random input, then again with ``swaps`` (attribute -> the float emulation of the
    conversion) in place; they must agree.  False when the block cannot run on a ``[1, T, H]`` tensor alone
    (a decoder layer holding the MoE, as in Gemma-4): the router and layout checks then stand alone."""
    param = next(block.experts.parameters())
    gen = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(1, 7, hidden, generator=gen).to(param.device, param.dtype)
    try:
        want = block(x)
    except Exception:  # noqa: BLE001 - any failure only means the block needs more than one tensor
        return False
    saved = {attr: block.__dict__.get(attr, _UNSET) if attr not in block._modules else block._modules[attr]
             for attr in swaps}
    try:
        for attr, value in swaps.items():
            setattr(block, attr, value)
        got = block(x)
    except Exception as exc:  # noqa: BLE001
        raise _Unsupported(f"the block fails with its router and experts emulated ({type(exc).__name__}: {exc})")
    finally:
        for attr, value in saved.items():
            if value is _UNSET:  # was a method of the class: drop the instance attribute
                block.__dict__.pop(attr, None)
            else:
                setattr(block, attr, value)
    want = want[0] if isinstance(want, (tuple, list)) else want
    got = got[0] if isinstance(got, (tuple, list)) else got
    err = _rel_err(got, want)
    tol = _tolerance(param.dtype)
    if not err <= tol:
        raise _Unsupported(f"the block's output disagrees with its router and experts read as a standard MoE "
                           f"(relative error {err:.3g} > {tol}): it uses the routing or the experts some other way")
    return True


# -- calibration ------------------------------------------------------------------------------------------
def _collect_calibration(model: nn.Module, experts: dict[str, nn.Module], calibration) -> dict[str, torch.Tensor]:
    """Run ``calibration`` through the model and keep the hidden states ``[N, H]`` each experts module
    receives (for Gemma-4 and latent MoEs that is not the block's input)."""
    seen: dict[str, list] = {name: [] for name in experts}
    hooks = []
    for name, module in experts.items():
        def hook(_module, args, kwargs, name=name):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[name].append(x.detach().reshape(-1, x.shape[-1]).float())
        hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
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
    """MoE blocks: modules with an ``experts`` child (outermost only; converted ones are not listed), and,
    to be reported as left alone, modules with a router child and stacked 3-D expert weights in other
    children but no ``experts`` child (JetMoE's MLP)."""
    found, claimed = [], []
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in claimed):
            continue
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and module is not experts:
            claimed.append(name)
            if not isinstance(experts, TransformersMoE):
                found.append((name, module))
        elif _stacked_without_experts(module):
            claimed.append(name)
            found.append((name, module))
    return found


def _stacked_without_experts(module: nn.Module) -> list[str]:
    """Children other than the router that hold 3-D (stacked expert) parameters, in a module that has a
    router child and no ``experts`` child; empty otherwise."""
    routers = [getattr(module, a, None) for a in _ROUTER_NAMES]
    if isinstance(getattr(module, "experts", None), nn.Module) or not any(isinstance(r, nn.Module) for r in routers):
        return []
    return [n for n, child in module.named_children() if child not in routers
            and any(p.ndim == 3 for p in child.parameters(recurse=False))]


def _router_of(block: nn.Module) -> tuple[str, nn.Module]:
    for attr in _ROUTER_NAMES:
        router = getattr(block, attr, None)
        if isinstance(router, nn.Module):
            return attr, router
    experts = block.experts
    if any(isinstance(getattr(experts, a, None), nn.Module) for a in _ROUTER_NAMES):
        raise _Unsupported(f"its experts module {type(experts).__name__} holds the router itself and is not called "
                           "as experts(x, top-k ids, top-k weights) (JetMoE's mixture of attention heads is one)")
    raise _Unsupported(f"block has no router child named {' or '.join(_ROUTER_NAMES)}")


@dataclasses.dataclass
class _Built:
    """What to swap in: ``children`` of ``block`` (attribute -> module), or, when ``replacement`` is set,
    the whole block (found at ``name`` in the model)."""
    name: str
    block: nn.Module
    children: dict
    replacement: Optional[nn.Module]
    info: ConvertedBlock


def _build_input_scaled(name: str, block: nn.Module, router_attr: str, router: nn.Module, *, family: str,
                        calibration: Optional[torch.Tensor], kernel: Optional[str], check_layout: bool,
                        parallel=None) -> _Built:
    """A block whose experts take no routing (Llama4): see :class:`InputScaledMoE`."""
    experts = block.experts
    w13, w2, activation = _dense_expert_weights(experts)
    num_experts = w13.shape[0]
    _check_input_scaled_router(router, num_experts)
    if check_layout:
        _check_dense_layout(experts, w13, w2, activation)
    shared = getattr(block, "shared_expert", None)
    shared = shared if isinstance(shared, nn.Module) else None
    routing = dict(routing="renormalize")  # top-1: softmax over one logit is exactly 1
    if check_layout:
        emulated = InputScaledMoE(router, TransformersMoE(_FloatMoE(w13, w2, activation, 1, routing),
                                                          compute_dtype=torch.float32), shared)
        hidden = _router_input_size(router, num_experts)
        param = w13
        x = torch.randn(1, 7, hidden, generator=torch.Generator(device="cpu").manual_seed(2)).to(param.device,
                                                                                                  param.dtype)
        with torch.no_grad():
            want, got = block(x), emulated(x)
        if not isinstance(want, tuple) or len(want) != 2:
            raise _Unsupported("an input-scaled block that does not return (hidden states, router logits)")
        err = _rel_err(got[0].reshape(want[0].shape), want[0])
        if not err <= _tolerance(param.dtype) or want[0].shape != x.reshape(-1, hidden).shape:
            raise _Unsupported(f"the block's output disagrees with shared expert + expert(score * input) "
                               f"(relative error {err:.3g})")
    # Calibration needs no rescaling: it comes from the experts' own input, the scaled tokens (and zero rows).
    try:
        moe = FusedMoE.from_float(w13, w2, activation=activation, calibration=calibration, kernel=kernel, name=name,
                                  top_k=1, parallel=parallel, **routing)
    except KernelUnavailableError:
        raise  # kernel= names a kernel this machine cannot run: no block could convert
    except MoEError as exc:
        raise _Unsupported(f"FusedMoE rejected the layer: {exc}") from exc
    info = ConvertedBlock(name=name, block=type(block).__name__, family=family, experts=num_experts, top_k=1,
                          hidden=w13.shape[2], intermediate=w2.shape[2], activation=activation,
                          routing="renormalize", shared_expert=shared is not None, kernel=moe.kernel,
                          router_output="input_scaled")
    return _Built(name, block, {}, InputScaledMoE(router, TransformersMoE(moe, family=family), shared, family=family),
                  info)


def _build(name: str, block: nn.Module, *, family: str, calibration: Optional[torch.Tensor], kernel: Optional[str],
           check_layout: bool, parallel=None) -> _Built:
    stacked = _stacked_without_experts(block)
    if stacked:
        raise _Unsupported(f"a router and stacked expert weights ({', '.join(stacked)}) but no experts module: the "
                           "block runs its experts its own way, and convert reads only transformers' experts "
                           "modules, called as experts(x, top-k ids, top-k weights)")
    router_attr, router = _router_of(block)
    capacity = getattr(router, "expert_capacity", None)
    if capacity is not None:  # Switch Transformers, NLLB-MoE
        raise _Unsupported(f"router {type(router).__name__} drops the tokens beyond an expert capacity "
                           f"(expert_capacity={capacity}); FusedMoE sends every token to its top-k experts")
    experts = block.experts
    if getattr(experts, "_is_expert_parallel", False):
        raise _Unsupported("experts are expert-parallel (sharded); convert the unsharded model")
    if not isinstance(experts, (nn.ModuleList, nn.ModuleDict)) and not _takes_routing(experts):
        return _build_input_scaled(name, block, router_attr, router, family=family, calibration=calibration,
                                   kernel=kernel, check_layout=check_layout, parallel=parallel)
    down = getattr(experts, "down_proj", None)
    if isinstance(down, torch.Tensor) and down.ndim == 3:  # zero-computation experts first, whatever the layout
        _router_input_size(router, down.shape[0])
    w13, w2, activation = expert_weights(experts)
    extras = _expert_extras(experts, activation)
    routing = _read_routing(router, w13.shape[0], block)
    if check_layout:
        _check_layout(experts, w13, w2, activation, extras)
    if routing.expert_scale is not None:  # out_e * s_e == (s_e * w2_e) applied to the intermediate
        scale = routing.expert_scale.to(w2.device)
        w2 = (w2.float() * scale[:, None, None]).to(w2.dtype)
        if extras.w2_bias is not None:  # the scale multiplies the expert's whole output, bias included
            extras = dataclasses.replace(extras, w2_bias=extras.w2_bias * scale[:, None])
    # Where the logits reach the experts: through the router's second output, or the block's routing step.
    if routing.block_routes:
        hand_on = {"route_tokens_to_experts": _PassLogits(routing.scores)}
    else:
        hand_on = {router_attr: RouterLogits(router, scores=routing.scores, scores_at=routing.scores_at)}
    if check_layout:
        emulated = TransformersMoE(_FloatMoE(w13, w2, activation, routing.top_k, routing.kwargs, extras),
                                   compute_dtype=torch.float32)
        _check_block(block, {**hand_on, "experts": emulated}, _router_input_size(router, w13.shape[0]))
    try:
        moe = FusedMoE.from_float(w13, w2, activation=activation, calibration=calibration, kernel=kernel, name=name,
                                  top_k=routing.top_k, parallel=parallel, w13_bias=extras.w13_bias,
                                  w2_bias=extras.w2_bias, activation_params=extras.activation_params,
                                  **routing.kwargs)
    except KernelUnavailableError:
        raise  # kernel= names a kernel this machine cannot run: no block could convert
    except MoEError as exc:
        raise _Unsupported(f"FusedMoE rejected the layer: {exc}") from exc
    shared = any(n.startswith(("shared_expert", "shared_mlp")) for n, _ in block.named_children())
    info = ConvertedBlock(name=name, block=type(block).__name__, family=family, experts=w13.shape[0],
                          top_k=routing.top_k, hidden=w13.shape[2], intermediate=w2.shape[2], activation=activation,
                          routing=routing.kwargs["routing"], shared_expert=shared, kernel=moe.kernel,
                          router_output=routing.scores,
                          expert_scale=routing.expert_scale is not None, expert_bias=extras.has_bias)
    return _Built(name, block, {**hand_on, "experts": TransformersMoE(moe, family=family)}, None, info)


def convert(model: nn.Module, *, calibration: Union[None, torch.Tensor, dict, Callable[[nn.Module], Any]] = None,
            kernel: Optional[str] = None, check_layout: bool = True,
            include: Optional[Callable[[str, nn.Module], bool]] = None, parallel=None) -> ConversionReport:
    """Replace the routed experts of ``model``'s MoE blocks in place with NVFP4 :class:`TransformersMoE` layers.

    ``calibration``: input ids ``[B, S]``, a dict of model keyword arguments, or a callable
    ``fn(model)`` that runs forward passes; the hidden states each experts module receives then set its
    static activation scales (without it FusedMoE assumes an activation amax, see
    ``layer.DEFAULT_ACTIVATION_AMAX``).  ``kernel``: force a registered kernel (default: the best one for
    the weights' device).  ``check_layout``: before converting a block, check its experts' forward against
    the weight layout read from them, and the block against a float emulation of the conversion.
    ``include(name, block)``: convert only the blocks it accepts (others are reported as skipped).
    ``parallel``: shard every converted layer (``moe_passes.parallel.ExpertParallel`` / ``TensorParallel``);
    every rank converts the same unsharded model and keeps its own shard.

    Returns a :class:`ConversionReport`; it is also logged (INFO), each skipped block with its reason (WARNING).
    """
    if kernel is not None:
        registry.get(kernel)  # an unknown name is the caller's error, not a reason to skip every block
    report = ConversionReport()
    family = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    blocks = _find_blocks(model)
    candidates: dict[str, nn.Module] = {}
    for name, block in blocks:
        if include is not None and not include(name, block):
            report.skipped.append(SkippedBlock(name, type(block).__name__, "excluded by include="))
        else:
            candidates[name] = block
    calib = {}
    if calibration is not None:
        calib = _collect_calibration(model, {n: b.experts for n, b in candidates.items()
                                             if isinstance(getattr(b, "experts", None), nn.Module)}, calibration)
    built = []
    for name, block in candidates.items():
        try:
            b = _build(name, block, family=family, calibration=calib.get(name), kernel=kernel,
                       check_layout=check_layout, parallel=parallel)
        except KernelUnavailableError:
            raise
        except (_Unsupported, MoEError) as exc:
            report.skipped.append(SkippedBlock(name, type(block).__name__, str(exc)))
            logger.warning("moe_nvfp4: left %s (%s) unconverted: %s", name, type(block).__name__, exc)
            continue
        except Exception as exc:  # a block's own code failing on our probes: leave it alone, say why
            reason = f"reading the block failed: {type(exc).__name__}: {exc}"
            report.skipped.append(SkippedBlock(name, type(block).__name__, reason))
            logger.warning("moe_nvfp4: left %s (%s) unconverted: %s", name, type(block).__name__, reason,
                           exc_info=True)
            continue
        built.append(b)
        report.converted.append(b.info)
    # Swap only once every block is built: an error above never leaves the model half-converted.
    for b in built:
        for attr, child in b.children.items():
            setattr(b.block, attr, child)
        if b.replacement is not None:
            parent_name, _, attr = b.name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, b.replacement)
    if not blocks:
        logger.info("moe_nvfp4: no MoE blocks found in %s", type(model).__name__)
    else:
        logger.info("%s", report)
    return report
