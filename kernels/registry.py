"""Kernel capabilities as data.

Each kernel that can implement the lowered op ``moe_nvfp4::trtllm_nvfp4_moe`` declares here what it
supports (devices, activations, routing methods, alignments, token limits), how to lay weights out for
itself once, and how to run.  Lowering and the layer ask the registry; an activation or shape a kernel
cannot take is a clear error at build / compile time, never an assert inside a launch.

This module knows nothing of torch.compile.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from moe_passes.contract import ACTIVATIONS, PARAMETRIC_ACTIVATIONS, ROUTING_METHODS, Alignment, MoEShape
from moe_passes.errors import KernelUnavailableError, MoEConfigError
from moe_passes.kernels.options import KernelOptions

__all__ = ["MoEWeights", "RunArgs", "KernelSpec", "register", "get", "names", "select", "check_supported",
           "KernelFallbackWarning", "ROUTING_TOP_K", "routing_error", "check_routing", "RoutingLimits",
           "alignment_error"]


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
    # The activation's parameters ([alpha, beta, limit] for swiglu_oai; contract.activation_params), or None.
    activation_params: Optional[tuple] = None
    # The routing method's parameters ([jitter_eps] for sparsemixer; contract.routing_params), or None.
    routing_params: Optional[tuple] = None
    # The kernels' knobs for this call (None: ``options.current()``, the scoped or environment default).
    options: Optional[KernelOptions] = None


# run(hidden_states [T, Hp], router_logits [T, E], weights, input_global_scale, intermediate_global_scale,
#     routing_bias or None, args[, w13_bias=, w2_bias=]) -> [T, Hp] bfloat16.  The bias keywords are passed
#     only to kernels that declare expert_bias, and only when the layer has biases.
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
    # Calls of at most this many tokens replay from CUDA graphs the kernel captures itself (kernels.graphed):
    # worth it where the host's launches outlast the GPU work.  0: never (the kernel is not capture-safe).
    graph_tokens: int = 0
    # For those calls: ``direct(same arguments as run)`` may return a repeat of the call cheaper than a graph's
    # copies and replay (``repeat(hidden_states, router_logits) -> output or None``), or None (a graph is
    # captured).  Valid while the call's key in kernels.graphed holds.
    direct: Optional[Callable] = None
    # For calls above ``graph_tokens``: ``replay(same arguments as run)`` may return a repeat of the call cheaper
    # than running it (``triton_launch.Replay``: its launches recorded once), or None (it runs every time).
    # Kept in kernels.graphed under the call's key, valid while that key holds; never captured in a graph.
    replay: Optional[Callable] = None
    # Preference when several kernels are available on a device (higher wins).
    priority: int = 0
    # Activations this kernel lacks, mapped to the reason shown to the user.
    unsupported_reasons: dict = dataclasses.field(default_factory=dict)
    # Expert biases (w13_bias [E, N1] after GEMM1, w2_bias [E, Hp] after GEMM2, before the routing weight).
    # Off by default: a kernel that never heard of them is never picked for a layer that has them.
    expert_bias: bool = False
    # Parametric activations (contract.PARAMETRIC_ACTIVATIONS, e.g. swiglu_oai) count as supported only with
    # this set, so that a kernel declaring ``frozenset(ACTIVATIONS)`` does not claim them unawares.
    activation_params: bool = False
    # Lays the padded canonical biases out for the kernel (the row order its prepared weights got), once per
    # device: (w13_bias or None, w2_bias or None, shape) -> the same.  None: used as they are.
    prepare_biases: Optional[Callable] = None
    # Limits of the kernel's own routing beyond the methods' rules: ``(routing, top_k, n_group, topk_group) ->``
    # why it cannot route that, or None.  A layer outside them takes another kernel, as for an activation.
    routing_limits: Optional[Callable[[str, int, Optional[int], Optional[int]], Optional[str]]] = None

    def __post_init__(self):
        bad = (set(self.activations) - set(ACTIVATIONS)) | (set(self.routings) - set(ROUTING_METHODS))
        if bad:
            raise MoEConfigError(f"kernel {self.name!r} declares unknown activations/routings {sorted(bad)}")

    def supports_activation(self, activation: str) -> bool:
        return activation in self.activations and (activation not in PARAMETRIC_ACTIVATIONS or self.activation_params)

    def lacks(self, *, activation: str, routing: str, biases: bool = False,
              routing_args: Optional[tuple] = None) -> Optional[str]:
        """Why this kernel cannot run a layer with these features, or None when it can; ``routing_args``
        ``(top_k, n_group, topk_group)``, when given, are checked against :attr:`routing_limits`."""
        if not self.supports_activation(activation):
            reason = self.unsupported_reasons.get(activation, "")
            if not reason and activation in self.activations:  # declared, but not its parameters
                reason = "it takes no activation parameters (alpha, beta, clamp limit)"
            return f"activation {activation!r}" + (f" ({reason})" if reason else "")
        if routing not in self.routings:
            return f"routing {routing!r}"
        if biases and not self.expert_bias:
            return "expert biases (w13_bias / w2_bias)"
        if routing_args is not None and self.routing_limits is not None:
            return self.routing_limits(routing, *routing_args)
        return None


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
    spec = _REGISTRY.get(name)  # every call of the op looks its kernel up: skip the import check on a hit
    if spec is not None:
        return spec
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MoEConfigError(f"unknown kernel {name!r}; registered kernels: {', '.join(sorted(_REGISTRY))}") from None


def check_supported(spec: KernelSpec, *, activation: str, routing: str, biases: bool = False,
                    routing_args: Optional[tuple] = None) -> None:
    """Raise :class:`MoEConfigError` naming the kernel, what it lacks and the kernels that have it."""
    if not spec.supports_activation(activation):
        others = [n for n in names() if _REGISTRY[n].supports_activation(activation)]
        supported = sorted(a for a in spec.activations if spec.supports_activation(a))
        raise MoEConfigError(f"kernel {spec.name!r} does not support {spec.lacks(activation=activation, routing=routing)}"
                             f"; it supports {supported}; kernels that do: {others or 'none'}")
    if routing not in spec.routings:
        raise MoEConfigError(f"kernel {spec.name!r} does not support routing {routing!r}; it supports {sorted(spec.routings)}")
    if biases and not spec.expert_bias:
        others = [n for n in names() if _REGISTRY[n].expert_bias]
        raise MoEConfigError(f"kernel {spec.name!r} does not support expert biases (w13_bias / w2_bias); kernels "
                             f"that do: {others or 'none'}")
    limit = spec.lacks(activation=activation, routing=routing, biases=biases, routing_args=routing_args)
    if limit is not None:
        raise MoEConfigError(f"kernel {spec.name!r} does not support {limit}")


# (device type, kernel chosen, kernels passed over) already warned about: once per combination.
_FALLBACK_WARNED: set = set()


class KernelFallbackWarning(UserWarning):
    """A faster kernel available on the device lacks a feature of the layer; a slower one runs it."""


def select(device: torch.device, *, activation: str, routing: str, name: Optional[str] = None,
           biases: bool = False, routing_args: Optional[tuple] = None) -> KernelSpec:
    """The kernel to use on ``device``: ``name`` if given (checked), else the best available one that
    supports the activation, the routing (and its ``routing_args``, see :meth:`KernelSpec.lacks`) and
    (``biases``) expert biases.  When a higher-priority kernel
    available there lacks one of them, warn once naming it and what it lacks."""
    device = torch.device(device)
    if name is not None:
        spec = get(name)
        if not spec.available(device):
            raise KernelUnavailableError(f"kernel {name!r} cannot run on {device}: {spec.description}")
        check_supported(spec, activation=activation, routing=routing, biases=biases, routing_args=routing_args)
        return spec
    available = [_REGISTRY[n] for n in names() if _REGISTRY[n].available(device)]
    features = dict(activation=activation, routing=routing, biases=biases, routing_args=routing_args)
    candidates = [s for s in available if s.lacks(**features) is None]
    if not candidates:
        why = "; ".join(f"{s.name!r} lacks {s.lacks(**features)}" for s in available)
        raise MoEConfigError(f"no registered kernel runs activation {activation!r} with routing {routing!r}"
                             f"{' and expert biases' if biases else ''} on {device}" + (f" ({why})" if why else ""))
    best = max(candidates, key=lambda s: s.priority)
    passed_over = sorted((s for s in available if s.priority > best.priority and s not in candidates),
                         key=lambda s: -s.priority)
    key = (device.type, best.name, tuple(s.name for s in passed_over))
    # Only a real loss is worth a warning: on the CPU the reference is the only kernel anyway.
    if passed_over and device.type != "cpu" and key not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(key)
        lacking = "; ".join(f"kernel {s.name!r} lacks {s.lacks(**features)}" for s in passed_over)
        warnings.warn(f"moe_nvfp4: {lacking}, so this layer runs on {best.name!r} ({best.description})",
                      KernelFallbackWarning, stacklevel=3)
    return best


# Routing methods whose semantics fix top_k: llama4 picks one expert per token, sparsemixer two.
ROUTING_TOP_K = {"llama4": 1, "sparsemixer": 2}


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
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            return f"{name} must be a positive int or None, got {value!r}"
    if routing == "deepseek_v3":
        groups = n_group or 1
        if experts % groups:
            return f"n_group={groups} must divide the number of experts ({experts})"
        keep = topk_group or groups
        if not 0 < keep <= groups:
            return f"topk_group={keep} must be between 1 and n_group={groups}"
        if top_k > keep * (experts // groups):
            return (f"top_k={top_k} is more than the {keep * (experts // groups)} experts in the "
                    f"topk_group={keep} kept groups of {experts // groups}")
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
    of deepseek_v3 allow; ``methods``, the routing methods it implements (None: every one).  Calls outside
    them take another implementation (the torch routing)."""

    max_experts: int
    max_top_k: int
    methods: Optional[frozenset] = None

    def refusal(self, routing: str, top_k: int, experts: int, n_group: Optional[int] = None,
                topk_group: Optional[int] = None) -> Optional[str]:
        error = routing_error(routing, top_k, experts, n_group, topk_group)
        if error is not None:
            return error
        if self.methods is not None and routing not in self.methods:
            return f"routing {routing!r} is not implemented (it implements {', '.join(sorted(self.methods))})"
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
