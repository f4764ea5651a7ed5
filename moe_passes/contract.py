"""The one shape contract of an NVFP4 MoE layer.

Every layer above this one (fake functions, verifier, weight preparation, the CLI's ``plan``) derives
padded sizes from :class:`MoEShape`, so they cannot drift apart.  Nothing here touches a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from moe_passes.errors import MoEConfigError

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "PARAMETRIC_ACTIVATIONS",
    "SwigluOAI",
    "activation_params",
    "ROUTING_METHODS",
    "PARAMETRIC_ROUTINGS",
    "SparseMixer",
    "routing_params",
    "Alignment",
    "MoEShape",
    "round_up",
    "pad_dim",
    "is_gated",
    "align_hidden_dim",
    "align_biases",
    "intermediate_alignment",
    "trtllm_chunk_size",
    "TRTLLM_ALIGNMENT",
    "NVFP4_BLOCK",
]

NVFP4_BLOCK = 16
# silu = SwiGLU, gelu / gelu_tanh = GeGLU with erf / tanh GELU, relu2 = squared ReLU (not gated),
# swiglu_oai = gpt-oss's clamped SwiGLU with alpha and the +beta on the linear half (see SwigluOAI).
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu2", "swiglu_oai")
GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")
# Activations with parameters: a kernel supports one only if it says so explicitly
# (KernelSpec.activation_params), never through a blanket ``frozenset(ACTIVATIONS)``.
PARAMETRIC_ACTIVATIONS = ("swiglu_oai",)
# sparsemixer = PhiMoE's top-2 routing with its jitter_eps (see SparseMixer).
ROUTING_METHODS = ("default", "renormalize", "deepseek_v3", "llama4", "sparsemixer")
# Routing methods with parameters (the ops carry them as ``routing_params``, see routing_params()).
PARAMETRIC_ROUTINGS = ("sparsemixer",)

# CUDA's grid.Y limit and the token cap beyond which the TRTLLM kernel was seen to fault (FACTS.md).
_GRID_Y_LIMIT = 65535
_TRTLLM_TOKEN_CAP = 300_000
_TRTLLM_TILE = 128


@dataclasses.dataclass(frozen=True)
class SwigluOAI:
    """Parameters of ``swiglu_oai``: ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
    ``out = g * sigmoid(alpha * g) * (u + beta)``.  The defaults are gpt-oss's (alpha 1.702, the ``+ 1`` on
    up, limit 7); FlashInfer calls the same three ``gemm1_alpha``, ``gemm1_beta``, ``gemm1_clamp_limit``.
    The ops carry them as the float list ``[alpha, beta, limit]`` (``as_list``)."""

    alpha: float = 1.702
    beta: float = 1.0
    limit: float = 7.0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise MoEConfigError(f"SwigluOAI.{field.name} must be a number, got {value!r}")
        if not self.limit > 0:
            raise MoEConfigError(f"SwigluOAI.limit must be positive, got {self.limit}")

    def as_list(self) -> list:
        return [float(self.alpha), float(self.beta), float(self.limit)]


def activation_params(activation: str, params=None):
    """The parameters of ``activation`` as the ops carry them (``[alpha, beta, limit]`` for ``swiglu_oai``,
    its defaults when ``params`` is None), or None for an activation without parameters.  ``params``: a
    :class:`SwigluOAI`, a sequence of three floats, or None."""
    is_gated(activation)
    if activation not in PARAMETRIC_ACTIVATIONS:
        if params is not None:
            raise MoEConfigError(f"activation {activation!r} takes no parameters, got {params!r}")
        return None
    if params is None:
        return SwigluOAI().as_list()
    return _param_list(activation, SwigluOAI, params)


def _param_list(name: str, cls, params) -> list:
    """``params`` (a ``cls``, or a sequence of its fields' values) as the float list the ops carry, checked by
    ``cls``; ``name``: the activation or routing method, for the error."""
    if isinstance(params, cls):
        return params.as_list()
    fields = [f.name for f in dataclasses.fields(cls)]
    try:
        values = [float(v) for v in params]
    except (TypeError, ValueError):
        values = None
    if values is None or len(values) != len(fields):
        raise MoEConfigError(f"{name} parameters must be [{', '.join(fields)}], got {params!r}")
    return cls(*values).as_list()


@dataclasses.dataclass(frozen=True)
class SparseMixer:
    """The parameter of ``sparsemixer`` routing (PhiMoE, inference, top-2).  Per token with logits ``s``:
    ``i1 = argmax s``; experts with ``(s[i1] - s) / max(|s|, s[i1]) > 2 * jitter_eps`` are masked, and
    ``w1`` is the softmax of the rest at ``i1``.  Then ``i2`` = the argmax with ``i1`` removed, the mask is
    taken again against ``s[i2]`` (on all of ``s``), and ``w2`` is the softmax at ``i2`` of what is neither
    masked nor ``i1``.  The weights are not renormalized.  PhiMoE's ``config.router_jitter_noise`` is
    ``jitter_eps``; there is no default: a layer must say it.  The ops carry it as ``[jitter_eps]``."""

    jitter_eps: float

    def __post_init__(self):
        value = self.jitter_eps
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise MoEConfigError(f"SparseMixer.jitter_eps must be a finite number >= 0, got {value!r}")

    def as_list(self) -> list:
        return [float(self.jitter_eps)]


def routing_params(routing: str, params=None):
    """The parameters of ``routing`` as the ops carry them (``[jitter_eps]`` for ``sparsemixer``), or None
    for a routing method without parameters.  ``params``: a :class:`SparseMixer`, a sequence of one float, or
    None (refused for a parametric method: its parameter has no default)."""
    if routing not in ROUTING_METHODS:
        raise MoEConfigError(f"unknown routing {routing!r}; supported: {', '.join(ROUTING_METHODS)}")
    if routing not in PARAMETRIC_ROUTINGS:
        if params is not None:
            raise MoEConfigError(f"routing {routing!r} takes no parameters, got {params!r}")
        return None
    if params is None:
        raise MoEConfigError(f"{routing} routing needs its parameter [jitter_eps] (PhiMoE: config.router_jitter_noise)")
    return _param_list(routing, SparseMixer, params)


def round_up(x: int, multiple: int) -> int:
    if multiple <= 0:
        raise MoEConfigError(f"alignment must be positive, got {multiple}")
    return (x + multiple - 1) // multiple * multiple


def is_gated(activation: str) -> bool:
    if activation not in ACTIVATIONS:
        raise MoEConfigError(f"unknown activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    return activation in GATED_ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class Alignment:
    """What a kernel requires of the sizes it is handed.

    ``hidden``: multiple for the hidden size H (activations and both weights are padded to it).
    ``intermediate_gated`` / ``intermediate_plain``: multiple for the expert intermediate size I.
    All are multiples of the NVFP4 block (16) since both GEMMs reduce over these dimensions.
    """

    hidden: int
    intermediate_gated: int
    intermediate_plain: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value <= 0 or value % NVFP4_BLOCK:
                raise MoEConfigError(f"Alignment.{field.name}={value} must be a positive multiple of {NVFP4_BLOCK}")

    def intermediate(self, activation: str) -> int:
        return self.intermediate_gated if is_gated(activation) else self.intermediate_plain


# TRTLLM-gen NVFP4 MoE: shuffled rows must be multiples of 128 (H, 2I gated, I plain); vLLM pads H to 256.
TRTLLM_ALIGNMENT = Alignment(hidden=256, intermediate_gated=64, intermediate_plain=128)


def intermediate_alignment(activation: str, alignment: Alignment = TRTLLM_ALIGNMENT) -> int:
    """The intermediate-size multiple for ``activation`` (64 gated / 128 not gated for TRTLLM)."""
    return alignment.intermediate(activation)


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """Sizes of one MoE layer and the padded sizes a kernel sees."""

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    activation: str = "silu"
    alignment: Alignment = TRTLLM_ALIGNMENT

    def __post_init__(self):
        for name in ("hidden", "intermediate", "experts", "top_k"):
            value = getattr(self, name)
            # SymInts appear when a fake function runs with dynamic weight shapes (opcheck does this).
            if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value <= 0:
                raise MoEConfigError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.experts:
            raise MoEConfigError(f"top_k={self.top_k} exceeds the number of experts ({self.experts})")
        is_gated(self.activation)

    @property
    def gated(self) -> bool:
        return is_gated(self.activation)

    @property
    def hidden_padded(self) -> int:
        return round_up(self.hidden, self.alignment.hidden)

    @property
    def intermediate_padded(self) -> int:
        return round_up(self.intermediate, self.alignment.intermediate(self.activation))

    @property
    def needs_hidden_pad(self) -> bool:
        return self.hidden_padded != self.hidden

    @property
    def w13_rows(self) -> int:
        return (2 if self.gated else 1) * self.intermediate_padded

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the kernel-ready (padded) NVFP4 weights, by the name the ops use."""
        e, hp, ip = self.experts, self.hidden_padded, self.intermediate_padded
        return {
            "w13": (e, self.w13_rows, hp // 2),
            "w13_scale": (e, self.w13_rows, hp // NVFP4_BLOCK),
            "w13_global_scale": (e,),
            "w2": (e, hp, ip // 2),
            "w2_scale": (e, hp, ip // NVFP4_BLOCK),
            "w2_global_scale": (e,),
        }

    def bias_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the kernel-ready (padded) expert biases: one per GEMM output row."""
        return {"w13_bias": (self.experts, self.w13_rows), "w2_bias": (self.experts, self.hidden_padded)}

    def weight_bytes(self) -> int:
        """Bytes of packed weights plus block scales plus global scales."""
        total = 0
        for name, shape in self.weight_shapes().items():
            n = 1
            for s in shape:
                n *= s
            total += n * (4 if name.endswith("global_scale") else 1)
        return total

    @classmethod
    def from_weights(cls, w13: torch.Tensor, w2: torch.Tensor, *, hidden: int, top_k: int, activation: str,
                     alignment: Alignment = TRTLLM_ALIGNMENT) -> "MoEShape":
        """The contract of packed, padded weights ``w13 [E, N1, Hp/2]`` and ``w2 [E, Hp, Ip/2]``."""
        e, n1, hp2 = w13.shape
        ip = w2.shape[-1] * 2
        gated = is_gated(activation)
        expected_rows = 2 * ip if gated else ip
        if n1 != expected_rows:
            raise MoEConfigError(
                f"w13 has {n1} rows but w2 implies intermediate {ip}: expected {expected_rows} rows for "
                f"{'gated' if gated else 'non-gated'} activation {activation!r}"
            )
        if w2.shape[0] != e or w2.shape[1] != hp2 * 2:
            raise MoEConfigError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} disagree on experts or hidden size")
        return cls(hidden=hidden, intermediate=ip, experts=e, top_k=top_k, activation=activation, alignment=alignment)


def trtllm_chunk_size(num_experts: int, top_k: int) -> int:
    """Most tokens one TRTLLM NVFP4 MoE launch may take.

    The kernel launches ``min(E, T*K) + max(0, T*K - E) // 128`` CTAs along grid.Y (limit 65535); the
    largest T within the limit is about ``(E + (65535 - E + 1) * 128 - 1) // K``, and illegal memory
    accesses were seen from about 305k tokens, hence the 300k cap.
    """
    if num_experts <= 0 or top_k <= 0 or top_k > num_experts:
        raise MoEConfigError(f"need 0 < top_k <= num_experts, got num_experts={num_experts}, top_k={top_k}")
    if num_experts > _GRID_Y_LIMIT:  # then T*K <= 65535 < E: one CTA per routed pair
        grid_bound = _GRID_Y_LIMIT // top_k
    else:
        grid_bound = (num_experts + (_GRID_Y_LIMIT - num_experts + 1) * _TRTLLM_TILE - 1) // top_k
    return min(_TRTLLM_TOKEN_CAP, grid_bound)


_warned_pads: set[tuple[int, int]] = set()


def _pad_last(t: torch.Tensor, amount: int) -> torch.Tensor:
    # float8 has no pad kernel on every backend: pad the raw bytes (zero bytes are +0.0 in e4m3).
    if amount == 0:
        return t
    raw = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    out = torch.nn.functional.pad(raw, (0, amount))
    return out.view(t.dtype) if t.dtype == torch.float8_e4m3fn else out


def pad_dim(t: torch.Tensor, dim: int, amount: int) -> torch.Tensor:
    """Zero-pad ``t`` by ``amount`` at the end of ``dim`` (float8 padded through its bytes)."""
    if amount == 0:
        return t
    return _pad_last(t.transpose(dim, -1), amount).transpose(dim, -1).contiguous()


def align_hidden_dim(w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                     alignment: int = 256):
    """Zero-pad packed NVFP4 weights and their block scales along the hidden dimension.

    ``w13 [E, N1, H/2]``, ``w13_scale [E, N1, H/16]``, ``w2 [E, H, I/2]``, ``w2_scale [E, H, I/16]``.
    Returns ``(w13, w13_scale, w2, w2_scale, hidden_padded)``; the very same tensors when ``H`` is
    already a multiple of ``alignment``.  Zero bytes are +0 in both E2M1 and E4M3, so padded columns
    contribute nothing to GEMM1 and padded rows of w2 produce zero outputs that are sliced away.
    Warns once per (H, padded H): padding costs bandwidth on every call.
    """
    if alignment <= 0 or alignment % NVFP4_BLOCK:
        raise MoEConfigError(f"hidden alignment must be a positive multiple of {NVFP4_BLOCK}, got {alignment}")
    for name, t, dt in (("w13", w13, torch.uint8), ("w13_scale", w13_scale, torch.float8_e4m3fn),
                        ("w2", w2, torch.uint8), ("w2_scale", w2_scale, torch.float8_e4m3fn)):
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.ndim != 3:
            raise MoEConfigError(f"{name} must be a 3-D {dt} tensor, got {getattr(t, 'dtype', type(t))} "
                                 f"with shape {tuple(getattr(t, 'shape', ()))}")
    hidden = w13.shape[-1] * 2
    if w13_scale.shape[-1] * NVFP4_BLOCK != hidden or w2.shape[1] != hidden or w2_scale.shape[1] != hidden:
        raise MoEConfigError(
            f"weights disagree on the hidden size: w13 {tuple(w13.shape)}, w13_scale {tuple(w13_scale.shape)}, "
            f"w2 {tuple(w2.shape)}, w2_scale {tuple(w2_scale.shape)}"
        )
    hidden_padded = round_up(hidden, alignment)
    if hidden_padded == hidden:
        return w13, w13_scale, w2, w2_scale, hidden
    if (hidden, hidden_padded) not in _warned_pads:
        _warned_pads.add((hidden, hidden_padded))
        warnings.warn(
            f"moe_nvfp4: padding hidden size {hidden} -> {hidden_padded} for a kernel that needs multiples of "
            f"{alignment}; every call moves {hidden_padded / hidden - 1:.1%} more activation bytes",
            category=PerformanceWarning,
            stacklevel=2,
        )
    extra = hidden_padded - hidden
    return (
        _pad_last(w13, extra // 2),
        _pad_last(w13_scale, extra // NVFP4_BLOCK),
        pad_dim(w2, 1, extra),
        pad_dim(w2_scale, 1, extra),
        hidden_padded,
    )


def align_intermediate_dim(w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                           *, gated: bool, alignment: int):
    """Zero-pad the intermediate dimension I of packed weights to a multiple of ``alignment``.

    For gated layers the gate and up halves of w13 are padded separately, so the layout stays
    ``[gate (Ip rows); up (Ip rows)]``.  Padded gate/up rows are zero, the activation of zero times
    zero is zero for every supported activation, and padded w2 columns are zero: the result is exact.
    """
    if alignment <= 0 or alignment % NVFP4_BLOCK:
        raise MoEConfigError(f"intermediate alignment {alignment} must be a positive multiple of {NVFP4_BLOCK}")
    inter = w2.shape[-1] * 2
    if w13.shape[1] != (2 * inter if gated else inter):
        raise MoEConfigError(f"w13 has {w13.shape[1]} rows, w2 an intermediate of {inter}: expected "
                             f"{2 * inter if gated else inter} rows ({'gated' if gated else 'not gated'})")
    padded = round_up(inter, alignment)
    if padded == inter:
        return w13, w13_scale, w2, w2_scale
    extra = padded - inter
    if gated:
        halves = [(w13[:, :inter], w13_scale[:, :inter]), (w13[:, inter:], w13_scale[:, inter:])]
        w13 = torch.cat([pad_dim(w, 1, extra) for w, _ in halves], dim=1)
        w13_scale = torch.cat([pad_dim(s, 1, extra) for _, s in halves], dim=1)
    else:
        w13, w13_scale = pad_dim(w13, 1, extra), pad_dim(w13_scale, 1, extra)
    return w13, w13_scale, _pad_last(w2, extra // 2), _pad_last(w2_scale, extra // NVFP4_BLOCK)


def align_biases(w13_bias, w2_bias, *, gated: bool, intermediate_padded: int, hidden_padded: int):
    """Zero-pad expert biases the way :func:`align_hidden_dim` / :func:`align_intermediate_dim` pad the weights.

    ``w13_bias [E, 2I]`` (gate half then up half, each padded on its own to ``intermediate_padded``) or
    ``[E, I]`` when not gated; ``w2_bias [E, H]`` padded to ``hidden_padded``.  Zero biases on padded rows
    keep the result exact: a padded gate and up row are 0, every supported activation maps them to 0, and
    padded output columns are sliced away.  Either bias may be None (returned as None).
    """
    if w13_bias is not None:
        rows = w13_bias.shape[1]
        if gated and rows % 2:
            raise MoEConfigError(f"a gated w13_bias has a gate half and an up half, got {rows} rows")
        inter = rows // 2 if gated else rows
        if inter > intermediate_padded:
            raise MoEConfigError(f"w13_bias has {rows} rows, more than the padded intermediate allows")
        if gated:
            w13_bias = torch.cat([pad_dim(h, 1, intermediate_padded - inter) for h in w13_bias.chunk(2, dim=1)], dim=1)
        else:
            w13_bias = pad_dim(w13_bias, 1, intermediate_padded - inter)
    if w2_bias is not None:
        if w2_bias.shape[1] > hidden_padded:
            raise MoEConfigError(f"w2_bias is {w2_bias.shape[1]} wide, wider than the padded hidden size {hidden_padded}")
        w2_bias = pad_dim(w2_bias, 1, hidden_padded - w2_bias.shape[1])
    return w13_bias, w2_bias


class PerformanceWarning(UserWarning):
    """A choice that is correct but costs speed (e.g. padding the hidden size)."""
