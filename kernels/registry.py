"""Kernel capabilities as data.

Each kernel that can implement the lowered op ``moe_nvfp4::trtllm_nvfp4_moe`` declares here what it
supports (devices, activations, routing methods, alignments, token limits), how to lay weights out for
itself once, and how to run.  Lowering and the layer ask the registry; an activation or shape a kernel
cannot take is a clear error at build / compile time, never an assert inside a launch.

This module knows nothing of torch.compile.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch

from moe_passes.contract import ACTIVATIONS, ROUTING_METHODS, Alignment, MoEShape
from moe_passes.errors import KernelUnavailableError, MoEConfigError
from moe_passes.kernels.options import KernelOptions

__all__ = ["MoEWeights", "RunArgs", "KernelSpec", "register", "get", "names", "select", "check_supported",
           "ROUTING_TOP_K", "routing_error", "check_routing", "RoutingLimits", "alignment_error"]


class MoEWeights(NamedTuple):
    """NVFP4 expert weights as the kernel op takes them (also the order of the op's tensor arguments).

    Canonical layout (what :func:`prepare` receives): ``w13 uint8 [E, N1, Hp/2]`` with gate rows first
    then up rows for gated activations, ``w13_scale float8_e4m3fn [E, N1, Hp/16]`` linear, ``w2 uint8
    [E, Hp, Ip/2]``, ``w2_scale [E, Hp, Ip/16]`` linear, global scales float32 ``[E]`` (multipliers:
    dequantized = e2m1 * block_scale / global_scale).  A kernel's prepared weights keep these logical
    shapes and dtypes; only the order of bytes within them (or strides) may differ.
    """

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w13_global_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    w2_global_scale: torch.Tensor


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """Non-tensor arguments of one MoE call."""

    top_k: int
    activation: str
    routing: str
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: Optional[float] = None
    # Expert parallelism: the weights hold experts [offset, offset + E_local) of global_num_experts (None: all).
    local_expert_offset: int = 0
    global_num_experts: Optional[int] = None
    # The kernels' knobs for this call (None: ``options.current()``, the scoped or environment default).
    options: Optional[KernelOptions] = None


# run(hidden_states [T, Hp], router_logits [T, E], weights, input_global_scale, intermediate_global_scale,
#     routing_bias or None, args) -> [T, Hp] bfloat16
RunFn = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    name: str
    description: str
    alignment: Alignment
    activations: frozenset
    routings: frozenset
    # Is this kernel usable on `device` right now (hardware capability and packages)?
    available: Callable[[torch.device], bool]
    prepare: Callable[[MoEWeights, MoEShape], MoEWeights]
    run: RunFn
    # State the kernel's calls keep on the device (barrier counters, plan tables), made once when a layer is
    # prepared for it, so that no call allocates anything that outlives it (CUDA graph trees refuse that).
    prepare_state: Optional[Callable[[torch.device, MoEShape, RunArgs], None]] = None
    # Most tokens per launch for (experts, top_k), or None for no limit; the op chunks above it.
    max_tokens: Optional[Callable[[int, int], int]] = None
    # Does the kernel quantize activations to NVFP4 (TRTLLM) or keep them in bf16 (Hopper path)? The op warns
    # about activations beyond the calibrated range only where they are quantized.
    quantizes_activations: bool = True
    # Preference when several kernels are available on a device (higher wins).
    priority: int = 0
    # Activations this kernel lacks, mapped to the reason shown to the user.
    unsupported_reasons: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        bad = (set(self.activations) - set(ACTIVATIONS)) | (set(self.routings) - set(ROUTING_METHODS))
        if bad:
            raise MoEConfigError(f"kernel {self.name!r} declares unknown activations/routings {sorted(bad)}")


_REGISTRY: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise MoEConfigError(f"a kernel named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_builtin() -> None:
    # Importing the kernel modules registers them; done lazily to keep import light and cycle-free.
    # Each guards its own optional dependency (triton, flashinfer), so these imports always succeed.
    from moe_passes.kernels import flashinfer_trtllm, reference, triton_moe  # noqa: F401


def names() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> KernelSpec:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MoEConfigError(f"unknown kernel {name!r}; registered kernels: {', '.join(sorted(_REGISTRY))}") from None


def check_supported(spec: KernelSpec, *, activation: str, routing: str) -> None:
    """Raise :class:`MoEConfigError` naming the kernel and the alternatives when it cannot run these."""
    if activation not in spec.activations:
        reason = spec.unsupported_reasons.get(activation, "")
        others = [n for n in names() if activation in _REGISTRY[n].activations]
        raise MoEConfigError(
            f"kernel {spec.name!r} does not support activation {activation!r}"
            + (f" ({reason})" if reason else "")
            + f"; it supports {sorted(spec.activations)}; kernels that do: {others or 'none'}"
        )
    if routing not in spec.routings:
        raise MoEConfigError(f"kernel {spec.name!r} does not support routing {routing!r}; it supports {sorted(spec.routings)}")


def select(device: torch.device, *, activation: str, routing: str, name: Optional[str] = None) -> KernelSpec:
    """The kernel to use on ``device``: ``name`` if given (checked), else the best available one."""
    device = torch.device(device)
    if name is not None:
        spec = get(name)
        if not spec.available(device):
            raise KernelUnavailableError(f"kernel {name!r} cannot run on {device}: {spec.description}")
        check_supported(spec, activation=activation, routing=routing)
        return spec
    candidates = [
        _REGISTRY[n] for n in names()
        if _REGISTRY[n].available(device) and activation in _REGISTRY[n].activations and routing in _REGISTRY[n].routings
    ]
    if not candidates:
        raise MoEConfigError(f"no registered kernel runs activation {activation!r} with routing {routing!r} on {device}")
    return max(candidates, key=lambda s: s.priority)


# Routing methods whose semantics fix top_k: llama4 picks one expert per token.
ROUTING_TOP_K = {"llama4": 1}


def routing_error(routing: str, top_k: int, experts: int, n_group: Optional[int] = None,
                  topk_group: Optional[int] = None) -> Optional[str]:
    """Why these routing arguments mean nothing for any kernel (the methods' own rules), or None."""
    if routing not in ROUTING_METHODS:
        return f"unknown routing {routing!r}; supported: {', '.join(ROUTING_METHODS)}"
    if not 0 < top_k <= experts:
        return f"top_k={top_k} must be between 1 and the number of experts ({experts})"
    fixed = ROUTING_TOP_K.get(routing, top_k)
    if top_k != fixed:
        count = "one expert" if fixed == 1 else f"{fixed} experts"
        return f"{routing} routing picks {count} per token, got top_k={top_k}"
    if routing == "deepseek_v3":
        groups = n_group or 1
        if experts % groups:
            return f"n_group={groups} must divide the number of experts ({experts})"
        keep = topk_group or groups
        if not 0 < keep <= groups:
            return f"topk_group={keep} must be between 1 and n_group={groups}"
    return None


def check_routing(routing: str, top_k: int, experts: int, n_group: Optional[int] = None,
                  topk_group: Optional[int] = None) -> None:
    """:func:`routing_error` as a :class:`MoEConfigError`: every kernel and the layer refuse the same calls."""
    error = routing_error(routing, top_k, experts, n_group, topk_group)
    if error is not None:
        raise MoEConfigError(error)


@dataclasses.dataclass(frozen=True)
class RoutingLimits:
    """What a fused routing implementation takes beyond the methods' rules (its registers and index bits):
    at most ``max_experts`` and ``max_top_k``, a power-of-two group count, and ``topk_group`` only as groups
    of deepseek_v3 allow.  Calls outside them take another implementation (the torch routing)."""

    max_experts: int
    max_top_k: int

    def refusal(self, routing: str, top_k: int, experts: int, n_group: Optional[int] = None,
                topk_group: Optional[int] = None) -> Optional[str]:
        error = routing_error(routing, top_k, experts, n_group, topk_group)
        if error is not None:
            return error
        groups = (n_group or 1) if routing == "deepseek_v3" else 1
        if not 0 < (topk_group or groups) <= groups:
            return f"topk_group={topk_group} without deepseek_v3 groups"
        if groups & (groups - 1):
            return f"n_group={groups} is not a power of two"
        if top_k > self.max_top_k or experts > self.max_experts:
            return f"at most {self.max_experts} experts and top_k {self.max_top_k}"
        return None


def alignment_error(alignment: Alignment, hidden: int, inter: int, activation: str) -> Optional[str]:
    """Why a kernel of ``alignment`` cannot take these (padded) sizes, or None."""
    h, i = alignment.hidden, alignment.intermediate(activation)
    if hidden % h or inter % i:
        need = f"multiples of {h}" if h == i else f"multiples of {h} and {i}"
        return f"hidden ({hidden}) and intermediate ({inter}) must be {need}"
    return None
