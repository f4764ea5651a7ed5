"""Epilogues for the ``triton_kernels`` peer of ``moe-nvfp4 bench``: our layers' activations in ``matmul_ogs``'
fused-activation slot.

``triton_kernels`` ships only OpenAI's clamped SwiGLU (``x*sigmoid(1.702x)*(up+1)``), which is not the function
our shapes compute; the slot costs the same whatever it holds, so the peer gets these instead.  GEMM1's output
columns arrive as interleaved ``(gate, up)`` pairs (the peer's weights are stored that way, see
``moe_passes.bench_peer.interleave_gate_up``) and the gated epilogues halve the width (``reduction_n=2``).
Imported only once ``triton_kernels`` (so Triton) imported: this module needs Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pairs(x):
    # [M, 2n] interleaved columns -> ([M, n] gate, [M, n] up) in fp32
    gate, up = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
    return gate.to(tl.float32), up.to(tl.float32)


@triton.jit(repr=lambda _: "swiglu_plain")
def silu_mul(x, scale):
    gate, up = _pairs(x)
    return scale * up * gate * tl.sigmoid(gate)


@triton.jit(repr=lambda _: "geglu_tanh")
def gelu_tanh_mul(x, scale):
    gate, up = _pairs(x)
    # 0.5 g (1 + tanh(u)) == g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3): no tanh needed
    u = 0.7978845608028654 * gate * (1.0 + 0.044715 * gate * gate)
    return scale * up * gate * tl.sigmoid(2.0 * u)


@triton.jit(repr=lambda _: "geglu_erf")
def gelu_mul(x, scale):
    gate, up = _pairs(x)
    return scale * up * 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))


@triton.jit(repr=lambda _: "relu_sq")
def relu2(x, scale):
    r = tl.maximum(x.to(tl.float32), 0.0)
    return scale * r * r


# activation -> (jitted epilogue, output columns per input column pair: 2 gated, 1 plain)
EPILOGUES = {"silu": (silu_mul, 2), "gelu_tanh": (gelu_tanh_mul, 2), "gelu": (gelu_mul, 2), "relu2": (relu2, 1)}
