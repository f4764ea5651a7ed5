"""The Triton NVFP4 fused MoE (Hopper path) against the bf16-activation reference.

GPU tests are marked ``gpu`` and skip cleanly without CUDA or Triton; the CPU test checks that the
module imports and registers an unavailable kernel on a CPU-only machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from moe_passes.contract import ACTIVATIONS, PARAMETRIC_ACTIVATIONS, ROUTING_METHODS, MoEShape, is_gated
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import registry
from moe_passes.kernels.options import KernelOptions
from moe_passes.kernels.reference import fused_moe_reference
from moe_passes.kernels.triton_plan import DecodeConfig, TileConfig
from nvfp4_layers import make_layer
from routing_cases import sparsemixer_logits

from moe_passes.kernels.triton_common import ACT_CODES

# The activations without parameters: the tests below run each; swiglu_oai (gpt-oss, with its parameters and
# expert biases) has tests of its own ("gpt-oss" below).
TRITON_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a in ACT_CODES and a not in PARAMETRIC_ACTIVATIONS)

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")


def test_module_imports_and_registers_on_cpu():
    from moe_passes.kernels import triton_moe

    spec = registry.get("triton")
    assert spec is triton_moe.TRITON
    assert spec.activations == frozenset(ACTIVATIONS)
    assert spec.routings == frozenset(ROUTING_METHODS)
    assert spec.quantizes_activations is False
    assert spec.alignment.hidden == 16
    assert spec.available(torch.device("cpu")) is False
    assert registry.select(torch.device("cpu"), activation="silu", routing="default").name != "triton"


def test_a_direct_call_with_an_activation_it_has_no_epilogue_for_is_refused(monkeypatch):
    """Every activation of the contract has a Triton epilogue; one added without a code (simulated by removing
    one) is refused at the entry point, not run through the chain's last branch."""
    from moe_passes.kernels.triton_moe import fused_moe_triton

    assert set(ACT_CODES) == set(ACTIVATIONS)
    missing = ["gelu_tanh"]
    monkeypatch.delitem(ACT_CODES, "gelu_tanh")
    w = registry.MoEWeights(torch.zeros(2, 64, 16, dtype=torch.uint8), torch.zeros(2, 64, 2).to(torch.float8_e4m3fn),
                            torch.ones(2), torch.zeros(2, 32, 8, dtype=torch.uint8),
                            torch.zeros(2, 32, 1).to(torch.float8_e4m3fn), torch.ones(2))
    for activation in missing:
        with pytest.raises(MoEConfigError, match=f"no epilogue for activation '{activation}'"):
            fused_moe_triton(torch.zeros(1, 32, dtype=torch.bfloat16), torch.zeros(1, 2), w, top_k=1,
                             activation=activation)


@pytest.mark.parametrize("bk1, bk2", [(32, 64), (64, 32), (96, 128), (0, 64)])
def test_tile_k_steps_off_the_band_pieces_are_config_errors(bk1, bk2):
    """The tiles read the banded weights a 64-element piece at a time: another K step is refused, not read
    from the wrong bytes."""
    good = TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=128, warps2=4, stages2=3)
    with pytest.raises(MoEConfigError, match="multiples of 64"):
        dataclasses.replace(good, bk1=bk1, bk2=bk2)


@pytest.mark.parametrize("change", [dict(ks1=4, grouped=True), dict(ks1=4, prefetch=True), dict(ks1=3),
                                    dict(ks1=32), dict(ks1=0)])
def test_gemm1_in_program_k_split_only_where_its_kernel_exists(change):
    """``ks1`` (warps of one per-pair GEMM1 program splitting its K) on a config without that kernel, or a
    warp count Triton cannot launch, is a config error, not a silently different kernel."""
    good = DecodeConfig(grouped=False, ks1=4)
    with pytest.raises(MoEConfigError, match="ks1"):
        dataclasses.replace(good, **change)


@pytest.mark.parametrize("change", [dict(early2=3), dict(early2=-1), dict(split1=0), dict(warps2=0), dict(cols=3),
                                    dict(cols=4), dict(cols=0), dict(cols=2, grouped=False)])
def test_decode_config_refuses_what_its_kernels_do_not_do(change):
    with pytest.raises(MoEConfigError, match="DecodeConfig"):
        dataclasses.replace(DecodeConfig(grouped=True), **change)


@pytest.mark.parametrize("change", [dict(tail=64), dict(tail=48), dict(tail=8), dict(tail=16, split2=2),
                                    dict(tail=16, bm=16, swap=True)])
def test_tail_blocks_only_behind_the_prefill_tiles(change):
    """Tail blocks (an expert's last rows in smaller tiles) exist behind the 64- and 128-row tiles, in sizes
    of 16, 32 or 64 rows below the block's and without a GEMM2 K split (the tails share its output rows):
    anything else is a config error."""
    good = TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4, stages2=3, tail=32)
    for tail in (16, 32, 64):
        tiles = dataclasses.replace(good, bm=128, tail=tail).tail_tiles()
        assert (tiles.bm, tiles.tail, tiles.swap) == (tail, 0, tail < 64)
    with pytest.raises(MoEConfigError, match="tail"):
        dataclasses.replace(good, **change)


# sparsemixer's jitter_eps in the layer tests: larger than PhiMoE's 0.01, so that on random logits both of a
# token's weights come from several unmasked experts (at 0.01 most are exactly 1).
SPARSEMIXER_EPS = 0.2


def _routing_kwargs(routing, experts, device, g):
    if routing == "llama4":
        return dict(top_k=1), None
    if routing == "sparsemixer":
        return dict(top_k=2, routing_params=[SPARSEMIXER_EPS]), None
    if routing == "deepseek_v3":
        bias = (torch.randn(experts, generator=g) / 10).to(device)
        return dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5), bias
    return dict(top_k=4), None


NO_CUDA_DECODE = KernelOptions(cuda_decode=False)


def _check(hidden, inter, experts, tokens, activation, routing, seed=0, use_spec=False, options=None):
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    weights = make_layer(hidden, inter, experts, activation, device, seed)
    kw, bias = _routing_kwargs(routing, experts, device, g)
    x = (torch.randn(tokens, hidden, generator=g) / 10).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    ref = fused_moe_reference(x, logits, *weights, activation=activation, routing=routing, routing_bias=bias,
                              quantize_activations=False, **kw)
    if use_spec:
        spec = registry.get("triton")
        shape = MoEShape(hidden=hidden, intermediate=inter, experts=experts, top_k=kw["top_k"],
                         activation=activation, alignment=spec.alignment)
        prepared = spec.prepare(weights, shape)
        for a, b in zip(prepared, weights):
            assert a.shape == b.shape and a.dtype == b.dtype  # the registry's contract: only byte order moves
        assert not torch.equal(prepared.w13, weights.w13)  # ... and here it does (the Triton layout)
        args = registry.RunArgs(top_k=kw["top_k"], activation=activation, routing=routing,
                                n_group=kw.get("n_group"), topk_group=kw.get("topk_group"),
                                routed_scaling_factor=kw.get("routed_scaling_factor"), options=options,
                                routing_params=None if "routing_params" not in kw else tuple(kw["routing_params"]))
        out = spec.run(x, logits, prepared, None, None, bias, args)
    else:
        out = torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16, device=device)  # poisoned
        res = fused_moe_triton(x, logits, prepare_weights(weights), activation=activation, routing=routing,
                               routing_bias=bias, out=out, options=options, **kw)
        assert res.data_ptr() == out.data_ptr()
    torch.cuda.synchronize()
    assert out.shape == (tokens, hidden) and out.dtype == torch.bfloat16
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output elements"
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=5e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation", TRITON_ACTIVATIONS)
@pytest.mark.parametrize("routing", ROUTING_METHODS)
def test_activations_and_routings(activation, routing):
    _check(hidden=720, inter=208, experts=16, tokens=37, activation=activation, routing=routing,
           seed=TRITON_ACTIVATIONS.index(activation) * 10 + ROUTING_METHODS.index(routing))


def _refuse_cuda_decode(monkeypatch):
    """Fail the test if the one-launch CUDA decode runs although its options turned it off."""
    from moe_passes.kernels import cuda_decode

    def refuse(*args, **kwargs):
        raise AssertionError("the one-launch CUDA decode ran although it is turned off")

    monkeypatch.setattr(cuda_decode, "decode_one_token", refuse)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hidden, inter, activation, routing",
                         [(736, 240, a, r) for a in TRITON_ACTIVATIONS for r in ROUTING_METHODS]
                         + [(4608, 256, "silu", "deepseek_v3"), (4608, 256, "relu2", "renormalize")])
