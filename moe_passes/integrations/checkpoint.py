"""NVFP4 expert weights in the ModelOpt checkpoint layout: load them into FusedMoE, and write them.

Layout, per expert ``e`` under a prefix such as ``model.layers.3.mlp.experts``, for each projection
(``gate_proj`` / ``up_proj`` / ``down_proj``, or Mixtral's ``w1`` / ``w3`` / ``w2``):

=======================  ================  ==============================================================
key                      dtype, shape      meaning
=======================  ================  ==============================================================
``{p}.{e}.{proj}.weight``        uint8 ``[N, K/2]``   E2M1 pairs, even element in the low nibble
``{p}.{e}.{proj}.weight_scale``  e4m3 ``[N, K/16]``  linear block scales
``{p}.{e}.{proj}.weight_scale_2`` fp32 ``[]``        ``amax / (448*6)`` = 1 / global scale
``{p}.{e}.{proj}.input_scale``   fp32 ``[]``        activation ``amax / (448*6)``
=======================  ================  ==============================================================

Loading stacks the packed bytes and block scales as they are (no round trip through float); the
FusedMoE constructor pads hidden (and intermediate) to its kernel's alignment.

Gate and up with different ``weight_scale_2``: FusedMoE holds one global scale per expert for the
fused ``[gate; up]`` matrix.  Re-scaling one half's e4m3 block scales is not exact.  The loader keeps
every byte and uses the *gate's* global scale for the whole w13.  The up half then computes
``up * c`` with ``c = ws_gate / ws_up``; because ``act(gate) * up`` is linear in ``up``, the
intermediate is ``c`` times the true one, and multiplying w2's global scale by ``c`` (which divides
w2's dequantized values by ``c``) cancels it: ``w2_global_scale = c / ws_down``.  Weights and the
product through the expert are then exact up to one fp32 rounding of that scalar.  What ``c`` does
change is the input of the intermediate activation quantization (per-expert scaled by ``c``), whose
block scales therefore round differently; the static intermediate scale is derived from
``max_e(c_e * input_scale(down)_e)`` so that no expert saturates.  Only gated activations need this, and
only those linear in ``up`` take it: ``swiglu_oai`` clamps ``up`` and adds 1 to it, so its layers need gate
and up to share one ``weight_scale_2`` (what ModelOpt exports for gpt-oss's fused ``gate_up_proj``).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import torch

from moe_passes.contract import is_gated
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import registry
from moe_passes.kernels.nvfp4 import E2M1_MAX, E4M3_MAX, default_global_scale, quantize_nvfp4
from moe_passes.layer import FusedMoE

__all__ = ["load_modelopt_experts", "load_modelopt_moe", "modelopt_expert_tensors", "save_modelopt_experts",
           "PROJECTION_NAMES"]

# (gate, up, down) projection names, in the order tried.
PROJECTION_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# Gated activations of the form act(gate) * up: a factor on up passes through them unchanged.
_LINEAR_IN_UP = frozenset({"silu", "gelu", "gelu_tanh"})

Tensors = Mapping[str, torch.Tensor]
Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Tensors]


class _Reader:
    """Read named tensors from a dict or from safetensors file(s), opening each file once."""

    def __init__(self, source: Source, device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self._dict: Optional[Tensors] = None
        self._files = {}
        if isinstance(source, Mapping):
            self._dict = source
            return
        from safetensors import safe_open

        paths = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        for path in paths:
            handle = safe_open(os.fspath(path), framework="pt", device=str(self.device))
            for key in handle.keys():
                self._files[key] = handle

    def __contains__(self, key: str) -> bool:
        return key in (self._dict if self._dict is not None else self._files)

    def keys(self):
        return (self._dict if self._dict is not None else self._files).keys()

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self:
            raise MoEConfigError(f"checkpoint has no tensor {key!r}")
        if self._dict is not None:
            return self._dict[key].to(self.device)
        return self._files[key].get_tensor(key)


def _projection_names(reader: _Reader, prefix: str, gated: bool) -> tuple:
    for gate, up, down in PROJECTION_NAMES:
        first = f"{prefix}.0.{gate if gated else up}.weight"
        if first in reader and f"{prefix}.0.{down}.weight" in reader:
            return gate, up, down
    raise MoEConfigError(f"no ModelOpt NVFP4 experts under {prefix!r}: expected {prefix}.0.gate_proj.weight "
                         f"(or .w1.weight) and the matching down projection")


def _count_experts(reader: _Reader, prefix: str, down: str) -> int:
    n = 0
    while f"{prefix}.{n}.{down}.weight" in reader:
        n += 1
    # A gap would silently drop every expert after it: name the first missing one instead.
    start, tail = f"{prefix}.", f".{down}.weight"
    later = [int(k[len(start):-len(tail)]) for k in reader.keys()
             if k.startswith(start) and k.endswith(tail) and k[len(start):-len(tail)].isdigit()]
    if later and max(later) >= n:
        raise MoEConfigError(f"experts under {prefix!r}: {prefix}.{n}.{down}.weight is missing but expert "
                             f"{max(later)} is present (pass num_experts= to load fewer)")
    return n


def _projection(reader: _Reader, key: str):
    weight, scale = reader[f"{key}.weight"], reader[f"{key}.weight_scale"]
    ws2, in_scale = reader[f"{key}.weight_scale_2"], reader[f"{key}.input_scale"]
    if weight.dtype != torch.uint8 or weight.ndim != 2:
        raise MoEConfigError(f"{key}.weight must be packed uint8 [N, K/2], got {weight.dtype} {tuple(weight.shape)}")
    if scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (weight.shape[0], weight.shape[1] // 8):
        raise MoEConfigError(f"{key}.weight_scale must be float8_e4m3fn {(weight.shape[0], weight.shape[1] // 8)} "
                             f"(one per 16 elements), got {scale.dtype} {tuple(scale.shape)}")
    if ws2.numel() != 1 or in_scale.numel() != 1:
        raise MoEConfigError(f"{key}: weight_scale_2 and input_scale must hold one value each, got shapes "
                             f"{tuple(ws2.shape)} and {tuple(in_scale.shape)}")
    ws2, in_scale = ws2.float().reshape(()), in_scale.float().reshape(())
    if not all(bool(torch.isfinite(v)) and bool(v > 0) for v in (ws2, in_scale)):
        raise MoEConfigError(f"{key}: weight_scale_2 and input_scale must be finite and positive, got {float(ws2)}, "
                             f"{float(in_scale)}")
    return weight, scale, ws2, in_scale


def load_modelopt_experts(source: Source, prefix: str, *, activation: str = "silu", num_experts: Optional[int] = None,
                          device: Union[str, torch.device] = "cpu"):
    """Read one layer's experts; returns ``(MoEWeights (canonical, unpadded), input_global_scale,
    intermediate_global_scale, hidden_size, intermediate_size)``.  Never dequantizes."""
    reader = _Reader(source, device)
    gated = is_gated(activation)
    gate_n, up_n, down_n = _projection_names(reader, prefix, gated)
    experts = num_experts if num_experts is not None else _count_experts(reader, prefix, down_n)
    if experts <= 0:
        raise MoEConfigError(f"no experts found under {prefix!r}")
    if not gated and f"{prefix}.0.{gate_n}.weight" in reader:
        raise MoEConfigError(f"experts under {prefix!r} have a gate projection ({gate_n}) but activation "
                             f"{activation!r} is not gated: loading would drop it; pass the model's gated activation")
    w13, s13, g13, w2, s2, g2, in_scales, mid_scales = [], [], [], [], [], [], [], []
    for e in range(experts):
        up = _projection(reader, f"{prefix}.{e}.{up_n}")
        down = _projection(reader, f"{prefix}.{e}.{down_n}")
        if e and (up[0].shape != w2_up_shape[0] or down[0].shape != w2_up_shape[1]):
            raise MoEConfigError(f"expert {e} under {prefix!r}: {up_n} {tuple(up[0].shape)} and {down_n} "
                                 f"{tuple(down[0].shape)} packed, expert 0's {tuple(w2_up_shape[0])} and "
                                 f"{tuple(w2_up_shape[1])}")
        w2_up_shape = up[0].shape, down[0].shape
        if gated:
            gate = _projection(reader, f"{prefix}.{e}.{gate_n}")
            if gate[0].shape != up[0].shape:
                raise MoEConfigError(f"expert {e} under {prefix!r}: gate {tuple(gate[0].shape)} and up "
                                     f"{tuple(up[0].shape)} differ")
            if activation not in _LINEAR_IN_UP and not torch.equal(gate[2], up[2]):
                raise MoEConfigError(
                    f"expert {e} under {prefix!r}: gate and up have different weight_scale_2 ({float(gate[2])}, "
                    f"{float(up[2])}); {activation!r} is not linear in up, so the difference cannot be folded "
                    f"into w2 (module docstring): export gate and up with one shared scale")
            w13.append(torch.cat([gate[0], up[0]]))
            s13.append(torch.cat([gate[1].view(torch.uint8), up[1].view(torch.uint8)]).view(torch.float8_e4m3fn))
            first, c = gate, gate[2] / up[2]   # up computes c * true up: fold 1/c into w2
            in_scales += [gate[3], up[3]]
        else:
            w13.append(up[0])
            s13.append(up[1])
            first, c = up, torch.ones((), device=up[2].device)
            in_scales.append(up[3])
        g13.append(1.0 / first[2])
        w2.append(down[0])
        s2.append(down[1])
        g2.append(c / down[2])
        mid_scales.append(c * down[3])
    w13_t = torch.stack(w13)
    w2_t = torch.stack(w2)
    hidden, inter = w13_t.shape[2] * 2, w2_t.shape[2] * 2
    rows = w13_t.shape[1]
    if rows != (2 * inter if gated else inter) or w2_t.shape[1] != hidden:
        raise MoEConfigError(f"experts under {prefix!r} do not form an MoE layer: w13 {tuple(w13_t.shape)} packed, "
                             f"w2 {tuple(w2_t.shape)} packed, activation {activation!r}")
    weights = registry.MoEWeights(w13_t, torch.stack(s13), torch.stack(g13).float(), w2_t, torch.stack(s2),
                                  torch.stack(g2).float())
    # One static scale per activation: the largest amax over experts (no expert saturates).
    input_gs = 1.0 / torch.stack(in_scales).max()
    mid_gs = 1.0 / torch.stack(mid_scales).max()
    return weights, input_gs, mid_gs, hidden, inter


def load_modelopt_moe(source: Source, prefix: str, *, top_k: int, activation: str = "silu",
                      hidden_size: Optional[int] = None, num_experts: Optional[int] = None,
                      device: Union[str, torch.device] = "cpu", **layer_kwargs) -> FusedMoE:
    """A :class:`FusedMoE` from a ModelOpt NVFP4 checkpoint (a safetensors path, list of shards, or dict).

    ``prefix`` names the experts (``model.layers.0.mlp.experts``); ``hidden_size`` is the model's true
    hidden size when the checkpoint is padded beyond it; other keywords (routing, shared_expert,
    routing_bias, ...) go to the FusedMoE constructor.
    """
    weights, input_gs, mid_gs, hidden, inter = load_modelopt_experts(
        source, prefix, activation=activation, num_experts=num_experts, device=device)
    if hidden_size is not None and not 0 < hidden_size <= hidden:
        raise MoEConfigError(f"hidden_size={hidden_size} must be positive and at most the checkpoint's {hidden}")
    return FusedMoE(weights, hidden_size=hidden_size or hidden, intermediate_size=inter, top_k=top_k,
                    activation=activation, input_global_scale=input_gs, intermediate_global_scale=mid_gs,
                    name=layer_kwargs.pop("name", prefix), **layer_kwargs)


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's stored scale ``amax / (448*6)``, fp32, 0-dim."""
    return (amax.float() / (E4M3_MAX * E2M1_MAX)).reshape(())


