"""The ``triton_kernels`` peer of ``moe-nvfp4 bench``: OpenAI's MXFP4 ``matmul_ogs`` MoE with bf16 activations.

That is the MoE path vLLM runs for gpt-oss on Hopper, the best 4-bit MoE kernel there (issue 31), so the layer
benchmark times it beside ours whenever ``triton_kernels`` can be imported (:func:`find_triton_kernels`).
Only its public API is called: ``downcast_to_mxfp`` / ``upcast_from_mxfp_torch`` to quantize and dequantize,
the default MXFP4 layouts for the device, ``topk``, ``make_ragged_tensor_metadata`` and two ``matmul_ogs``
calls (gather + GEMM1 + fused activation, then GEMM2 + weighted scatter), ``split_k`` pinned to 1 as vLLM does
on SM90.  Everything in this module that does not touch ``triton_kernels`` is plain torch (tested on a CPU).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from typing import Callable, Optional

import torch

MXFP4_BYTES_PER_PARAM = (4 + 8 / 32) / 8  # E2M1 codes + one e8m0 scale per 32: 8.5/16 byte
NVFP4_BYTES_PER_PARAM = (4 + 8 / 16) / 8  # E2M1 codes + one e4m3 scale per 16: 9/16 byte


# ------------------------------------------------------------------------------------------------------------
# finding triton_kernels
# ------------------------------------------------------------------------------------------------------------
def _source_root(path: str) -> Optional[str]:
    """The folder to put on ``sys.path`` for ``path``: ``path`` itself when it holds ``triton_kernels/``, its
    parent when it is the ``triton_kernels`` package; None when it is neither."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "triton_kernels", "__init__.py")):
        return path
    if os.path.basename(path) == "triton_kernels" and os.path.isfile(os.path.join(path, "__init__.py")):
        return os.path.dirname(path)
    return None


def _import_from(root: Optional[str]):
    """``import triton_kernels`` (with ``root`` first on sys.path when given); the package's own modules import
    each other as ``triton_kernels.*``, so a vendored copy must be importable under that name."""
    if root is not None and root not in sys.path:
        sys.path.insert(0, root)
    importlib.invalidate_caches()
    module = importlib.import_module("triton_kernels")
    importlib.import_module("triton_kernels.matmul_ogs")  # the part we need; fails here if Triton is too old
    return module


def _vllm_third_party() -> Optional[str]:
    """``<vllm>/third_party`` when vLLM ships ``triton_kernels`` there; found without importing vLLM (slow)."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "third_party")
        if _source_root(candidate):
            return candidate
    return None


def find_triton_kernels(peer_path: Optional[str] = None):
    """Import ``triton_kernels``: installed, then vLLM's copy (``vllm/third_party/triton_kernels``), then
    ``peer_path`` (a folder holding ``triton_kernels/``).  Returns ``(module or None, info)``; ``info`` says
    where it came from, or why nothing could be imported (each attempt and its error), for the JSON."""
    attempts = []

    def attempt(label, root):
        try:
            module = _import_from(root)
        except Exception as exc:  # ImportError, or whatever a half-compatible Triton raises at import
            for name in [m for m in sys.modules if m == "triton_kernels" or m.startswith("triton_kernels.")]:
                del sys.modules[name]  # a failed import must not shadow the next candidate
            attempts.append(dict(source=label, error=f"{type(exc).__name__}: {exc}"[:300]))
            return None
        attempts.append(dict(source=label, path=os.path.dirname(os.path.abspath(module.__file__))))
        return module

    if importlib.util.find_spec("triton_kernels") is not None:
        module = attempt("installed triton_kernels", None)
        if module is not None:
            return module, dict(available=True, source="installed triton_kernels", attempts=attempts)
    else:
        attempts.append(dict(source="installed triton_kernels", error="not installed"))
    third_party = _vllm_third_party()
    if third_party is None:
        attempts.append(dict(source="vllm.third_party.triton_kernels", error="vllm is not installed or ships none"))
    else:
        module = attempt("vllm.third_party.triton_kernels", third_party)
        if module is not None:
            return module, dict(available=True, source="vllm.third_party.triton_kernels", attempts=attempts)
    if peer_path is None:
        attempts.append(dict(source="--peer-path", error="not given"))
    else:
        root = _source_root(peer_path)
        if root is None:
            attempts.append(dict(source=f"--peer-path {peer_path}",
                                 error="holds no triton_kernels/__init__.py (pass the folder that contains it)"))
        else:
            module = attempt(f"--peer-path {peer_path}", root)
            if module is not None:
                return module, dict(available=True, source=f"--peer-path {peer_path}", attempts=attempts)
    why = "; ".join(f"{a['source']}: {a['error']}" for a in attempts)
    return None, dict(available=False, reason=f"triton_kernels is not importable ({why})", attempts=attempts)


# ------------------------------------------------------------------------------------------------------------
# weights: gate/up interleaving and the fp32 views of the peer's own quantized weights
# ------------------------------------------------------------------------------------------------------------
def interleave_gate_up(w13: torch.Tensor) -> torch.Tensor:
    """``[E, 2I, K]`` as ``[gate; up]`` -> rows ``gate0, up0, gate1, up1, ...``: the pairing the gated epilogues
    (``moe_passes.bench_peer_act``) read from adjacent output columns."""
    e, n, k = w13.shape
    return w13.reshape(e, 2, n // 2, k).transpose(1, 2).reshape(e, n, k)


def deinterleave_gate_up(w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave_gate_up` on ``[..., 2I, K]``: back to ``[gate; up]`` (the reference's order)."""
    return torch.cat([w[..., 0::2, :], w[..., 1::2, :]], dim=-2)