def test_one_token_on_the_triton_path(hidden, inter, activation, routing, monkeypatch):
    """One token on SM90 goes to the one-launch CUDA decode (test_cuda_decode.py).  The Triton path stays the
    fallback (other GPUs, shapes that kernel does not take, ``KernelOptions(cuda_decode=False)``), so it is
    checked with that kernel off: every activation and routing on rows with a narrow last piece (46 groups of
    hidden, 15 of intermediate), and a hidden size past 4096, where one token takes GEMM1's in-program K split."""
    _refuse_cuda_decode(monkeypatch)
    _check(hidden=hidden, inter=inter, experts=16, tokens=1, activation=activation, routing=routing,
           seed=hidden + 10 * TRITON_ACTIVATIONS.index(activation) + ROUTING_METHODS.index(routing), options=NO_CUDA_DECODE)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hidden", [2688, 2880, 720, 2048])
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, 64, 300, 1024, 4096])
def test_hidden_sizes_and_token_counts(hidden, tokens):
    activation = "relu2" if hidden == 2688 else "silu"
    _check(hidden=hidden, inter=384 if hidden != 2688 else 464, experts=32, tokens=tokens,
           activation=activation, routing="renormalize", seed=hidden + tokens)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hidden, inter", [(736, 240), (752, 224)])
@pytest.mark.parametrize("tokens", [1, 4, 16, 64, 300])
def test_banded_rows_with_a_narrow_last_piece(hidden, inter, tokens):
    """Rows whose 16-element groups are not a multiple of 4 (46 / 47 groups of hidden, 15 / 14 of
    intermediate) end in a narrower piece of their band: every path (the one-launch CUDA decode at 1 token,
    per-pair and grouped tensor-core decode, 16- and 64-row tiles) must address it."""
    _check(hidden=hidden, inter=inter, experts=16, tokens=tokens, activation="silu", routing="renormalize",
           seed=hidden + inter + tokens)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 200])
def test_through_registry_spec(tokens):
    _check(hidden=2880, inter=144, experts=8, tokens=tokens, activation="gelu_tanh", routing="default",
           seed=7, use_spec=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 16, 2500])
def test_cuda_graph_capture_and_workspace(tokens):
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    device = torch.device("cuda")
    hidden, inter, experts, top_k = 1024, 512, 32, 4
    weights = make_layer(hidden, inter, experts, "silu", device, seed=3)
    kernel_weights = prepare_weights(weights)
    x = (torch.randn(tokens, hidden, device=device) / 10).to(torch.bfloat16)
    logits = torch.randn(tokens, experts, device=device)

    def layer():
        return fused_moe_triton(x, logits, kernel_weights, top_k=top_k, activation="silu", routing="renormalize")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer()
    workspace = torch.cuda.max_memory_allocated() - before
    # Workspace scales with tokens: far below one copy of the weights for decode.
    if tokens <= 16:
        assert workspace < weight_bytes / 4, (workspace, weight_bytes)
    # Fresh inputs into the captured buffers: the replay must follow them.
    x.copy_((torch.randn(tokens, hidden, device=device) / 10).to(torch.bfloat16))
    logits.copy_(torch.randn(tokens, experts, device=device))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = fused_moe_reference(x, logits, *weights, top_k=top_k, activation="silu", routing="renormalize",
                              quantize_activations=False)
    assert not out.isnan().any()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", ["mma16", "mma16_swap",
                                     "mma16_split_pf", "mma16_swap_pf_split", "mma64", "mma64_pf_swap",
                                     "mma64_w8g1_pf_tail16",
                                     "mma128_w8", "mma128_pf", "mma128_pf_tail32", "mma64_pf_tail16", "mma128_tail64",
                                     "tc_pair", "tc_pair_split_pf", "tc_group",
                                     "tc_group_split_pf_w2", "tc_pair_vec_split", "tc_group_vec_pf", "tc_pair_ks4",
                                     "tc_pair_ks8_vec", "tc_group16_vec_pf", "tc_group16", "tc_group16_split_pf_w2"])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
