"""FusedMoE: the layer users write.  Float (or NVFP4) weights in, one FusedMoE graph node out.

The layer keeps the canonical NVFP4 weights (linear scales, ``[gate; up]`` rows, hidden padded only to
the NVFP4 block) as its state, in host memory, and prepares a kernel-ready copy on its device once, when
it is built, moved to another device or loaded from a state dict: padding to the kernel's alignment (the
shape contract), then the kernel's own layout.  On the CPU, when neither padding nor a new layout is
needed, the prepared tensors *are* the canonical ones.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
from torch import nn

from moe_passes.contract import (ACTIVATIONS, NVFP4_BLOCK, ROUTING_METHODS, MoEShape, align_biases,
                                 align_hidden_dim, align_intermediate_dim, is_gated, pad_dim, round_up)
from moe_passes.contract import activation_params as _params_of
from moe_passes.contract import routing_params as _routing_params_of
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import registry
from moe_passes.kernels.nvfp4 import default_global_scale, quantize_nvfp4_experts
from moe_passes.kernels.reference import apply_activation
from moe_passes import ops  # also registers the custom ops
from moe_passes.parallel import ExpertParallel, ParallelConfig, TensorParallel, shard_weights

__all__ = ["FusedMoE", "DEFAULT_ACTIVATION_AMAX"]

# Static activation scales an uncalibrated layer assumes: block maxima from 128/28672 = 0.0045 up to 128
# keep a normal (full-precision) e4m3 block scale; larger values saturate.  Calibrate for real models.
DEFAULT_ACTIVATION_AMAX = 128.0

_warned_uncalibrated = False
_KERNEL_BUFFERS = tuple("_kernel_" + n for n in registry.MoEWeights._fields)
# Expert biases: canonical fp32 copies (unpadded, [gate; up] rows) in host memory, and the kernel's copies.
_BIAS_BUFFERS = ("w13_bias", "w2_bias")
_KERNEL_BIAS_BUFFERS = tuple("_kernel_" + n for n in _BIAS_BUFFERS)
_SMALL_FP32_BUFFERS = ("routing_bias", "input_global_scale", "intermediate_global_scale")


def _reprepare_after_load(module: "FusedMoE", incompatible_keys) -> None:
    # load_state_dict writes the canonical buffers; the kernel's copy must follow.
    module._prepare(module.device)


def _pad_to_block(w: torch.Tensor, dim: int) -> torch.Tensor:
    return pad_dim(w, dim, round_up(w.shape[dim], NVFP4_BLOCK) - w.shape[dim])


def _check_biases(w13_bias, w2_bias, weights: registry.MoEWeights, hidden_size: int):
    """Canonical expert biases as fp32: ``w13_bias [E, N1]`` (one per canonical w13 row) and ``w2_bias``
    ``[E, H]`` or already ``[E, Hc]`` (the canonical w2's rows, H padded to the NVFP4 block), zero-padded to it."""
    experts, rows, canonical_hidden = weights.w13.shape[0], weights.w13.shape[1], weights.w2.shape[1]
    for name, t, wants in (("w13_bias", w13_bias, [(experts, rows)]),
                           ("w2_bias", w2_bias, [(experts, hidden_size), (experts, canonical_hidden)])):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dtype.itemsize < 2:
            raise MoEConfigError(f"{name} must be a float32/bfloat16/float16 tensor, got {getattr(t, 'dtype', type(t))}")
        if tuple(t.shape) not in wants:
            per = "w13 row" if name == "w13_bias" else "hidden column"
            raise MoEConfigError(f"{name} must have shape {list(wants[0])} (one per {per} of each expert), "
                                 f"got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise MoEConfigError(f"{name} contains NaN or infinite values")
    # copies (pad_dim and float() return their input where nothing changes): the layer owns its state
    if w2_bias is not None:
        w2_bias = pad_dim(w2_bias.detach().float(), 1, canonical_hidden - w2_bias.shape[1]).clone()
    return None if w13_bias is None else w13_bias.detach().float().clone(), w2_bias


def _checked_global_scale(name: str, value):
    """A static activation scale as given (None: the default), refused unless one finite positive number."""
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float32).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MoEConfigError(f"{name} must be one finite positive number, got {value!r}") from exc
    if t.numel() != 1 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise MoEConfigError(f"{name} must be one finite positive number (a scalar tensor or float), got "
                             f"{t.tolist() if t.numel() <= 4 else tuple(t.shape)}")
    return t


class FusedMoE(nn.Module):
    """An NVFP4 Mixture-of-Experts layer: ``forward(hidden_states [T, H], router_logits [T, E]) -> [T, H]``.

    Build it with :meth:`from_float`, or with the constructor from canonical NVFP4 weights (what the
    ModelOpt checkpoint loader in ``moe_passes.integrations.checkpoint`` does).  The routed
    experts run as one ``moe_nvfp4::fused_moe`` op; ``shared_expert`` (any module) is added after it.
    """

    def __init__(self, weights: registry.MoEWeights, *, hidden_size: int, intermediate_size: int, top_k: int,
                 activation: str = "silu", routing: str = "renormalize", shared_expert: Optional[nn.Module] = None,
                 routing_bias: Optional[torch.Tensor] = None, n_group: Optional[int] = None,
                 topk_group: Optional[int] = None, routed_scaling_factor: Optional[float] = None,
                 input_global_scale: Optional[torch.Tensor] = None,
                 intermediate_global_scale: Optional[torch.Tensor] = None,
                 kernel: Optional[str] = None, name: str = "", parallel: Optional[ParallelConfig] = None,
                 w13_bias: Optional[torch.Tensor] = None, w2_bias: Optional[torch.Tensor] = None,
                 activation_params=None, routing_params=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise MoEConfigError(f"unknown activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if routing not in ROUTING_METHODS:
            raise MoEConfigError(f"unknown routing {routing!r}; supported: {', '.join(ROUTING_METHODS)}")
        self.shape = MoEShape(hidden=hidden_size, intermediate=intermediate_size, experts=weights.w13.shape[0],
                              top_k=top_k, activation=activation)
        # [alpha, beta, limit] for swiglu_oai (its defaults when not given); None for the others
        self.activation_params = _params_of(activation, activation_params)
        # [jitter_eps] for sparsemixer (required); None for the others
        self.routing_params = _routing_params_of(routing, routing_params)
        w13_bias, w2_bias = _check_biases(w13_bias, w2_bias, weights, hidden_size)
        if parallel is not None and not isinstance(parallel, (ExpertParallel, TensorParallel)):
            raise MoEConfigError(f"parallel must be an ExpertParallel or TensorParallel, got {parallel!r}")
        if parallel is not None and (w13_bias is not None or w2_bias is not None):
            raise MoEConfigError("expert biases are not supported with parallel= yet: a tensor-parallel w2_bias "
                                 "must be added once, not once per rank; shard a layer without biases")
        registry.check_routing(routing, top_k, self.shape.experts, n_group, topk_group)
        self.hidden_size, self.intermediate_size, self.top_k = hidden_size, intermediate_size, top_k
        self.activation, self.routing, self.name = activation, routing, name
        self.n_group, self.topk_group, self.routed_scaling_factor = n_group, topk_group, routed_scaling_factor
        self.requested_kernel = kernel
        device = weights.w13.device
        # Sharded once, here: the layer keeps only its rank's part (canonical and kernel copies alike).
        self.parallel = parallel
        self.local_expert_offset, self.global_num_experts, self._local_intermediate = 0, None, intermediate_size
        self.group_name = ""
        if parallel is not None:
            rank = parallel.rank
            if rank < 0:  # torch.distributed's rank of a process outside the group
                raise MoEConfigError(f"this process is not a member of the process group of {parallel!r}: only its "
                                     "members can hold a shard of the layer")
            weights, info = shard_weights(weights, parallel, activation=activation, intermediate=intermediate_size,
                                          rank=rank, world_size=parallel.world_size)
            self.local_expert_offset, self.global_num_experts = info["local_expert_offset"], info["global_num_experts"]
            self._local_intermediate = info["intermediate"]
            self.group_name = parallel.group_name
        # The canonical copy lives in host memory: the device holds only the kernel's copy.
        for field, tensor in zip(registry.MoEWeights._fields, weights):
            self.register_buffer(field, tensor.cpu())
        for field, tensor in zip(_BIAS_BUFFERS, (w13_bias, w2_bias)):
            self.register_buffer(field, None if tensor is None else tensor.cpu())
        if routing_bias is not None:
            if not isinstance(routing_bias, torch.Tensor) or tuple(routing_bias.shape) != (self.shape.experts,):
                raise MoEConfigError(f"routing_bias must be a tensor of shape ({self.shape.experts},), got "
                                     f"{tuple(getattr(routing_bias, 'shape', ())) or type(routing_bias).__name__}")
            if not bool(torch.isfinite(routing_bias).all()):
                raise MoEConfigError("routing_bias contains NaN or infinite values")
        if not isinstance(name, str):
            raise MoEConfigError(f"name must be a str (the layer's name in errors), got {name!r}")
        if routed_scaling_factor is not None and not (isinstance(routed_scaling_factor, numbers.Real)
                                                      and not isinstance(routed_scaling_factor, bool)
                                                      and math.isfinite(routed_scaling_factor)
                                                      and routed_scaling_factor > 0):
            raise MoEConfigError(f"routed_scaling_factor must be a finite positive number, got "
                                 f"{routed_scaling_factor!r}")
        input_global_scale = _checked_global_scale("input_global_scale", input_global_scale)
        intermediate_global_scale = _checked_global_scale("intermediate_global_scale", intermediate_global_scale)
        # The small fp32 state lives with the kernel's weights: every tensor argument of the op is on one device.
        # a copy: the caller's tensor (a parameter of the float model, say) may change later, or require grad
        self.register_buffer("routing_bias", None if routing_bias is None
                             else routing_bias.detach().float().clone().to(device))
        global _warned_uncalibrated
        if input_global_scale is None or intermediate_global_scale is None:
            if not _warned_uncalibrated:
                _warned_uncalibrated = True
                warnings.warn(
                    "moe_nvfp4: FusedMoE built without calibration; static activation scales assume "
                    f"amax={DEFAULT_ACTIVATION_AMAX} (pass calibration= to from_float for accurate NVFP4 scales)",
                    stacklevel=3)
        default = default_global_scale(torch.tensor(DEFAULT_ACTIVATION_AMAX))
        self.register_buffer("input_global_scale", torch.as_tensor(
            default if input_global_scale is None else input_global_scale,
            dtype=torch.float32).reshape(()).clone().to(device))
        self.register_buffer("intermediate_global_scale", torch.as_tensor(
            default if intermediate_global_scale is None else intermediate_global_scale,
            dtype=torch.float32).reshape(()).clone().to(device))
        self.shared_expert = shared_expert
        self.kernel = ""
        self._prepare(device)
        self.register_load_state_dict_post_hook(_reprepare_after_load)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w13: torch.Tensor, w2: torch.Tensor, *, top_k: int, activation: str = "silu",
                   routing: str = "renormalize", shared_expert: Optional[nn.Module] = None,
                   routing_bias: Optional[torch.Tensor] = None, n_group: Optional[int] = None,
                   topk_group: Optional[int] = None, routed_scaling_factor: Optional[float] = None,
                   calibration: Optional[torch.Tensor] = None, kernel: Optional[str] = None,
                   name: str = "", parallel: Optional[ParallelConfig] = None,
                   w13_bias: Optional[torch.Tensor] = None, w2_bias: Optional[torch.Tensor] = None,
                   activation_params=None, routing_params=None) -> "FusedMoE":
        """Quantize float expert weights to NVFP4 (one global scale per expert) and prepare them.

        ``w13 [E, 2I, H]`` is gate rows then up rows for gated activations (``[E, I, H]`` for relu2);
        ``w2 [E, H, I]``.  ``calibration`` hidden states ``[N, H]`` set the static input and intermediate
        activation scales (the intermediate over every expert, an upper bound of the routed one).
        ``parallel`` (:class:`~moe_passes.parallel.ExpertParallel` / ``TensorParallel``): quantize the whole
        layer, as the unsharded one, then keep this rank's shard.  ``w13_bias [E, 2I]`` (gate half then up
        half; ``[E, I]`` for relu2) and ``w2_bias [E, H]``: expert biases, kept in fp32 (a bf16 checkpoint's
        values exactly; FlashInfer takes fp32).  ``activation_params``: ``contract.SwigluOAI`` (or
        ``[alpha, beta, limit]``) for ``swiglu_oai``; ``routing_params``: ``contract.SparseMixer`` (or
        ``[jitter_eps]``) for ``sparsemixer``.
        """
        for name_, t in (("w13", w13), ("w2", w2)):
            if not isinstance(t, torch.Tensor) or t.ndim != 3 or not t.dtype.is_floating_point or t.dtype.itemsize < 2:
                # float8 weights carry scales of their own (block or per-tensor): dequantize them first.
                raise MoEConfigError(f"{name_} must be a 3-D float16/bfloat16/float32 tensor, got "
                                     f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        experts, rows, hidden = w13.shape
        gated = is_gated(activation)
        inter = rows // 2 if gated else rows
        if (gated and rows % 2) or tuple(w2.shape) != (experts, hidden, inter):
            raise MoEConfigError(
                f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not form an MoE layer with activation "
                f"{activation!r}: expected w13 [E, {'2I' if gated else 'I'}, H] and w2 [E, H, I]")
        w13 = w13.detach().float()
        w2 = w2.detach().float()
        # NVFP4 blocks run along the reduction dims (H for w13, I for w2): pad those to the block first.
        if gated:
            w13 = torch.cat([_pad_to_block(half, 1) for half in w13.chunk(2, dim=1)], dim=1)
        else:
            w13 = _pad_to_block(w13, 1)
        w13 = _pad_to_block(w13, 2)
        w2 = _pad_to_block(_pad_to_block(w2, 1), 2)
        for name_, t, want in (("w13_bias", w13_bias, (experts, rows)), ("w2_bias", w2_bias, (experts, hidden))):
            if t is not None and (not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point
                                  or tuple(t.shape) != want):
                raise MoEConfigError(f"{name_} must be a float tensor of shape {list(want)}, got "
                                     f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if w13_bias is not None:  # padded like w13's rows, each half on its own
            w13_bias = w13_bias.detach().float()
            w13_bias = (torch.cat([_pad_to_block(h, 1) for h in w13_bias.chunk(2, dim=1)], dim=1) if gated
                        else _pad_to_block(w13_bias, 1))
        if w2_bias is not None:
            w2_bias = _pad_to_block(w2_bias.detach().float(), 1)
        q13, s13, g13 = quantize_nvfp4_experts(w13)
        q2, s2, g2 = quantize_nvfp4_experts(w2)
        gs_in = gs_mid = None
        if calibration is not None:
            gs_in, gs_mid = cls._calibrate(calibration, w13, activation, hidden, w13_bias, activation_params)
        return cls(registry.MoEWeights(q13, s13, g13, q2, s2, g2), hidden_size=hidden, intermediate_size=inter,
                   top_k=top_k, activation=activation, routing=routing, shared_expert=shared_expert,
                   routing_bias=routing_bias, n_group=n_group, topk_group=topk_group,
                   routed_scaling_factor=routed_scaling_factor, input_global_scale=gs_in,
                   intermediate_global_scale=gs_mid, kernel=kernel, name=name, parallel=parallel,
                   w13_bias=w13_bias, w2_bias=w2_bias, activation_params=activation_params,
                   routing_params=routing_params)

    @staticmethod
    def _calibrate(calibration: torch.Tensor, w13: torch.Tensor, activation: str, hidden: int,
                   w13_bias: Optional[torch.Tensor] = None, params=None):
        if (not isinstance(calibration, torch.Tensor) or not calibration.dtype.is_floating_point
                or calibration.ndim != 2 or calibration.shape[1] != hidden):
            raise MoEConfigError(f"calibration must be float hidden states [N, {hidden}], got "
                                 f"{getattr(calibration, 'dtype', type(calibration).__name__)} "
                                 f"{tuple(getattr(calibration, 'shape', ()))}")
        if not bool(torch.isfinite(calibration).all()):
            raise MoEConfigError("calibration contains NaN or infinite values: its amax would set no usable "
                                 "activation scale (an fp16 model that overflowed while calibrating?)")
        x = _pad_to_block(calibration.detach().float().to(w13.device), 1)
        amax_mid = torch.zeros((), device=w13.device)
        for e in range(w13.shape[0]):
            h = x @ w13[e].t()
            if w13_bias is not None:
                h = h + w13_bias[e].to(h.device)
            amax_mid = torch.maximum(amax_mid, apply_activation(h, activation, params).abs().amax())
        return default_global_scale(x.abs().amax()), default_global_scale(amax_mid)

    # -- kernel preparation ---------------------------------------------------------------------------
    @property
    def has_bias(self) -> bool:
        return self._buffers.get("w13_bias") is not None or self._buffers.get("w2_bias") is not None

    def _prepare(self, device: torch.device) -> None:
        spec = registry.select(device, activation=self.activation, routing=self.routing, name=self.requested_kernel,
                               biases=self.has_bias, routing_args=(self.top_k, self.n_group, self.topk_group))
        canonical = registry.MoEWeights(*(getattr(self, f).to(device) for f in registry.MoEWeights._fields))
        w13, s13, w2, s2, hidden_padded = align_hidden_dim(canonical.w13, canonical.w13_scale, canonical.w2,
                                                          canonical.w2_scale, alignment=spec.alignment.hidden)
        if hidden_padded != round_up(self.hidden_size, spec.alignment.hidden):
            raise MoEConfigError(f"weights are {hidden_padded} wide after padding, the layer's hidden size "
                                 f"{self.hidden_size} pads to {round_up(self.hidden_size, spec.alignment.hidden)}")
        w13, s13, w2, s2 = align_intermediate_dim(w13, s13, w2, s2, gated=is_gated(self.activation),
                                                  alignment=spec.alignment.intermediate(self.activation))
        shape = MoEShape(hidden=self.hidden_size, intermediate=self._local_intermediate, experts=canonical.w13.shape[0],
                         top_k=min(self.top_k, canonical.w13.shape[0]), activation=self.activation,
                         alignment=spec.alignment)
        prepared = spec.prepare(registry.MoEWeights(w13, s13, canonical.w13_global_scale, w2, s2,
                                                    canonical.w2_global_scale), shape)
        for buffer, tensor in zip(_KERNEL_BUFFERS, prepared):
            self.register_buffer(buffer, tensor, persistent=False)
        # The biases are padded as the weights were (hidden for w2_bias, each half of w13_bias to the padded
        # intermediate), then put in the row order the kernel gave its weights.
        b13, b2 = (None if self._buffers.get(b) is None else self._buffers[b].to(device) for b in _BIAS_BUFFERS)
        b13, b2 = align_biases(b13, b2, gated=shape.gated, intermediate_padded=shape.intermediate_padded,
                               hidden_padded=shape.hidden_padded)
        if spec.prepare_biases is not None and (b13 is not None or b2 is not None):
            b13, b2 = spec.prepare_biases(b13, b2, shape)
        for buffer, tensor in zip(_KERNEL_BIAS_BUFFERS, (b13, b2)):
            self.register_buffer(buffer, None if tensor is None else tensor.contiguous(), persistent=False)
        if spec.prepare_state is not None:
            spec.prepare_state(device, shape, self._run_args())
        self.kernel = spec.name
        self.kernel_shape = shape

    def _run_args(self) -> registry.RunArgs:
        return registry.RunArgs(top_k=self.top_k, activation=self.activation, routing=self.routing,
                                n_group=self.n_group, topk_group=self.topk_group,
                                routed_scaling_factor=self.routed_scaling_factor,
                                activation_params=None if self.activation_params is None
                                else tuple(self.activation_params),
                                routing_params=None if self.routing_params is None else tuple(self.routing_params))

    def __setstate__(self, state):
        super().__setstate__(state)
        # Unpickled elsewhere (torch.load(map_location=...)): the kernel copy was prepared for the device it was
        # saved from; prepare it again where the kernel chosen for this device is another.
        if "_kernel_w13" in self._buffers and registry.select(
                self.device, activation=self.activation, routing=self.routing, name=self.requested_kernel,
                biases=self.has_bias, routing_args=(self.top_k, self.n_group, self.topk_group)).name != self.kernel:
            self._prepare(self.device)

    @property
    def device(self) -> torch.device:
        """Where the kernel's weights are (the canonical copy stays in host memory)."""
        return self._buffers["_kernel_w13"].device

    def _apply(self, fn, *args, **kwargs):
        # Module.to / .cuda / .half convert every floating buffer, and float8 block scales and fp32
        # global scales count as floating point.  The NVFP4 weights are kept out of the generic
        # conversion: the canonical copy stays in host memory, and the kernel's copy is prepared anew
        # from it when the device changes (never per forward call).  The small fp32 buffers follow the
        # device but keep their dtype, taken from the untouched originals so no precision is lost.
        order = list(self._buffers)
        kept = {name: self._buffers.pop(name) for name in registry.MoEWeights._fields + _KERNEL_BUFFERS
                + _BIAS_BUFFERS + _KERNEL_BIAS_BUFFERS if name in self._buffers}
        small = {name: self._buffers[name] for name in _SMALL_FP32_BUFFERS if self._buffers.get(name) is not None}
        try:
            result = super()._apply(fn, *args, **kwargs)
        finally:
            merged = {name: kept[name] if name in kept else self._buffers[name] for name in order}
            self._buffers.clear()
            self._buffers.update(merged)
        for name, original in small.items():
            moved = self._buffers[name]
            if moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        before = kept["_kernel_w13"].device
        after = fn(torch.empty(0, dtype=torch.uint8, device=before)).device
        if after != before:
            self._prepare(after)
        return result

    def kernel_weights(self) -> registry.MoEWeights:
        """The weights as the selected kernel reads them (its op arguments): padded, and in the kernel's
        own byte layout (the Triton kernel re-places E2M1 bits), so not for computing a reference."""
        buffers = self._buffers  # not getattr: Module.__getattr__'s fallback costs ~0.75 us a tensor per call
        return registry.MoEWeights(*(buffers[b] for b in _KERNEL_BUFFERS))

    def canonical_weights(self, device=None) -> registry.MoEWeights:
        """The canonical NVFP4 weights (unpadded, canonical layout: what the reference and checkpoints use)
        on ``device`` (default: the kernel's device)."""
        device = self.device if device is None else torch.device(device)
        return registry.MoEWeights(*(getattr(self, f).to(device) for f in registry.MoEWeights._fields))

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Bad input raised here reaches the user as our own error; raised by the op's fake it would
            # come wrapped in Dynamo's TorchRuntimeError.  Eagerly the op itself checks (no double cost).
            ops.check_layer_inputs(hidden_states, router_logits, hidden_size=self.hidden_size,
                                   hidden_padded=self.kernel_shape.hidden_padded, experts=self.shape.experts,
                                   device=self.device, layer=self.name)
        buffers = self._buffers
        routed = torch.ops.moe_nvfp4.fused_moe(
            hidden_states, router_logits, *self.kernel_weights(), buffers["input_global_scale"],
            buffers["intermediate_global_scale"], buffers["routing_bias"], self.hidden_size, self.top_k,
            self.activation, self.routing, self.n_group, self.topk_group, self.routed_scaling_factor, self.kernel,
            self.name, *self._parallel_args(), **self._bias_args())
        if self.shared_expert is not None:
            return routed + self.shared_expert(hidden_states)
        return routed

    def _bias_args(self) -> dict:
        # Keywords only where the layer has them, so a layer without biases keeps its graph and cache key.
        args = {name: self._buffers[b] for name, b in zip(_BIAS_BUFFERS, _KERNEL_BIAS_BUFFERS)
                if self._buffers.get(b) is not None}
        if self.activation_params is not None:
            args["activation_params"] = list(self.activation_params)
        if self.routing_params is not None:
            args["routing_params"] = list(self.routing_params)
        return args

    def _parallel_args(self) -> tuple:
        # Left off for an unsharded layer, so its graph and cache key stay as before.
        if self.parallel is None:
            return ()
        dp = isinstance(self.parallel, ExpertParallel) and self.parallel.data_parallel
        return (self.local_expert_offset, self.global_num_experts, self.group_name, dp)

    def extra_repr(self) -> str:
        s = self.kernel_shape
        return (f"experts={s.experts}, hidden={s.hidden} (padded {s.hidden_padded}), intermediate={s.intermediate} "
                f"(padded {s.intermediate_padded}), top_k={self.top_k}, activation={self.activation!r}, "
                f"routing={self.routing!r}, kernel={self.kernel!r}"
                + (f", activation_params={self.activation_params}" if self.activation_params is not None else "")
                + (f", routing_params={self.routing_params}" if self.routing_params is not None else "")
                + (", biases" if self.has_bias else "")
                + (f", parallel={self.parallel.describe()}" if self.parallel is not None else ""))