def _expert_chunks(experts: int, rows: int, cols: int, budget_bytes: float = 1e9):
    """Expert ranges small enough that fp32 temporaries of ``rows x cols`` per expert stay under ``budget_bytes``:
    DeepSeek-V3's w13 quantized at once would need tens of GB of scratch."""
    per = max(1, int(budget_bytes // max(1, rows * cols * 4)))
    return [(a, min(experts, a + per)) for a in range(0, experts, per)]


# ------------------------------------------------------------------------------------------------------------
# routing metadata in torch (any top_k; graph-capturable: no host synchronization)
# ------------------------------------------------------------------------------------------------------------
def sorted_routing(ids: torch.Tensor, n_experts: int):
    """``ids [T, k]`` -> ``(col_sum [E], col_sorted [T*k], row_sorted [T*k])``, int32, as ``triton_kernels``
    defines them for a bitmatrix with one row per token: ``col_sorted`` lists the flat entries ``t*k + j``
    grouped by expert (ascending within an expert), ``row_sorted`` is its inverse (where each entry went),
    ``col_sum`` counts each expert's entries.  Plain torch: ``triton_kernels``' own metadata kernel needs
    ``32*top_k`` to be a power of two, which Nemotron's top_k=6 is not."""
    flat = ids.reshape(-1).long()
    col_sorted = torch.argsort(flat, stable=True)
    row_sorted = torch.empty_like(col_sorted)
    row_sorted[col_sorted] = torch.arange(flat.numel(), device=flat.device)
    col_sum = torch.zeros(n_experts, dtype=torch.int32, device=flat.device)
    col_sum.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return col_sum, col_sorted.to(torch.int32), row_sorted.to(torch.int32)


# ------------------------------------------------------------------------------------------------------------
# the fp32 reference the peer (and ours) is checked against
# ------------------------------------------------------------------------------------------------------------
def reference_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13_of: Callable[[int], torch.Tensor],
                  w2_of: Callable[[int], torch.Tensor], activation: str) -> torch.Tensor:
    """fp32 MoE on a given routing: ``sum_j weights[t, j] * w2(e) act(w13(e) x_t)`` with ``e = ids[t, j]``,
    the intermediate rounded to bf16 as every kernel here stores it.  ``w13_of(e)`` is expert ``e``'s
    ``[N1, H]`` (``[gate; up]`` when gated), ``w2_of(e)`` its ``[H, I]``, both fp32: one expert at a time, so
    the weights are dequantized lazily (DeepSeek-V3's whole fp32 stack is 90 GB)."""
    from moe_passes.kernels.reference import apply_activation

    t, k = ids.shape
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=int(flat.max()) + 1 if flat.numel() else 1).tolist()
    token = order // k
    gains = weights.reshape(-1).float()[order]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        h = apply_activation(x[token[rows]].float() @ w13_of(e).t(), activation).to(torch.bfloat16).float()
        out.index_add_(0, token[rows], (h @ w2_of(e).t()) * gains[rows, None])
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32 (NaN anywhere gives NaN, which fails every tolerance)."""
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------------------
# the peer layer (needs the GPU and the imported triton_kernels)
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PeerLayer:
    """One MoE layer in ``triton_kernels``' MXFP4 format, ready for ``matmul_ogs``."""

    tk: object                       # the triton_kernels module
    w13: object                      # triton_kernels Tensor [E, H, N1], N1 interleaved when gated
    w2: object                       # triton_kernels Tensor [E, I, H]
    pc13: object                     # PrecisionConfig holding w13's scales
    pc2: object
    activation: object               # FusedActivation
    experts: int
    top_k: int
    routing: str
    gated: bool
    canonical: Optional[tuple]       # (q13, s13, q2, s2) before the layout swizzle: the reference's weights

    def w13_fp32(self, e: int) -> torch.Tensor:
        from triton_kernels.numerics_details.mxfp import upcast_from_mxfp_torch
        w = upcast_from_mxfp_torch(self.canonical[0][e], self.canonical[1][e], torch.float32, axis=-1)
        return deinterleave_gate_up(w) if self.gated else w

    def w2_fp32(self, e: int) -> torch.Tensor:
        from triton_kernels.numerics_details.mxfp import upcast_from_mxfp_torch
        return upcast_from_mxfp_torch(self.canonical[2][e], self.canonical[3][e], torch.float32, axis=-1)

    def drop_canonical(self):
        self.canonical = None