def modelopt_expert_tensors(prefix: str, w13: torch.Tensor, w2: torch.Tensor, *, activation: str = "silu",
                            names: tuple = PROJECTION_NAMES[0], fused_gate_up_scale: bool = True,
                            input_amax: float | torch.Tensor = 1.0, intermediate_amax: float | torch.Tensor = 1.0,
                            ) -> dict[str, torch.Tensor]:
    """Quantize float experts ``w13 [E, 2I, H]`` (gate rows then up rows; ``[E, I, H]`` not gated) and
    ``w2 [E, H, I]`` into ModelOpt-layout tensors (a test and tooling helper).

    ``fused_gate_up_scale``: one global scale per expert over gate and up together (what ModelOpt
    exports for fused gate/up, and what :meth:`FusedMoE.from_float` computes); otherwise each
    projection gets its own.  H and I must be multiples of 16.
    """
    gated = is_gated(activation)
    gate_n, up_n, down_n = names
    out: dict[str, torch.Tensor] = {}
    in_s, mid_s = _scale_of(torch.as_tensor(input_amax)), _scale_of(torch.as_tensor(intermediate_amax))

    def put(key: str, w: torch.Tensor, amax: torch.Tensor, act_scale: torch.Tensor) -> None:
        gs = default_global_scale(amax)
        packed, scales, _ = quantize_nvfp4(w, gs)
        out[f"{key}.weight"] = packed
        out[f"{key}.weight_scale"] = scales
        out[f"{key}.weight_scale_2"] = _scale_of(amax)
        out[f"{key}.input_scale"] = act_scale.clone()

    for e in range(w13.shape[0]):
        we = w13[e].detach().float()
        if gated:
            gate, up = we.chunk(2, dim=0)
            if fused_gate_up_scale:
                amax_g = amax_u = we.abs().amax()
            else:
                amax_g, amax_u = gate.abs().amax(), up.abs().amax()
            put(f"{prefix}.{e}.{gate_n}", gate, amax_g, in_s)
            put(f"{prefix}.{e}.{up_n}", up, amax_u, in_s)
        else:
            put(f"{prefix}.{e}.{up_n}", we, we.abs().amax(), in_s)
        wd = w2[e].detach().float()
        put(f"{prefix}.{e}.{down_n}", wd, wd.abs().amax(), mid_s)
    return out


def save_modelopt_experts(path: Union[str, os.PathLike], layers: Mapping[str, tuple], **kwargs) -> None:
    """Write ``{prefix: (w13, w2)}`` float experts as one ModelOpt-layout safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for prefix, (w13, w2) in layers.items():
        tensors.update(modelopt_expert_tensors(prefix, w13, w2, **kwargs))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path))