def test_tile_variants(variant, activation):
    """Every code path: tensor-core tiles of every size with and without swap, prefetch and K split, the
    tensor-core decode per pair and grouped (two 8-token blocks per expert), with K splits, prefetch and two
    warps per program."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    configs = {
        "mma16": TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=4, bn2=64, bk2=128, warps2=4, stages2=4, split2=2),
        "mma16_swap": TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=4, bn2=64, bk2=128, warps2=4, stages2=4,
                                 split2=2, swap=True),
        "mma64": TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4, stages2=3),
        "mma128_w8": TileConfig(bm=128, bn1=64, bk1=64, warps1=8, stages1=3, bn2=128, bk2=64, warps2=8,
                                stages2=3),
        # weight words loaded one K step ahead, also with a K split that starts mid-row (split2=3)
        "mma16_split_pf": TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=4, bn2=64, bk2=64, warps2=4,
                                     stages2=4, split2=3, wprefetch=True),
        # the 16-row default: swap and prefetch, launches chained (here with a K split of GEMM2 as well)
        "mma16_swap_pf_split": TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=3, bn2=64, bk2=128, warps2=4,
                                          stages2=3, split2=3, swap=True, wprefetch=True, chains=True),
        "mma64_pf_swap": TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                    stages2=3, swap=True, wprefetch=True),
        "mma128_pf": TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                stages2=3, wprefetch=True, bf16_rows=True),
        # an expert's last rows in tail blocks of a second launch: 32-row and 16-row swapped tiles, 64-row tiles
        "mma128_pf_tail32": TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                       stages2=3, wprefetch=True, nfirst=True, tail=32, bf16_rows=True),
        "mma64_pf_tail16": TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                      stages2=3, wprefetch=True, tail=16),
        # the half-filled 64-row default of gated layers: 8-warp GEMM1 programs, 4-warp GEMM2
        "mma64_w8g1_pf_tail16": TileConfig(bm=64, bn1=128, bk1=64, warps1=8, stages1=3, bn2=128, bk2=64,
                                           warps2=4, stages2=3, wprefetch=True, nfirst=True, tail=16),
        "mma128_tail64": TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                    stages2=3, nfirst=True, tail=64, bf16_rows=True),
        "tc_pair": DecodeConfig(grouped=False),
        "tc_pair_split_pf": DecodeConfig(grouped=False, split1=3, split2=2, prefetch=True),
        "tc_group": DecodeConfig(grouped=True),
        "tc_group_split_pf_w2": DecodeConfig(grouped=True, warps1=2, warps2=2, split1=2, split2=3, prefetch=True),
        # 16-byte loads: GEMM1's K (180 groups) takes them, GEMM2's (65 groups, odd) falls back
        "tc_pair_vec_split": DecodeConfig(grouped=False, split1=3, split2=2, vec1=True, vec2=True),
        "tc_group_vec_pf": DecodeConfig(grouped=True, prefetch=True, vec1=True, vec2=True),
        # GEMM1's warps splitting one tile's K (22.5 chunks: 4 warps take 6, 6, 6 and 4.5, 8 warps 3 each and 1.5)
        "tc_pair_ks4": DecodeConfig(grouped=False, split2=2, ks1=4),
        "tc_pair_ks8_vec": DecodeConfig(grouped=False, ks1=8, vec1=True, vec2=True, early2=1),
        # 16-token blocks: each chunk's dequantized weights meet two 8-token column tiles
        "tc_group16_vec_pf": DecodeConfig(grouped=True, cols=2, prefetch=True, vec1=True, vec2=True, early2=1),
        "tc_group16": DecodeConfig(grouped=True, cols=2, early2=2),
        "tc_group16_split_pf_w2": DecodeConfig(grouped=True, cols=2, warps1=2, warps2=2, split1=2, split2=3,
                                               prefetch=True),
    }
    device = torch.device("cuda")
    # 2880 = 22.5 chunks of 128 and 1040 = 65 groups: K tails inside a chunk and inside a thread's group pair
    hidden, inter, experts, top_k = 2880, 1040, 16, 4
    # 60 tokens: ~15 pairs per expert, so the grouped decode runs two 8-token blocks of most experts; 150
    # tokens: ~37, two or three 16-token blocks (the last one partly empty)
    tokens = (700 if variant.startswith("mma128") else 150 if variant.startswith("tc_group16")
              else 60 if variant.startswith("tc_group") else 9)
    if "tail" in variant:  # ~bm + tail / 2 rows per expert: some experts' last rows go to tail blocks, some not
        cfg = configs[variant]
        tokens = (cfg.bm + cfg.tail // 2) * experts // top_k
    weights = make_layer(hidden, inter, experts, activation, device, seed=11)
    x = (torch.randn(tokens, hidden, device=device) / 10).to(torch.bfloat16)
    logits = torch.randn(tokens, experts, device=device)
    ref = fused_moe_reference(x, logits, *weights, top_k=top_k, activation=activation, routing="default",
                              quantize_activations=False)
    out = torch.full_like(ref, float("nan"))
    fused_moe_triton(x, logits, prepare_weights(weights), top_k=top_k, activation=activation, routing="default",
                     out=out, config=configs[variant])
    torch.cuda.synchronize()
    assert not out.isnan().any()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel
    if variant.startswith(("mma", "tc_group")):
        # the grouping's atomic ranks place an expert's pairs in an arbitrary order; each row is computed
        # alike, so the result must not depend on it
        again = fused_moe_triton(x, logits, prepare_weights(weights), top_k=top_k, activation=activation,
                                 routing="default", config=configs[variant])
        assert torch.equal(again, out)


_WGMMA = dict(bk1=64, bk2=64, stages1=3, stages2=3, nfirst=True, wgmma=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", ["wg128_tail32", "wg64_tail16", "wg128_w8", "wg64_bn64", "wg32", "wg16_s4",
                                     "wg32_s4", "wg128_s4_tail32", "wg128_s2", "wg32_s4_k3", "wg128_overlap32",
                                     "wg64_overlap16", "wg32_chained_bf16", "wg64_chained_overlap16"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu2"])
def test_wgmma_tiles(variant, activation):
    """The register-operand wgmma tiles (gluon_tiles) against the reference, against the tl.dot tiles of the
    same blocks (the same exact products summed in another order), run to run, and replayed in a CUDA graph.
    2880 = 22.5 column tiles of 128 and 960 = 7.5: partial column tiles in both GEMMs; 45 and 15 K steps: rings
    of 2 and 4 slots start with the steps past whole turns (3: none)."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    configs = {
        "wg128_tail32": TileConfig(bm=128, bn1=64, warps1=4, bn2=128, warps2=4, tail=32, bf16_rows=True, **_WGMMA),
        "wg64_tail16": TileConfig(bm=64, bn1=128, warps1=4, bn2=128, warps2=4, tail=16, **_WGMMA),
        "wg128_w8": TileConfig(bm=128, bn1=128, warps1=8, bn2=128, warps2=8, bf16_rows=True, **_WGMMA),
        "wg64_bn64": TileConfig(bm=64, bn1=64, warps1=4, bn2=64, warps2=4, **_WGMMA),
        "wg32": TileConfig(bm=32, bn1=64, warps1=4, bn2=128, warps2=4, **_WGMMA),
        # the planner's: 4-slot rings, the 16-row launches chained
        "wg16_s4": TileConfig(bm=16, bn1=64, warps1=4, bn2=128, warps2=4, chains=True,
                              **dict(_WGMMA, stages1=4, stages2=4)),
        "wg32_s4": TileConfig(bm=32, bn1=128, warps1=4, bn2=128, warps2=4, **dict(_WGMMA, stages1=4, stages2=4)),
        "wg128_s4_tail32": TileConfig(bm=128, bn1=64, warps1=4, bn2=128, warps2=4, tail=32, bf16_rows=True,
                                      **dict(_WGMMA, stages1=4, stages2=4)),
        "wg128_s2": TileConfig(bm=128, bn1=128, warps1=4, bn2=128, warps2=4, **dict(_WGMMA, stages1=2, stages2=2)),
        # GEMM2's 3 K steps, fewer than the 4-slot ring's turn: only the steps past whole turns run
        "wg32_s4_k3": TileConfig(bm=32, bn1=64, warps1=4, bn2=128, warps2=4, **dict(_WGMMA, stages1=4, stages2=4)),
        # the tail launches overlapping their main launches
        "wg128_overlap32": TileConfig(bm=128, bn1=64, warps1=4, bn2=128, warps2=4, tail=32, overlap=True,
                                      bf16_rows=True, **dict(_WGMMA, stages1=4, stages2=4)),
        "wg64_overlap16": TileConfig(bm=64, bn1=128, warps1=4, bn2=128, warps2=4, tail=16, overlap=True, **_WGMMA),
        # a caller's config may chain any tiles, write bf16 pair rows from small blocks, chain and overlap at once
        "wg32_chained_bf16": TileConfig(bm=32, bn1=64, warps1=4, bn2=128, warps2=4, chains=True, bf16_rows=True,
                                        **dict(_WGMMA, stages1=4, stages2=4)),
        "wg64_chained_overlap16": TileConfig(bm=64, bn1=128, warps1=4, bn2=128, warps2=4, tail=16, overlap=True,
                                             chains=True, **_WGMMA),
    }
    cfg = configs[variant]
    device = torch.device("cuda")
    hidden, inter, experts, top_k = 2880, 192 if variant == "wg32_s4_k3" else 960, 16, 4
    tokens = (cfg.bm + cfg.tail // 2) * experts // top_k
    weights = make_layer(hidden, inter, experts, activation, device, seed=13)
    prepared = prepare_weights(weights)
    x = (torch.randn(tokens, hidden, device=device) / 10).to(torch.bfloat16)
    logits = torch.randn(tokens, experts, device=device)
    ref = fused_moe_reference(x, logits, *weights, top_k=top_k, activation=activation, routing="default",
                              quantize_activations=False)

    def call(x, lg, out, config=cfg):
        return fused_moe_triton(x, lg, prepared, top_k=top_k, activation=activation, routing="default", out=out,
                                config=config)

    out = call(x, logits, torch.full_like(ref, float("nan")))
    dot = call(x, logits, None, dataclasses.replace(cfg, wgmma=False))
    torch.cuda.synchronize()
    assert not out.isnan().any()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel
    assert ((out.float() - dot.float()).norm() / dot.float().norm()).item() < 2e-3
    assert torch.equal(call(x, logits, None), out)
    (graphed,) = _graph_of_calls([x], [logits], hidden, call)
    assert torch.equal(graphed, out)
    for launched in ("overlap", "chains"):  # the same kernels on the same blocks, only launched otherwise
        if getattr(cfg, launched):
            assert torch.equal(call(x, logits, None, dataclasses.replace(cfg, **{launched: False})), out)


@pytest.mark.parametrize("bad", [dict(hidden=2880 + 16), dict(inter=960 + 16), dict(splits=2),
                                 dict(w13_bias=torch.zeros(1))])
def test_wgmma_tiles_refuse_a_call_they_cannot_run(bad):
    """A wgmma config that reaches a call it cannot run (sizes off the 64-element pieces, a GEMM2 K split, expert
    biases) is a config error before anything launches."""
    from moe_passes.kernels.triton_tiles import run_tiles

    cfg = TileConfig(bm=128, bn1=64, warps1=4, bn2=128, warps2=4, **_WGMMA)
    args = dict(hidden=2880, inter=960, splits=1, w13_bias=None)
    args.update(bad)
    y = torch.zeros(args.pop("splits"), 8, args["hidden"])
    with pytest.raises(MoEConfigError, match="wgmma"):
        run_tiles(None, None, None, None, None, y, cfg, pairs=8, experts=4, top_k=2, gated=True, activation="silu",
                  k_per_split=args["inter"], **args)


def test_wgmma_slot_order_matches_the_register_fragment():
    """gluon_tiles' slot order against wgmma's register A fragment (PTX ISA: lane 4g + t holds K slots 2t, 2t+1,
    2t+8, 2t+9 of each 16): a slot's element must come from its own lane's words 2t, 2t+1 of the banded row
    (elements 16t .. 16t + 15, word 2t + h holding 8h .. 8h + 7), slots 0-31 from word 2t and 32-63 from 2t + 1,
    each of a word's bf16 pairs whole in one 32-bit register, and every element exactly once."""
    from moe_passes.kernels.gluon_tiles import KMAP

    assert sorted(KMAP) == list(range(64))
    for slot, k in enumerate(KMAP):
        lane_t, word_h = (slot % 8) // 2, slot // 32
        assert k // 16 == lane_t and (k % 16) // 8 == word_h, (slot, k)
        assert KMAP[slot ^ 1] == k ^ 1
    # a word's element n = 4j + 2q + b sits in 16-slot step 2h + j, at slot 2t + b (q = 0) or 2t + 8 + b (q = 1)
    for t in range(4):
        for h in range(2):
            for n in range(8):
                j, q, b = n // 4, (n // 2) % 2, n % 2
                assert KMAP[16 * (2 * h + j) + 8 * q + 2 * t + b] == 16 * t + 8 * h + n


@pytest.mark.parametrize("change", [dict(bn1=256), dict(warps1=8, bn1=64), dict(warps2=2), dict(split2=2),
                                    dict(bm=8), dict(bm=24), dict(stages2=1), dict(stages1=5), dict(bk1=128)])
def test_wgmma_tiles_refuse_what_their_kernels_do_not_do(change):
    """The wgmma tiles take 16-256-row blocks (a multiple of 16), K steps of 64, column tiles of 64 or 128 with 4
    warps or 128 with 8, 2-4 stages (the ring's slots) and no GEMM2 K split; their tail blocks are the same tiles
    with fewer rows."""
    good = TileConfig(bm=128, bn1=64, warps1=4, bn2=128, warps2=4, tail=32, **_WGMMA)
    assert good.tail_tiles() == dataclasses.replace(good, bm=32, tail=0)
    with pytest.raises(MoEConfigError, match="wgmma"):
        dataclasses.replace(good, tail=0, **change)


def test_bf16_pair_rows_refuse_a_split_gemm2():
    """GEMM2's K splits add fp32 partial rows, so a config with bf16 pair rows and a K split is refused by name."""
    cfg = TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4, stages2=3, bf16_rows=True)
    assert cfg.bf16_rows and not cfg.chains
    with pytest.raises(MoEConfigError, match="bf16_rows.*split2=1"):
        dataclasses.replace(cfg, split2=2)