def _quantize_mxfp4(w: torch.Tensor, interleave: bool):
    """Float ``[E, N, K]`` -> (E2M1 bytes ``[E, N, K/2]``, e8m0 scales ``[E, N, K/32]``) along K with
    ``triton_kernels``' own quantizer (its default scale rounding), a few experts at a time, gate/up rows
    interleaved per chunk when asked (a whole interleaved copy of DeepSeek-V3's w13 is 15 GB)."""
    from triton_kernels.numerics_details.mxfp import downcast_to_mxfp
    e, n, k = w.shape
    q = torch.empty(e, n, k // 2, dtype=torch.uint8, device=w.device)
    s = torch.empty(e, n, k // 32, dtype=torch.uint8, device=w.device)
    for a, b in _expert_chunks(e, n, k):
        chunk = interleave_gate_up(w[a:b]) if interleave else w[a:b]
        qa, sa = downcast_to_mxfp(chunk.to(torch.bfloat16), torch.uint8, axis=-1)
        q[a:b].copy_(qa)
        s[a:b].copy_(sa)
    return q, s


def _to_layout(data_t: torch.Tensor, layout_cls, layout_kwargs: dict, dtype):
    """A triton_kernels Tensor over ``data_t`` (logical ``[E, K', N]``) in ``layout_cls``.  The layout is made for
    the whole stack and its ``swizzle_data`` applied a few experts at a time (Hopper's layouts treat the leading
    dimension as a batch; swizzling DeepSeek-V3's w13 at once needs several int32 copies of it)."""
    from triton_kernels.tensor import Storage, Tensor, wrap_torch_tensor
    logical = wrap_torch_tensor(data_t, dtype=dtype)
    layout = layout_cls(logical.storage.data.shape, **layout_kwargs)
    e, rows, cols = data_t.shape
    out = None
    for a, b in _expert_chunks(e, rows, cols * 2):
        piece = layout.swizzle_data(data_t[a:b])
        if out is None:  # the whole stack in the piece's memory order (the layouts return transposed views)
            order = sorted(range(piece.ndim), key=lambda d: -piece.stride(d))
            out = torch.empty_permuted((e,) + tuple(piece.shape[1:]), order, dtype=piece.dtype, device=piece.device)
        out[a:b].copy_(piece)
    return Tensor(Storage(out, layout), dtype=logical.dtype, shape=list(logical.shape),
                  shape_max=list(logical.shape_max))


def build_peer(tk, w13: torch.Tensor, w2: torch.Tensor, top_k: int, activation: str, routing: str,
               keep_canonical: bool = True) -> PeerLayer:
    """The peer from the float weights ours is quantized from: ``w13 [E, N1, H]`` (``[gate; up]`` when gated),
    ``w2 [E, H, I]``.  Quantized to MXFP4 along the reduction dimension, laid out as the device's default MXFP4
    weight layouts (Hopper: ``HopperMXValueLayout`` / ``HopperMXScaleLayout``, 8 warps, as vLLM)."""
    from triton_kernels.matmul_ogs import FnSpecs, FusedActivation, PrecisionConfig
    from triton_kernels.tensor import FP4
    from triton_kernels.tensor_details.layout import (make_default_matmul_mxfp4_w_layout,
                                                      make_default_matmul_mxfp4_w_scale_layout)
    from moe_passes.bench_peer_act import EPILOGUES

    if activation not in EPILOGUES:
        raise ValueError(f"no triton_kernels epilogue for activation {activation!r}; have {', '.join(EPILOGUES)}")
    gated = activation != "relu2"
    q13, s13 = _quantize_mxfp4(w13, interleave=gated)
    q2, s2 = _quantize_mxfp4(w2, interleave=False)
    value_cls, value_kw = make_default_matmul_mxfp4_w_layout(mx_axis=1)
    scale_cls, scale_kw = make_default_matmul_mxfp4_w_scale_layout(mx_axis=1, num_warps=8)
    # matmul_ogs wants w as [E, K, N]: the transposed views of the [E, N, K] bytes, K packed
    t13 = _to_layout(q13.transpose(1, 2), value_cls, value_kw, FP4)
    t2 = _to_layout(q2.transpose(1, 2), value_cls, value_kw, FP4)
    ts13 = _to_layout(s13.transpose(1, 2), scale_cls, scale_kw, None)
    ts2 = _to_layout(s2.transpose(1, 2), scale_cls, scale_kw, None)
    fn, reduction = EPILOGUES[activation]
    act = FusedActivation(FnSpecs(f"moe_bench_{activation}", fn, ("scale",), reduction_n=reduction), (1.0,))
    return PeerLayer(tk, t13, t2, PrecisionConfig(weight_scale=ts13), PrecisionConfig(weight_scale=ts2), act,
                     experts=w13.shape[0], top_k=top_k, routing=routing, gated=gated,
                     canonical=(q13, s13, q2, s2) if keep_canonical else None)


def set_split_k_one():
    """vLLM's SM90 setting for ``matmul_ogs`` (no split-k); global to ``triton_kernels``' heuristics."""
    from triton_kernels.matmul_ogs_details import opt_flags
    opt_flags.update_opt_flags_constraints({"split_k": 1})


def _routing_objects(layer: PeerLayer, col_sum, col_sorted, row_sorted, weights_flat):
    from triton_kernels.matmul_ogs import GatherIndx, RoutingData, ScatterIndx
    from triton_kernels.tensor import make_ragged_tensor_metadata
    ragged = make_ragged_tensor_metadata(col_sum, row_sorted.shape[0])
    data = RoutingData(weights_flat[col_sorted.long()], ragged.slice_sizes, layer.experts, layer.top_k, ragged)
    return data, GatherIndx(col_sorted, row_sorted), ScatterIndx(row_sorted, col_sorted)


def routing_from_ids(layer: PeerLayer, ids: torch.Tensor, weights: torch.Tensor):
    """Precomputed top-k ``ids``/``weights`` (what vLLM's experts class receives) -> ``matmul_ogs`` routing."""
    col_sum, col_sorted, row_sorted = sorted_routing(ids, layer.experts)
    return _routing_objects(layer, col_sum, col_sorted, row_sorted, weights.reshape(-1).float())


def routing_from_logits(layer: PeerLayer, logits: torch.Tensor, bias, extra: dict):
    """Router logits -> (``matmul_ogs`` routing, chosen ids).  ``renormalize``: ``triton_kernels.topk`` (one fused
    kernel: top-k, softmax over the k, bitmatrix) and its metadata; other routings have no ``triton_kernels``
    op, so the project's torch ``route`` chooses and :func:`routing_from_ids` sorts."""
    from moe_passes.kernels.reference import route
    if layer.routing == "renormalize":
        from triton_kernels.topk import topk
        sparse = topk(logits.float(), layer.top_k, apply_softmax=True)
        meta = sparse.mask_metadata
        routed = _routing_objects(layer, meta.col_sum, meta.col_sorted_indx, meta.row_sorted_indx,
                                  sparse.vals.reshape(-1).float())
        return routed, sparse.indx
    weights, ids = route(logits, layer.top_k, layer.routing, routing_bias=bias, **extra)
    return routing_from_ids(layer, ids, weights), ids


def experts_forward(layer: PeerLayer, x: torch.Tensor, routed) -> torch.Tensor:
    """The two ``matmul_ogs`` calls: gather + GEMM1 + activation, GEMM2 + routing weights + scatter-sum."""
    from triton_kernels.matmul_ogs import matmul_ogs as mm
    data, gather, scatter = routed
    mid = mm(x, layer.w13, None, data, gather_indx=gather, precision_config=layer.pc13,
             fused_activation=layer.activation)
    return mm(mid, layer.w2, None, data, scatter_indx=scatter, precision_config=layer.pc2, gammas=data.gate_scal)


def layer_forward(layer: PeerLayer, x: torch.Tensor, logits: torch.Tensor, bias, extra: dict) -> torch.Tensor:
    """Router logits to output, as the benchmark times ours."""
    routed, _ = routing_from_logits(layer, logits, bias, extra)
    return experts_forward(layer, x, routed)
