"""MoE test problems: a plain description (:class:`MoEProblem`) that builds a module, inputs and a reference.

Hypothesis strategies (``moe_passes.testing.strategies``) draw these; tests can also write them by hand::

    problem = MoEProblem(hidden=2688, intermediate=64, experts=4, top_k=2, activation="relu2", shared=64)
    block = problem.build()
    x, logits = problem.inputs(tokens=7)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch
from torch import nn

from moe_passes.contract import MoEShape, is_gated
from moe_passes.layer import FusedMoE
from moe_passes.kernels.reference import fused_moe_reference

__all__ = ["MoEProblem", "MoEBlock", "SharedMLP", "moe_reference"]


class SharedMLP(nn.Module):
    """A small bf16 shared expert: ``down(relu(up(x)))``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.up = nn.Linear(hidden, intermediate, bias=False, dtype=torch.bfloat16)
        self.down = nn.Linear(intermediate, hidden, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class MoEBlock(nn.Module):
    """``forward(hidden_states, router_logits)``: the FusedMoE layer (plus its shared expert)."""

    def __init__(self, moe: FusedMoE):
        super().__init__()
        self.moe = moe

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states, router_logits)


@dataclasses.dataclass(frozen=True)
class MoEProblem:
    """One MoE layer configuration.  ``shared`` is the shared expert's intermediate size (None: none)."""

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    activation: str = "silu"
    routing: str = "renormalize"
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    routed_scaling_factor: Optional[float] = None
    routing_bias: bool = False
    routing_params: Optional[tuple] = None  # a parametric routing's (sparsemixer: (jitter_eps,))
    shared: Optional[int] = None
    weight_dtype: torch.dtype = torch.float32
    logits_dtype: torch.dtype = torch.float32
    seed: int = 0
    name: str = ""

    @property
    def shape(self) -> MoEShape:
        """The kernel-facing contract (TRTLLM alignment) of this problem."""
        return MoEShape(hidden=self.hidden, intermediate=self.intermediate, experts=self.experts, top_k=self.top_k,
                        activation=self.activation)

    @property
    def hidden_padded(self) -> int:
        return self.shape.hidden_padded

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def build(self, *, calibrate: bool = True) -> MoEBlock:
        """Random weights (fixed by ``seed``), quantized to NVFP4 into a :class:`FusedMoE` in a :class:`MoEBlock`.

        Parameters do not require grad, so compiles produce inference graphs.
        """
        g = self._generator(1)
        rows = (2 if is_gated(self.activation) else 1) * self.intermediate
        w13 = (torch.randn(self.experts, rows, self.hidden, generator=g) / self.hidden ** 0.5).to(self.weight_dtype)
        w2 = (torch.randn(self.experts, self.hidden, self.intermediate, generator=g)
              / self.intermediate ** 0.5).to(self.weight_dtype)
        bias = torch.randn(self.experts, generator=g) * 0.1 if self.routing_bias else None
        shared = None
        if self.shared:  # nn.Linear draws from the global generator: seed it here, leave the caller's as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                shared = SharedMLP(self.hidden, self.shared)
        calibration = torch.randn(64, self.hidden, generator=g) if calibrate else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # padding / calibration notices are expected here
            moe = FusedMoE.from_float(w13, w2, top_k=self.top_k, activation=self.activation, routing=self.routing,
                                      shared_expert=shared, routing_bias=bias, n_group=self.n_group,
                                      topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                                      calibration=calibration, name=self.name, routing_params=self.routing_params)
        block = MoEBlock(moe)
        block.requires_grad_(False)
        return block

    def inputs(self, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh random ``(hidden_states bf16 [T, H], router_logits [T, E])``."""
        g = self._generator(1000 + seed)
        x = torch.randn(tokens, self.hidden, generator=g).to(torch.bfloat16)
        logits = torch.randn(tokens, self.experts, generator=g).to(self.logits_dtype)
        return x, logits


def moe_reference(module: nn.Module, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    """The reference semantics of ``module`` (a :class:`FusedMoE` or a module with one at ``.moe``).

    Runs ``kernels.reference.fused_moe_reference`` on the layer's canonical NVFP4 weights (not the
    kernel-prepared, padded copy) with its static activation scales, expert biases, activation parameters and
    expert-parallel share, then adds the shared expert.  A sharded layer's result is its rank's part only.
    """
    layer = module if isinstance(module, FusedMoE) else module.moe
    canonical = [getattr(layer, n).to(hidden_states.device) for n in
                 ("w13", "w13_scale", "w13_global_scale", "w2", "w2_scale", "w2_global_scale")]
    out = fused_moe_reference(
        hidden_states, router_logits, *canonical, top_k=layer.top_k, activation=layer.activation, routing=layer.routing,
        input_global_scale=layer.input_global_scale, intermediate_global_scale=layer.intermediate_global_scale,
        routing_bias=layer.routing_bias, n_group=layer.n_group, topk_group=layer.topk_group,
        routed_scaling_factor=layer.routed_scaling_factor, routing_params=layer.routing_params,
        activation_params=layer.activation_params, local_expert_offset=layer.local_expert_offset,
        global_num_experts=layer.global_num_experts,
        w13_bias=None if layer.w13_bias is None else layer.w13_bias.to(hidden_states.device),
        w2_bias=None if layer.w2_bias is None else layer.w2_bias.to(hidden_states.device))
    if layer.shared_expert is not None:
        out = out + layer.shared_expert(hidden_states)
    return out