def _graph_of_calls(xs, logits, hidden, call):
    """``call(x, logits, out)`` for every input, back to back in one CUDA graph (warmed up on a side stream
    first), replayed once into NaN-poisoned bf16 outputs ``[tokens, hidden]``; returns copies of them."""
    outs = [torch.empty(x.shape[0], hidden, dtype=torch.bfloat16, device=x.device) for x in xs]

    def layer():
        for x, lg, o in zip(xs, logits, outs):
            call(x, lg, o)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer()
    for o in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return [o.clone() for o in outs]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 6, 64, 100, 300])
@pytest.mark.parametrize("routing", ["renormalize", "deepseek_v3"])
def test_pdl_chain_matches_serial_launches(tokens, routing):
    """Programmatic dependent launch: each kernel of a call is launched while the previous one drains and
    waits for it in-kernel.  In a graph of back-to-back calls, each on its own inputs, the outputs must be
    bit-identical to serial launches and match the reference.  1 and 6 tokens run the tensor-core decode per
    pair (the one-launch CUDA decode, a single launch with no chain, is turned off here), 64 the grouped
    tensor-core decode, 100 the 16-row tiles (all chained), 300 the prefill tiles (always serial).
    deepseek_v3 with 3 groups takes the torch routing fallback, which must then zero the grouping counters
    itself."""
    from moe_passes.kernels import triton_moe

    if not triton_moe.pdl_supported("cuda"):
        pytest.skip("needs compute capability >= 9.0 and Triton's PDL intrinsics")
    device = torch.device("cuda")
    hidden, inter, experts, calls = 1040, 528, 48, 6
    weights = make_layer(hidden, inter, experts, "silu", device, seed=21)
    kernel_weights = triton_moe.prepare_weights(weights)
    g = torch.Generator(device="cpu").manual_seed(tokens)
    kwargs = dict(top_k=4) if routing == "renormalize" else dict(top_k=4, n_group=3, topk_group=2,
                                                                 routed_scaling_factor=2.5)
    bias = (torch.randn(experts, generator=g) / 10).to(device) if routing == "deepseek_v3" else None
    xs = [(torch.randn(tokens, hidden, generator=g) / 10).to(device, torch.bfloat16) for _ in range(calls)]
    ls = [torch.randn(tokens, experts, generator=g).to(device) for _ in range(calls)]

    def run_graph(pdl):
        options = KernelOptions(pdl=pdl, cuda_decode=False)
        return _graph_of_calls(xs, ls, hidden, lambda x, lg, o: triton_moe.fused_moe_triton(
            x, lg, kernel_weights, activation="silu", routing=routing, routing_bias=bias, out=o, options=options,
            **kwargs))

    chained = run_graph(True)
    serial = run_graph(False)
    for c, s in zip(chained, serial):
        assert not c.isnan().any()
        assert torch.equal(c, s)
    ref = fused_moe_reference(xs[-1], ls[-1], *weights, activation="silu", routing=routing, routing_bias=bias,
                              quantize_activations=False, **kwargs)
    rel = ((chained[-1].float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("routing", ["renormalize", "deepseek_v3"])
@pytest.mark.parametrize("variant", ["tc_pair_split", "tc_group", "tc_group_prefetch"])
def test_gemm2_early_weight_loads(variant, routing):
    """``DecodeConfig.early2``: GEMM2 reads its expert and first K step(s) of weights before its PDL wait (after
    a split GEMM1 the activation kernel releases it before its own wait).  In a CUDA graph of back-to-back calls, each on its own inputs, every output must be
    bit-identical to the same configs without it (the same sums in the same order), match the reference,
    and leave no poisoned element.  Odd group counts (1040 = 65 groups, 208 = 13) and a GEMM2 K split, so
    early loads start inside a row and end in a partial step."""

    from moe_passes.kernels import triton_moe

    if not triton_moe.pdl_supported("cuda"):
        pytest.skip("needs compute capability >= 9.0 and Triton's PDL intrinsics")
    device = torch.device("cuda")
    hidden, inter, experts, calls = 1040, 208, 16, 5
    tokens, cfg = {
        "tc_pair_split": (5, DecodeConfig(grouped=False, split1=2, split2=1)),
        "tc_group": (24, DecodeConfig(grouped=True, split2=2)),
        "tc_group_prefetch": (24, DecodeConfig(grouped=True, prefetch=True)),
    }[variant]
    weights = make_layer(hidden, inter, experts, "silu", device, seed=41)
    kernel_weights = triton_moe.prepare_weights(weights)
    g = torch.Generator(device="cpu").manual_seed(43 + tokens)
    kw, bias = _routing_kwargs(routing, experts, device, g)
    xs = [(torch.randn(tokens, hidden, generator=g) / 10).to(device, torch.bfloat16) for _ in range(calls)]
    ls = [torch.randn(tokens, experts, generator=g).to(device) for _ in range(calls)]

    def run_graph(early):
        c = dataclasses.replace(cfg, early2=early)
        return _graph_of_calls(xs, ls, hidden, lambda x, lg, o: triton_moe.fused_moe_triton(
            x, lg, kernel_weights, activation="silu", routing=routing, routing_bias=bias, out=o, config=c,
            options=KernelOptions(pdl=True), **kw))

    plain = run_graph(0)
    for level in (1, 2) if not cfg.prefetch else (1,):  # two chunks: without prefetch only
        early = run_graph(level)
        for e, p in zip(early, plain):
            assert not e.isnan().any()
            assert torch.equal(e, p)
        for i in (0, calls - 1):
            ref = fused_moe_reference(xs[i], ls[i], *weights, activation="silu", routing=routing, routing_bias=bias,
                                      quantize_activations=False, **kw)
            rel = ((early[i].float() - ref.float()).norm() / ref.float().norm()).item()
            assert rel < 1e-2, rel


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens,activation", [(40, "silu"), (300, "relu2"), (1500, "gelu"), (1500, "relu2")])
def test_grid_order_is_bit_identical(tokens, activation, monkeypatch):
    """``TileConfig.nfirst`` only reorders the programs: the same products in the same order per program, so
    the output is bit-identical to row blocks first (16-, 64- and 128-row tiles) and matches the reference;
    with more row blocks than grid axis 1 takes, the call falls back to row blocks first."""

    from moe_passes.kernels import triton_moe, triton_tiles
    from moe_passes.kernels.options import KernelOptions
    from moe_passes.kernels.triton_plan import H200, Problem, plan

    device = torch.device("cuda")
    hidden, inter, experts, top_k = 704, 208, 16, 4
    weights = make_layer(hidden, inter, experts, activation, device, seed=tokens)
    kernel_weights = triton_moe.prepare_weights(weights)
    g = torch.Generator(device="cpu").manual_seed(tokens + 1)
    x = (torch.randn(tokens, hidden, generator=g) / 10).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    # the tiles the table gives these rows per expert (16-row tiles where 40 tokens plan the grouped decode)
    variant = "tiles16" if tokens < 100 else ""
    base = plan(Problem(tokens, top_k, experts, hidden, inter, is_gated(activation)), H200,
                KernelOptions(variant=variant)).config
    assert isinstance(base, TileConfig) and base.nfirst and base.bm == (16 if tokens < 100 else base.bm), base

    def run(cfg):
        out = torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16, device=device)
        return triton_moe.fused_moe_triton(x, logits, kernel_weights, top_k=top_k, activation=activation, out=out,
                                           config=cfg)

    first_n = run(base)
    first_m = run(dataclasses.replace(base, nfirst=False))
    monkeypatch.setattr(triton_tiles, "GRID_Y_MAX", 2)  # every call here has more row blocks than that
    fallback = run(base)
    torch.cuda.synchronize()
    assert torch.equal(first_n, first_m) and torch.equal(fallback, first_m)
    ref = fused_moe_reference(x, logits, *weights, top_k=top_k, activation=activation,
                              quantize_activations=False).float()
    assert ((first_n.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bm,tail", [(128, 64), (128, 32), (64, 16)])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
def test_tail_blocks_are_bit_identical_to_whole_blocks(bm, tail, activation):
    """Which of an expert's pairs land in its tail block follows the grouping's atomic ranks, an arbitrary
    order: the tail tiles must therefore compute every row exactly as the main tiles do (the same exact
    products summed in the same K order; swapped operands and a longer K step change neither), or the output
    would change from run to run.  Compared bit for bit with the same call without tails."""
    from moe_passes.kernels import triton_moe

    device = torch.device("cuda")
    hidden, inter, experts, top_k = 2880, 1040, 16, 4  # 1040: GEMM2's K ends in a narrow band piece
    tokens = (bm + tail // 2) * experts // top_k
    weights = make_layer(hidden, inter, experts, activation, device, seed=bm + tail)
    kernel_weights = triton_moe.prepare_weights(weights)
    g = torch.Generator(device="cpu").manual_seed(tail)
    x = (torch.randn(tokens, hidden, generator=g) / 10).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    cfg = TileConfig(bm=bm, bn1=128 if bm == 64 else 64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64,
                     warps2=4, stages2=3, wprefetch=True, nfirst=True, tail=tail)
    with_tails = triton_moe.fused_moe_triton(x, logits, kernel_weights, top_k=top_k, activation=activation,
                                             config=cfg)
    without = triton_moe.fused_moe_triton(x, logits, kernel_weights, top_k=top_k, activation=activation,
                                          config=dataclasses.replace(cfg, tail=0))
    torch.cuda.synchronize()
    assert not with_tails.isnan().any()
    assert torch.equal(with_tails, without)


@pytest.mark.gpu
@needs_gpu
def test_bad_out_and_logits_are_errors():
    """A wrong ``out`` or ``router_logits`` is a MoEConfigError naming it, not a bad write or read."""
    from moe_passes.errors import MoEConfigError
    from moe_passes.kernels import triton_moe

    weights = triton_moe.prepare_weights(make_layer(256, 64, 4, "silu", torch.device("cuda"), seed=3))
    x = torch.randn(2, 256, device="cuda").to(torch.bfloat16)
    logits = torch.randn(2, 4, device="cuda")
    for bad in (torch.empty(2, 128, dtype=torch.bfloat16, device="cuda"),
                torch.empty(2, 256, dtype=torch.float32, device="cuda"),
                torch.empty(256, 2, dtype=torch.bfloat16, device="cuda").t()):
        with pytest.raises(MoEConfigError, match="out must be a bf16"):
            triton_moe.fused_moe_triton(x, logits, weights, top_k=2, out=bad)
    for bad in (logits[:1], torch.randn(2, 8, device="cuda"), torch.ones(2, 4, dtype=torch.int64, device="cuda"),
                logits.cpu()):
        with pytest.raises(MoEConfigError, match="router_logits must be"):
            triton_moe.fused_moe_triton(x, bad, weights, top_k=2)
    assert not triton_moe.fused_moe_triton(x, logits, weights, top_k=2).isnan().any()


def _check_strided_decode(cfg, activation, hidden, inter, tokens, seed, x_offset=8):
    """One call with ``cfg`` on a strided activation input (row stride hidden + 24, offset ``x_offset``
    elements), 16 experts, top-4, into a poisoned output, against the reference."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    device = torch.device("cuda")
    experts, top_k = 16, 4
    weights = make_layer(hidden, inter, experts, activation, device, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    wide = (torch.randn(tokens, hidden + 24, generator=g) / 10).to(device, torch.bfloat16)
    x = wide[:, x_offset:x_offset + hidden]
    logits = torch.randn(tokens, experts, generator=g).to(device)
    ref = fused_moe_reference(x.contiguous(), logits, *weights, top_k=top_k, activation=activation,
                              routing="renormalize", quantize_activations=False)
    out = torch.full_like(ref, float("nan"))
    fused_moe_triton(x, logits, prepare_weights(weights), top_k=top_k, activation=activation, routing="renormalize",
                     out=out, config=cfg)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=5e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation", TRITON_ACTIVATIONS)
@pytest.mark.parametrize("hidden,inter,split1,split2,vec", [(720, 208, 1, 1, False), (2896, 464, 2, 3, False),
                                                          (1040, 1040, 3, 2, False), (2880, 1056, 1, 1, True),
                                                          (2880, 1056, 2, 3, True)])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_tensor_core_decode_edges(activation, hidden, inter, split1, split2, vec, grouped, prefetch):
    """The tensor-core decode GEMVs (inline ``mma.sync``): group counts that end inside a chunk and inside a
    thread's pair of groups (2896 = 181 groups, 208 = 13), K splits, every activation, per-pair and grouped
    programs, a strided activation input; fresh inputs, poisoned output.  With ``vec`` the 16-byte loads
    (even group counts, 2880 = 180 and 1056 = 66, whose last chunks are partial), on activation rows that
    are 16-byte aligned (one K split) or only 8-byte aligned (then the activations keep 8-byte loads)."""
    cfg = DecodeConfig(grouped=grouped, split1=split1, split2=split2, prefetch=prefetch, vec1=vec, vec2=vec)
    seed = 300 + TRITON_ACTIVATIONS.index(activation) * 7 + hidden + split1
    _check_strided_decode(cfg, activation, hidden, inter, tokens=5, seed=seed, x_offset=4 if split1 > 1 else 8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation", TRITON_ACTIVATIONS)
@pytest.mark.parametrize("hidden,inter,split1,split2,vec", [(720, 208, 1, 1, False), (2896, 464, 2, 3, False),
                                                          (2880, 1056, 2, 3, True)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_grouped_decode_column_tiles_edges(activation, hidden, inter, split1, split2, vec, prefetch):
    """The grouped decode with 16-token blocks (two column tiles of 8 tokens sharing each chunk's dequantized
    weights): 70 tokens at top-4 of 16 experts (~17 pairs each), so blocks with both tiles live, with the
    second empty and with a partial last tile; the K edges and splits of the edge test above."""
    cfg = DecodeConfig(grouped=True, cols=2, split1=split1, split2=split2, prefetch=prefetch, vec1=vec, vec2=vec)
    seed = 700 + TRITON_ACTIVATIONS.index(activation) * 7 + hidden + prefetch
    _check_strided_decode(cfg, activation, hidden, inter, tokens=70, seed=seed, x_offset=4 if split1 > 1 else 8)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("tokens", [9, 100, 600])
def test_column_tiles_are_bit_identical_to_8_token_blocks(activation, tokens):
    """A pair's products and their K order do not depend on which column tile of which block it lands in, so
    16-token blocks must give the 8-token blocks' output bit for bit (fresh inputs, 64 experts)."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    device = torch.device("cuda")
    hidden, inter, experts, top_k = 1024, 320, 64, 6
    weights = prepare_weights(make_layer(hidden, inter, experts, activation, device, seed=tokens))
    x = (torch.randn(tokens, hidden, device=device) / 10).to(torch.bfloat16)
    logits = torch.randn(tokens, experts, device=device)
    outs = [fused_moe_triton(x, logits, weights, top_k=top_k, activation=activation, routing="renormalize",
                             config=DecodeConfig(grouped=True, cols=cols, prefetch=prefetch, vec1=True, vec2=True))
            for cols, prefetch in ((1, True), (2, True), (2, False))]
    assert not outs[0].isnan().any()
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu2"])
@pytest.mark.parametrize("hidden,inter,ks1,vec", [(720, 208, 16, False), (2896, 464, 2, False),
                                                  (2896, 464, 8, False), (2880, 1056, 4, True)])
def test_gemm1_in_program_k_split_edges(activation, hidden, inter, ks1, vec):
    """GEMM1 programs whose warps split one tile's K (``ks1``): warps with no chunk at all (720 = 6 chunks on
    16 warps), a last chunk that ends inside a thread's pair of groups (2896 = 181 groups), 16-byte loads;
    strided activations, fresh inputs, poisoned output, against the reference."""
    cfg = DecodeConfig(grouped=False, ks1=ks1, vec1=vec, vec2=vec)
    _check_strided_decode(cfg, activation, hidden, inter, tokens=5, seed=500 + hidden + ks1,
                          x_offset=8 if vec else 4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("pairs,experts,bm,spread,tail", [
    (40, 16, 8, "random", 0), (1024, 128, 8, "random", 0), (1024, 8, 16, "one", 0), (700, 256, 16, "three", 0),
    (1600, 128, 16, "random", 0), (3000, 60, 64, "three", 0), (4600, 32, 128, "random", 32),
    (3000, 60, 64, "three", 16), (1100, 8, 128, "random", 64), (1100, 6, 64, "one", 32),
    (32768, 128, 128, "random", 32), (32768, 256, 128, "random", 64)])
def test_grouping_places_every_pair_once(pairs, experts, bm, spread, tail):
    """The grouping (one program up to 1024 pairs and 16-row blocks, three launches beyond): every pair in
    exactly one row of a block of its own expert, each expert in the fewest blocks (with tails: its last
    ``tail`` rows or fewer past whole blocks in a tail block of its own), padding rows and unused blocks
    marked, and the counters left at the experts' pair counts."""
    from moe_passes.kernels.triton_group import align
    from moe_passes.kernels.triton_plan import one_program_grouping

    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(pairs + experts)
    if spread == "random":
        ids = torch.randint(0, experts, (pairs,), generator=g)
    elif spread == "one":
        ids = torch.full((pairs,), experts - 1)
    else:
        ids = torch.randint(0, 3, (pairs,), generator=g) * (experts // 3)
    max_blocks = -(-pairs // bm) + min(pairs, experts)
    max_tails = min(pairs, experts) if tail else 0
    main_rows = max_blocks * bm
    counts = torch.zeros(experts, dtype=torch.int32, device=device)
    sorted_ids, bexp = align(ids.to(device), counts, bm, main_rows + max_tails * tail, max_blocks,
                             tail=tail, max_tails=max_tails,
                             one_program=one_program_grouping(pairs, bm, tail, KernelOptions()))
    assert bexp.shape == (max_blocks + max_tails,)  # the main blocks' experts, then the tail blocks'
    rows = sorted_ids.cpu()[:main_rows].view(max_blocks, bm)
    blocks, texp = bexp.cpu()[:max_blocks], bexp.cpu()[max_blocks:]
    per_expert = torch.bincount(ids, minlength=experts)
    rest = per_expert % bm
    has_tail = (rest > 0) & (rest <= tail)  # never without tails
    nblocks = (per_expert - torch.where(has_tail, rest, 0) + bm - 1) // bm
    used = int(nblocks.sum())
    assert torch.equal(blocks[:used], torch.repeat_interleave(torch.arange(experts), nblocks).to(torch.int32))
    assert (blocks[used:] == -1).all()
    assert (rows[used:] == pairs).all()
    live = rows[:used] < pairs
    assert torch.equal(ids[rows[:used][live]], blocks[:used, None].expand(-1, bm)[live])
    placed = [rows[:used][live]]
    if tail:
        t_rows, t_exp = sorted_ids.cpu()[main_rows:].view(max_tails, tail), texp.cpu()
        n_tails = int(has_tail.sum())
        assert n_tails > 0, "the case should make some tail blocks"
        assert torch.equal(t_exp[:n_tails], torch.arange(experts)[has_tail].to(torch.int32))
        assert (t_exp[n_tails:] == -1).all() and (t_rows[n_tails:] == pairs).all()
        t_live = t_rows[:n_tails] < pairs
        assert torch.equal(t_live.sum(1), rest[has_tail])  # each tail holds exactly its expert's last rows
        assert torch.equal(ids[t_rows[:n_tails][t_live]], t_exp[:n_tails, None].expand(-1, tail)[t_live].long())
        placed.append(t_rows[:n_tails][t_live])
        # experts with a tail fill their main blocks completely
        assert live[torch.repeat_interleave(has_tail, nblocks)].all()
    assert torch.equal(torch.sort(torch.cat(placed)).values, torch.arange(pairs))
    assert torch.equal(counts.cpu(), per_expert.to(torch.int32))


@pytest.mark.gpu
@needs_gpu
def test_decode_matches_tensor_core_tiles():
    """The tensor-core decode and the tensor-core tiles both sum exact products in fp32: they agree closely."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    device = torch.device("cuda")
    hidden, inter, experts, top_k, tokens = 2048, 768, 32, 8, 2
    weights = prepare_weights(make_layer(hidden, inter, experts, "silu", device, seed=21))
    g = torch.Generator(device="cpu").manual_seed(22)
    x = (torch.randn(tokens, hidden, generator=g) / 10).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    mma = TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=4, bn2=64, bk2=128, warps2=4, stages2=4, split2=2)
    tc_pair = DecodeConfig(grouped=False, split1=2)
    tc_group = DecodeConfig(grouped=True, split2=2)
    a = fused_moe_triton(x, logits, weights, top_k=top_k, activation="silu", routing="renormalize", config=mma)
    for cfg in (tc_pair, tc_group):
        b = fused_moe_triton(x, logits, weights, top_k=top_k, activation="silu", routing="renormalize", config=cfg)
        torch.cuda.synchronize()
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert rel < 2e-3, (cfg, rel)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", ["tc_pair", "tc_group", "mma16", "mma128", "wgmma128"])
def test_subnormal_codes_are_not_flushed(variant):
    """Weights made only of +-0.5 (E2M1 code 1, an fp32/bf16 subnormal in the kernels' bit tricks): a flush
    to zero anywhere would zero the whole output."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    device = torch.device("cuda")
    hidden, inter, experts, top_k = 512, 256, 8, 2
    g = torch.Generator(device="cpu").manual_seed(31)

    def half_codes(e, n, k):
        nib = torch.where(torch.rand(e, n, k, generator=g) < 0.5, 1, 9).to(torch.uint8)  # +0.5 / -0.5
        packed = (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(device)
        scales = (torch.rand(e, n, k // 16, generator=g) * 3 + 0.5).to(torch.float8_e4m3fn).to(device)
        return packed, scales, torch.full((e,), 2.0, device=device)

    weights = registry.MoEWeights(*half_codes(experts, 2 * inter, hidden), *half_codes(experts, hidden, inter))
    tokens = 200 if variant.endswith("128") else 3
    x = torch.randn(tokens, hidden, generator=g).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    configs = {
        "tc_pair": DecodeConfig(grouped=False, split2=3),
        "tc_group": DecodeConfig(grouped=True, split1=2),
        "mma16": TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=4, bn2=64, bk2=128, warps2=4, stages2=4),
        "mma128": TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4, stages2=3,
                             wprefetch=True),
        "wgmma128": TileConfig(bm=128, bn1=64, warps1=4, bn2=128, warps2=4, **_WGMMA),
    }
    ref = fused_moe_reference(x, logits, *weights, top_k=top_k, activation="silu", routing="renormalize",
                              quantize_activations=False)
    out = fused_moe_triton(x, logits, prepare_weights(weights), top_k=top_k, activation="silu",
                           routing="renormalize", config=configs[variant])
    torch.cuda.synchronize()
    assert ref.float().abs().mean() > 0.01
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("routing", ROUTING_METHODS)
@pytest.mark.parametrize("experts,tokens", [(16, 1), (128, 5), (256, 64)])
def test_routing_kernel_matches_reference(routing, experts, tokens):
    """The one-launch routing against ``reference.route``: same experts in the same order, same weights."""
    from moe_passes.kernels.reference import route
    from moe_passes.kernels.triton_route import route as triton_route

    g = torch.Generator(device="cpu").manual_seed(experts + tokens)
    logits = torch.randn(tokens, experts, generator=g).cuda()
    kw = dict(top_k=8 if experts > 16 else 4)
    if routing == "llama4":
        kw = dict(top_k=1)
    if routing == "sparsemixer":
        kw = dict(top_k=2, routing_params=[SPARSEMIXER_EPS])
    bias = None
    if routing == "deepseek_v3":
        bias = (torch.randn(experts, generator=g) / 10).cuda()
        kw.update(n_group=8 if experts > 16 else 4, topk_group=4 if experts > 16 else 2, routed_scaling_factor=2.5)
    want_w, want_ids = route(logits, kw["top_k"], routing, routing_bias=bias, n_group=kw.get("n_group"),
                             topk_group=kw.get("topk_group"), routed_scaling_factor=kw.get("routed_scaling_factor"),
                             routing_params=kw.get("routing_params"))
    w, ids = triton_route(logits, kw["top_k"], routing, bias, kw.get("n_group"), kw.get("topk_group"),
                         kw.get("routed_scaling_factor"), routing_params=kw.get("routing_params"))
    torch.cuda.synchronize()
    assert torch.equal(ids.cpu(), want_ids.cpu())
    torch.testing.assert_close(w.cpu(), want_w.float().cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_gpu
def test_routing_kernel_breaks_ties_by_lowest_expert():
    from moe_passes.kernels.triton_route import route

    logits = torch.zeros(3, 64, device="cuda")
    logits[1, 40:] = 1.0  # 24 tied best experts: the lowest four win
    w, ids = route(logits, 4, "renormalize", None, None, None, None)
    torch.cuda.synchronize()
    assert ids[0].tolist() == [0, 1, 2, 3] and ids[1].tolist() == [40, 41, 42, 43]
    torch.testing.assert_close(w.cpu(), torch.full((3, 4), 0.25))


# -- sparsemixer (PhiMoE) -------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("jitter_eps", [0.01, 0.0, 0.2])
@pytest.mark.parametrize("experts", [16, 100, 512])
def test_sparsemixer_routing_kernel_matches_reference(jitter_eps, experts):
    """The Triton routing of sparsemixer against ``reference.route`` (run on the CPU) on logits with ties at the
    top, all-negative and all-zero rows, and experts either side of each pick's mask threshold: same experts,
    same weights (the mask's division is IEEE in both)."""
    from moe_passes.kernels.reference import route
    from moe_passes.kernels.triton_route import route as triton_route

    logits = sparsemixer_logits(200, experts, jitter_eps, seed=experts + int(100 * jitter_eps))
    want_w, want_ids = route(logits, 2, "sparsemixer", routing_params=[jitter_eps])
    counts = torch.full((experts,), 7, dtype=torch.int32, device="cuda")
    w, ids = triton_route(logits.cuda(), 2, "sparsemixer", None, None, None, None, zero=counts,
                          routing_params=[jitter_eps])
    torch.cuda.synchronize()
    assert not counts.any()  # the grouping's counters, zeroed on the way
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)
    # and the fp32 logits the Triton path would get from bf16 ones route the same
    half = logits.bfloat16()
    w, ids = triton_route(half.cuda(), 2, "sparsemixer", None, None, None, None, routing_params=[jitter_eps])
    want_w, want_ids = route(half, 2, "sparsemixer", routing_params=[jitter_eps])
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
def test_sparsemixer_layer_matches_reference(tokens, activation, monkeypatch):
    """The whole Triton layer with sparsemixer routing (PhiMoE's jitter_eps 0.01) on near-threshold logits, through
    the registry's ``run`` (as the op calls it), against the bf16-activation reference.  One token takes the
    Triton path although the one-launch CUDA decode is on: it refuses sparsemixer."""
    from moe_passes.kernels import cuda_decode

    _refuse_cuda_decode(monkeypatch)
    assert cuda_decode.static_refusal(720, 208, 16, 2, True, "sparsemixer", None, None, 132, None,
                                      KernelOptions()) is not None
    device = torch.device("cuda")
    hidden, inter, experts = 720, 208, 16
    weights = make_layer(hidden, inter, experts, activation, device, tokens)
    g = torch.Generator(device="cpu").manual_seed(tokens)
    x = (torch.randn(tokens, hidden, generator=g) / 10).to(device, torch.bfloat16)
    logits = sparsemixer_logits(tokens, experts, 0.01, seed=tokens + 3).to(device)
    ref = fused_moe_reference(x, logits, *weights, activation=activation, top_k=2, routing="sparsemixer",
                              routing_params=[0.01], quantize_activations=False)
    spec = registry.get("triton")
    shape = MoEShape(hidden=hidden, intermediate=inter, experts=experts, top_k=2, activation=activation,
                     alignment=spec.alignment)
    args = registry.RunArgs(top_k=2, activation=activation, routing="sparsemixer", routing_params=(0.01,))
    out = spec.run(x, logits, spec.prepare(weights, shape), None, None, None, args)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=5e-2)
    with pytest.raises(MoEConfigError, match="needs its parameter"):
        spec.run(x, logits, spec.prepare(weights, shape), None, None, None,
                 dataclasses.replace(args, routing_params=None))


# -- gpt-oss: expert biases and swiglu_oai -------------------------------------------------------------------

# Not gpt-oss's defaults (1.702, 1.0, 7.0), so that a kernel that ignored them would fail; a limit the
# biased GEMM1 outputs pass on both sides.
OAI_PARAMS = [1.5, 0.25, 2.0]


def _gpt_oss_layer(hidden, inter, experts, activation, seed):
    """Weights and biases on the GPU: ``w13_bias`` ~ N(0, 2), so that about a third of the gate and up values
    lie past the clamp limit, and ``w2_bias`` ~ N(0, 1), as large as GEMM2's output."""
    device = torch.device("cuda")
    weights = make_layer(hidden, inter, experts, activation, device, seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    b13 = (torch.randn(experts, weights.w13.shape[1], generator=g) * 2).to(device)
    b2 = torch.randn(experts, hidden, generator=g).to(device)
    assert (b13.abs() > OAI_PARAMS[2]).float().mean() > 0.25
    return weights, b13, b2


def _gpt_oss_check(weights, b13, b2, activation, x, logits, top_k, **call):
    """``fused_moe_triton`` with the biases (and swiglu_oai's parameters) into a poisoned output, against the
    reference; returns the output."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    params = OAI_PARAMS if activation == "swiglu_oai" else None
    ref = fused_moe_reference(x, logits, *weights, top_k=top_k, activation=activation, routing="renormalize",
                              w13_bias=b13, w2_bias=b2, activation_params=params, quantize_activations=False)
    out = torch.full_like(ref, float("nan"))
    fused_moe_triton(x, logits, prepare_weights(weights), top_k=top_k, activation=activation, routing="renormalize",
                     out=out, activation_params=params, w13_bias=b13, w2_bias=b2, **call)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output elements"
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"
    cfg = call.get("config")
    if cfg is not None and cfg.bf16_rows:
        # The prefill tiles round each pair's weighted row to bf16 before the fp32 sum, so an element's error
        # grows with the sum of its pairs' magnitudes, not with the (possibly cancelling) output: each expert's
        # contribution from the reference alone (its one-expert slice) gives that sum.
        experts = weights.w13.shape[0]
        mags = torch.zeros_like(ref, dtype=torch.float32)
        for e in range(experts):
            one = registry.MoEWeights(*(t[e:e + 1] for t in weights))
            mags += fused_moe_reference(x, logits, *one, top_k=top_k, activation=activation, routing="renormalize",
                                        w13_bias=b13[e:e + 1], w2_bias=b2[e:e + 1], activation_params=params,
                                        quantize_activations=False, local_expert_offset=e,
                                        global_num_experts=experts).float().abs()
        err = (out.float() - ref.float()).abs()
        allowed = 3e-2 + 5e-2 * ref.float().abs() + 2.0 ** -8 * mags
        assert (err <= allowed).all(), f"{int((err > allowed).sum())} elements past the bf16-row bound"
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=5e-2)
    no_bias = fused_moe_reference(x, logits, *weights, top_k=top_k, activation=activation, routing="renormalize",
                                  activation_params=params, quantize_activations=False)
    assert ((no_bias.float() - ref.float()).norm() / ref.float().norm()).item() > 0.3  # the biases matter
    return out


_OAI_CONFIGS = {
    "tc_pair": DecodeConfig(grouped=False, vec1=True, vec2=True, early2=1),
    # GEMM1 split over the grid: the biases and swiglu_oai in act_kernel; GEMM2's bias in K split 0 only
    "tc_pair_split": DecodeConfig(grouped=False, split1=3, split2=2, vec1=True, vec2=True, early2=2),
    # GEMM1's warps splitting one tile's K (ks1)
    "tc_pair_ks4": DecodeConfig(grouped=False, split2=2, ks1=4),
    "tc_pair_ks8_vec": DecodeConfig(grouped=False, ks1=8, vec1=True, vec2=True, early2=1),
    "tc_group_pf": DecodeConfig(grouped=True, prefetch=True, vec1=True, vec2=True, early2=1),
    "tc_group_split_w2": DecodeConfig(grouped=True, warps1=2, warps2=2, split1=2, split2=3, prefetch=True),
    "tc_group16": DecodeConfig(grouped=True, cols=2, vec1=True, vec2=True, early2=2),
    "tc_group16_split": DecodeConfig(grouped=True, cols=2, split1=2, split2=3),
    "mma16_swap_pf_split": TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=3, bn2=64, bk2=128, warps2=4,
                                      stages2=3, split2=3, swap=True, wprefetch=True, nfirst=True, chains=True),
    "mma64": TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4, stages2=3),
    "mma64_pf_tail16": TileConfig(bm=64, bn1=128, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                  stages2=3, wprefetch=True, nfirst=True, tail=16),
    "mma128_pf_tail32": TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                   stages2=3, wprefetch=True, nfirst=True, tail=32, bf16_rows=True),
    "mma128_tail64": TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4,
                                stages2=3, nfirst=True, tail=64, bf16_rows=True),
}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant,activation", [(v, "swiglu_oai") for v in _OAI_CONFIGS]
                         + [(v, "relu2") for v in ("tc_pair_split", "tc_pair_ks4", "tc_group16", "mma16_swap_pf_split",
                                                   "mma128_pf_tail32")])
def test_gpt_oss_variants(variant, activation):
    """Expert biases and swiglu_oai (other parameters than gpt-oss's, values past the clamp limit) in every
    epilogue the planner can pick: per-pair and grouped decode (with the in-program K split, a GEMM1 split
    through the activation launch, a GEMM2 split, 16-token blocks), the 16-, 64- and 128-row tiles and their
    tail blocks; biases on an ungated (relu2) layer too.  2880 = gpt-oss's hidden, 1040 = 65 groups."""
    cfg = _OAI_CONFIGS[variant]
    hidden, inter, experts, top_k = 2880, 1040, 16, 4
    tokens = (700 if variant.startswith("mma128") else 150 if variant.startswith("tc_group16")
              else 60 if variant.startswith(("tc_group", "mma16")) else 9)
    if cfg.__class__ is TileConfig and cfg.tail:  # some experts' last rows in tail blocks
        tokens = (cfg.bm + cfg.tail // 2) * experts // top_k
    weights, b13, b2 = _gpt_oss_layer(hidden, inter, experts, activation, seed=len(variant))
    g = torch.Generator(device="cpu").manual_seed(tokens)
    x = (torch.randn(tokens, hidden, generator=g) / 10).to("cuda", torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).cuda()
    out = _gpt_oss_check(weights, b13, b2, activation, x, logits, top_k, config=cfg)
    if variant.startswith(("mma", "tc_group")):  # grouping order must not matter, biases included
        from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

        again = fused_moe_triton(x, logits, prepare_weights(weights), top_k=top_k, activation=activation,
                                 routing="renormalize", config=cfg, w13_bias=b13, w2_bias=b2,
                                 activation_params=OAI_PARAMS if activation == "swiglu_oai" else None)
        assert torch.equal(again, out)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("hidden,inter", [(2880, 1040), (4608, 256)])
def test_gpt_oss_one_token_takes_the_triton_decode(hidden, inter, monkeypatch):
    """One token of a layer with biases or swiglu_oai is refused by the one-launch CUDA decode (statically,
    by the planner, and at run time) and runs the planned Triton decode (4608: GEMM1's ks1 split)."""
    from moe_passes.kernels import cuda_decode
    from moe_passes.kernels.triton_moe import plan_call, prepare_weights
    from moe_passes.kernels.triton_plan import Problem

    device = torch.device("cuda")
    for biases, params in ((True, True), (True, False), (False, True)):
        problem = Problem(1, 4, 16, hidden, inter, True, biases=biases, activation_params=params)
        assert plan_call(problem, device, KernelOptions(cuda_decode=True)).variant == "pair_decode"
    weights, b13, b2 = _gpt_oss_layer(hidden, inter, 16, "swiglu_oai", seed=hidden)
    g = torch.Generator(device="cpu").manual_seed(hidden + 1)
    x = (torch.randn(1, hidden, generator=g) / 10).to(device, torch.bfloat16)
    logits = torch.randn(1, 16, generator=g).to(device)
    args = (x, logits, prepare_weights(weights), 4, "swiglu_oai", "renormalize", None, None, None, None)
    on = KernelOptions(cuda_decode=True)
    assert cuda_decode.unsupported_reason(*args, options=on) is not None
    assert cuda_decode.unsupported_reason(*args[:4], "silu", *args[5:], options=on, biases=True) is not None
    if torch.cuda.get_device_capability(device)[0] == 9:
        assert "expert biases" in cuda_decode.unsupported_reason(*args[:4], "silu", *args[5:], options=on,
                                                                 biases=True)
        assert "activation parameters" in cuda_decode.unsupported_reason(*args, options=on)
    with pytest.raises(MoEConfigError, match="no epilogue for 'swiglu_oai'"):
        cuda_decode.decode_one_token(x, logits, args[2], top_k=4, activation="swiglu_oai", routing="renormalize",
                                     out=torch.empty_like(x))
    _refuse_cuda_decode(monkeypatch)
    _gpt_oss_check(weights, b13, b2, "swiglu_oai", x, logits, 4)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("tokens", [1, 5, 40, 300])
def test_gpt_oss_layer_runs_on_the_triton_kernel(tokens, monkeypatch):
    """A gpt-oss-like FusedMoE (hidden and intermediate that pad, biases padded with the weights) on the GPU:
    the registry picks the Triton kernel without a fallback warning, eager and compiled agree with the
    reference; one token does not take the CUDA decode."""
    import warnings

    from moe_passes import FusedMoE
    from moe_passes.contract import SwigluOAI

    device = torch.device("cuda")
    if registry.get("trtllm").available(device):
        pytest.skip("Blackwell: the TRTLLM kernel runs gpt-oss here (test_flashinfer_trtllm.py)")
    g = torch.Generator().manual_seed(tokens)
    hidden, inter, experts, top_k = 360, 72, 8, 4  # 360 pads to 368, 72 to 80 (each half)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.1
    b13 = torch.randn(experts, 2 * inter, generator=g) * 2
    b2 = torch.randn(experts, hidden, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", registry.KernelFallbackWarning)
        moe = FusedMoE.from_float(w13, w2, top_k=top_k, activation="swiglu_oai", w13_bias=b13, w2_bias=b2,
                                  activation_params=SwigluOAI(*OAI_PARAMS),
                                  calibration=torch.randn(32, hidden, generator=g)).to(device)
    assert moe.kernel == "triton"
    _refuse_cuda_decode(monkeypatch)
    x = (torch.randn(tokens, hidden, generator=g) / 3).to(device, torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).to(device)
    ref = fused_moe_reference(x, logits, *moe.canonical_weights(), top_k=top_k, activation="swiglu_oai",
                              w13_bias=moe.w13_bias.to(device), w2_bias=moe.w2_bias.to(device),
                              activation_params=moe.activation_params, quantize_activations=False)
    with torch.no_grad():
        eager = moe(x, logits)
        compiled = torch.compile(moe, backend="moe_nvfp4", options={"inner": "eager"})(x, logits)
    torch.cuda.synchronize()
    for out in (eager, compiled):
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, f"relative error {rel:.2e}"
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=5e-2)


# -- expert parallel: a rank computes only its own pairs -----------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("variant", list(_OAI_CONFIGS))
def test_expert_parallel_rank_against_the_reference_of_its_experts(variant):
    """Every config shape with local experts (``local_expert_offset`` / ``global_num_experts``), the biases and
    swiglu_oai included: each of 4 ranks' outputs, written into a poisoned tensor, matches the reference of its
    own experts, and the ranks sum to the unsharded layer.  Other ranks' pairs (id -1) must be skipped by the
    grouping, the per-pair programs, the activation launch's bias read and the combine."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights
    from moe_passes.parallel import expert_block

    cfg = _OAI_CONFIGS[variant]
    hidden, inter, experts, top_k, ranks = 2880, 1040, 16, 4, 4
    tokens = (700 if variant.startswith("mma128") else 150 if variant.startswith("tc_group16")
              else 60 if variant.startswith(("tc_group", "mma16")) else 9)
    weights, b13, b2 = _gpt_oss_layer(hidden, inter, experts, "swiglu_oai", seed=len(variant) + 1)
    g = torch.Generator(device="cpu").manual_seed(tokens + 3)
    x = (torch.randn(tokens, hidden, generator=g) / 10).to("cuda", torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=g).cuda()
    common = dict(top_k=top_k, activation="swiglu_oai", routing="renormalize", activation_params=OAI_PARAMS)
    full = fused_moe_reference(x, logits, *weights, w13_bias=b13, w2_bias=b2, quantize_activations=False,
                               **common).float()
    total = torch.zeros_like(full)
    for rank in range(ranks):
        offset, count = expert_block(experts, ranks, rank)
        local = registry.MoEWeights(*(t[offset:offset + count] for t in weights))
        lb13, lb2 = b13[offset:offset + count], b2[offset:offset + count]
        ep = dict(local_expert_offset=offset, global_num_experts=experts)
        ref = fused_moe_reference(x, logits, *local, w13_bias=lb13, w2_bias=lb2, quantize_activations=False,
                                  **common, **ep).float()
        out = torch.full((tokens, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")
        fused_moe_triton(x, logits, prepare_weights(local), out=out, config=cfg, w13_bias=lb13, w2_bias=lb2,
                         **common, **ep)
        torch.cuda.synchronize()
        assert not out.isnan().any(), f"rank {rank}: unwritten or NaN output elements"
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"rank {rank}: relative error {rel:.2e} against the reference of its experts"
        total += out.float()
    rel = ((total - full).norm() / full.norm()).item()
    assert rel < 1e-2, f"the ranks sum to the layer within {rel:.2e}"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("bm,tail,one_program", [(8, 0, True), (16, 0, True), (16, 0, False), (64, 16, False),
                                                 (128, 32, False)])
def test_grouping_leaves_other_ranks_pairs_out(bm, tail, one_program):
    """Pairs of id -1 (another rank's expert) get no row: the grouped rows hold exactly this rank's pairs, each
    in a block (or tail block) of its own expert."""
    from moe_passes.kernels.triton_group import align

    experts, pairs = 8, 600
    g = torch.Generator(device="cpu").manual_seed(bm + tail)
    ids = torch.randint(-1, experts, (pairs,), generator=g, dtype=torch.int32)
    ids[torch.rand(pairs, generator=g) < 0.5] = -1  # most pairs are other ranks'
    counts = torch.zeros(experts, dtype=torch.int32, device="cuda")
    max_blocks = -(-pairs // bm) + min(pairs, experts)
    max_tails = min(pairs, experts) if tail else 0
    main_rows = max_blocks * bm
    sorted_ids, bexp = align(ids.cuda(), counts, bm, main_rows + max_tails * tail, max_blocks, tail=tail,
                             max_tails=max_tails, one_program=one_program)
    rows = sorted_ids.cpu()
    placed = torch.nonzero(rows < pairs).flatten()
    assert sorted(rows[placed].tolist()) == torch.nonzero(ids >= 0).flatten().tolist()
    bexp = bexp.cpu()
    for row in placed.tolist():
        expert = bexp[row // bm] if row < main_rows else bexp[max_blocks + (row - main_rows) // tail]
        assert expert == ids[rows[row]], f"row {row} holds pair {rows[row]} of expert {ids[rows[row]]}"
