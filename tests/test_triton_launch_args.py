"""Every Triton launch of the Hopper path binds to its kernel's signature, for every variant and option the
planner or a caller can pick, checked on a CPU: a subprocess swaps in a stand-in ``triton``
(tests/fake_triton.py) whose kernels record their launches instead of running.  Layers with expert biases
and swiglu_oai (gpt-oss) are checked apart: their flags reach every epilogue, and no other layer's launch
gets them; so are sparsemixer layers (PhiMoE): the routing launch gets its method code and threshold."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = r'''
import importlib, sys
sys.path[:0] = [ROOT, ROOT + "/tests"]
import torch
import moe_passes  # torch's inductor probes triton at import: load it before the stand-in
from moe_passes.kernels import registry, triton_moe  # noqa: F401
import fake_triton
fake_triton.install()
for name in [m for m in sys.modules if m.startswith("moe_passes.kernels.triton_") or m.endswith("cuda_decode")]:
    if not name.endswith("triton_plan"):
        del sys.modules[name]
registry._REGISTRY.pop("triton")
tm = importlib.import_module("moe_passes.kernels.triton_moe")
from moe_passes.kernels.options import KernelOptions
from moe_passes.kernels.triton_plan import DecodeConfig, TileConfig
from nvfp4_layers import make_layer

configs = [None, DecodeConfig(grouped=False, ks1=4), DecodeConfig(grouped=False, split1=3, split2=2, early2=2),
           DecodeConfig(grouped=True, split1=2, split2=3, prefetch=True, warps1=2, warps2=2, vec1=True, vec2=True),
           DecodeConfig(grouped=True, cols=2, prefetch=True, early2=1), DecodeConfig(grouped=True, cols=2, split1=2),
           TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4, stages2=3, tail=32),
           TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=3, bn2=64, bk2=128, warps2=4, stages2=3, split2=3,
                      swap=True, chains=True)]
EPILOGUE = {"_tgemv1_kernel", "act_kernel", "_gemm1_kernel", "_tgemv2_kernel", "_gemm2_kernel"}


def check_epilogues(calls, act, b13, b2, params):
    """Bias pointers and flags exactly where the layer has biases (GEMM1's where it applies the activation),
    swiglu_oai's parameters on every launch that applies it, nothing new on any other launch."""
    for name, _, a, _ in calls:
        if name not in EPILOGUE:
            continue
        applies = name in ("act_kernel", "_gemm1_kernel") or (name == "_tgemv1_kernel" and a["SPLIT"] == 1)
        if name in ("_tgemv2_kernel", "_gemm2_kernel"):
            got = a.get("b2_ptr")
            assert a.get("HAS_B2", False) == (b2 is not None) and (got is None) == (b2 is None), (name, a.keys())
            if b2 is not None:  # as given, or a narrower one zero-padded to the hidden size
                assert got is b2 or (got.shape[1] == a["H"] > b2.shape[1] and torch.equal(got[:, :b2.shape[1]], b2)
                                     and not got[:, b2.shape[1]:].any()), name
        else:
            want = b13 if applies else None
            assert a.get("b13_ptr") is want and a.get("HAS_B1", False) == (want is not None), (name, a.keys())
            if name == "act_kernel":
                assert ("ids_ptr" in a) == (b13 is not None)
            assert a["ACT"] == tm.ACT_CODES[act]
            if act == "swiglu_oai":
                assert [a["ALPHA"], a["BETA"], a["LIMIT"]] == params, a
            else:
                assert not {"ALPHA", "BETA", "LIMIT"} & set(a), a


LAYERS = {"plain": [(720, 208, 16, 4, "silu", False), (4608, 256, 12, 3, "relu2", False)],
          # 4608: one to four tokens plan GEMM1's in-program K split (ks1)
          "gpt-oss": [(720, 208, 16, 4, "swiglu_oai", True), (4608, 256, 12, 3, "relu2", True)],
          "phimoe": [(720, 208, 16, 2, "silu", False), (4608, 256, 12, 2, "relu2", False)]}[CASE]
ROUTINGS = ([("sparsemixer", dict(routing_params=[0.01]))] if CASE == "phimoe" else
            [("renormalize", {}), ("deepseek_v3", dict(n_group=4, topk_group=2)),
             ("deepseek_v3", dict(n_group=3, topk_group=1))])


def check_route(calls, routing, kw, experts, top_k, bias=None):
    """The routing launch gets the method's code and scalar: sparsemixer's mask threshold 2 * jitter_eps, and
    deepseek_v3's bias with unit stride (the kernel reads bias_ptr + expert; the layer's may be a strided view).
    No launch where the fused routing refuses the call (3 groups: the torch routing)."""
    from moe_passes.kernels.triton_route import FUSED_ROUTING
    launches = [a for name, _, a, _ in calls if name == "_route_kernel"]
    refused = FUSED_ROUTING.refusal(routing, top_k, experts, kw.get("n_group"), kw.get("topk_group"))
    assert len(launches) == (refused is None), (routing, kw, len(launches))
    if refused is not None:
        return
    (a,) = launches
    assert a["METHOD"] == {"renormalize": 1, "deepseek_v3": 2, "sparsemixer": 4}[routing], a["METHOD"]
    if routing == "sparsemixer":
        assert a["param"] == 2 * kw["routing_params"][0] and a["K"] == 2 and a["NG"] == 1, a
    if bias is not None:
        assert a["HAS_BIAS"] and a["bias_ptr"].stride(0) == 1 and torch.equal(a["bias_ptr"], bias), a
seen = set()
for hidden, inter, experts, top_k, act, biased in LAYERS:
    weights = tm.prepare_weights(make_layer(hidden, inter, experts, act, torch.device("cpu"), 0))
    n1 = weights.w13.shape[1]
    b13 = torch.randn(experts, n1) if biased else None
    b2 = torch.randn(experts, hidden - 16 * (hidden < 1024)) if biased else None  # 720: a narrower w2_bias
    params = [1.5, 0.25, 3.0] if act == "swiglu_oai" else None
    for routing, kw in ROUTINGS:
        if experts % kw.get("n_group", 1):
            continue
        bias = torch.randn(experts, 2)[:, 0] if routing == "deepseek_v3" else None  # a strided view
        for tokens in (1, 3, 16, 100, 700):
            x, logits = torch.randn(tokens, hidden).bfloat16(), torch.randn(tokens, experts)
            for cfg in configs:
                for opts in (KernelOptions(), KernelOptions(one_program_pairs=0)):
                    fake_triton.CALLS.clear()
                    tm.fused_moe_triton(x, logits, weights, top_k=top_k, activation=act, routing=routing,
                                        routing_bias=bias, config=cfg, options=opts, activation_params=params,
                                        w13_bias=b13, w2_bias=b2, **kw)
                    names = [c[0] for c in fake_triton.CALLS]
                    assert names[-1] == "combine_kernel", names
                    check_epilogues(fake_triton.CALLS, act, b13, b2, params)
                    check_route(fake_triton.CALLS, routing, kw, experts, top_k, bias)
                    seen.update(names)
            half = tm.prepare_weights(make_layer(hidden, inter, experts // 2, act, torch.device("cpu"), 1))
            tm.fused_moe_triton(x, logits, half, top_k=top_k, activation=act, routing=routing, routing_bias=bias,
                                local_expert_offset=experts // 2, global_num_experts=experts,
                                activation_params=params, w13_bias=None if b13 is None else b13[: experts // 2],
                                w2_bias=None if b2 is None else b2[: experts // 2], **kw)
if CASE == "gpt-oss":  # what the entry point refuses before any launch
    from moe_passes.errors import MoEConfigError
    hidden, inter, experts, top_k, act, _ = LAYERS[0]
    weights = tm.prepare_weights(make_layer(hidden, inter, experts, act, torch.device("cpu"), 0))
    x, logits = torch.randn(3, hidden).bfloat16(), torch.randn(3, experts)
    good = dict(w13_bias=torch.zeros(experts, 2 * inter), w2_bias=torch.zeros(experts, hidden))
    for bad, match in ((dict(w13_bias=torch.zeros(experts, inter)), "w13_bias must be"),
                       (dict(w2_bias=torch.zeros(experts, hidden + 16)), "w2_bias must be"),
                       (dict(w2_bias=torch.zeros(experts - 1, hidden)), "w2_bias must be"),
                       (dict(w13_bias=torch.zeros(experts, 2 * inter, dtype=torch.int32)), "w13_bias must be a float"),
                       (dict(activation_params=[1.0]), "alpha, beta, limit")):
        try:
            tm.fused_moe_triton(x, logits, weights, top_k=top_k, activation=act, **{**good, **bad})
        except MoEConfigError as exc:
            assert match in str(exc), (match, str(exc))
        else:
            raise AssertionError(f"accepted {bad}")
    # weights the kernels would index out of bounds or read strided (they take no strides): refused up front
    for field, bad in (("w13_scale", weights.w13_scale[:, :, :-1]), ("w2_global_scale", weights.w2_global_scale.half()),
                       ("w13", weights.w13.transpose(1, 2).contiguous().transpose(1, 2)), ("w2", weights.w2[:-1])):
        try:
            tm.fused_moe_triton(x, logits, weights._replace(**{field: bad}), top_k=top_k, activation=act, **good)
        except MoEConfigError as exc:
            assert f"{field} must be a contiguous" in str(exc), str(exc)
        else:
            raise AssertionError(f"accepted a bad {field}")
    for bad in (torch.zeros(experts - 3), torch.zeros(experts, 2)):
        try:
            tm.fused_moe_triton(x, logits, weights, top_k=top_k, activation=act, routing="deepseek_v3",
                                routing_bias=bad, **good)
        except MoEConfigError as exc:
            assert "routing_bias must be a float" in str(exc), str(exc)
        else:
            raise AssertionError(f"accepted a routing_bias of shape {tuple(bad.shape)}")
    try:
        tm.fused_moe_triton(x, logits, weights, top_k=top_k, activation="silu", activation_params=[1.0, 1.0, 1.0])
    except MoEConfigError as exc:
        assert "takes no parameters" in str(exc), str(exc)
    else:
        raise AssertionError("silu took parameters")
if CASE == "phimoe":  # what the entry point refuses before any launch
    from moe_passes.errors import MoEConfigError
    hidden, inter, experts, top_k, act, _ = LAYERS[0]
    weights = tm.prepare_weights(make_layer(hidden, inter, experts, act, torch.device("cpu"), 0))
    x, logits = torch.randn(3, hidden).bfloat16(), torch.randn(3, experts)
    for bad, match in ((dict(top_k=2), "needs its parameter"), (dict(top_k=2, routing_params=[-1.0]), ">= 0"),
                       (dict(top_k=3, routing_params=[0.01]), "picks 2 experts per token")):
        fake_triton.CALLS.clear()
        try:
            tm.fused_moe_triton(x, logits, weights, activation=act, routing="sparsemixer", **bad)
        except MoEConfigError as exc:
            assert match in str(exc), (match, str(exc))
        else:
            raise AssertionError(f"accepted {bad}")
        assert "_route_kernel" not in [c[0] for c in fake_triton.CALLS], bad
print(" ".join(sorted(seen)))
'''


@pytest.mark.parametrize("case", ["plain", "gpt-oss", "phimoe"])
def test_every_launch_binds_to_its_kernel(case):
    script = SCRIPT.replace("ROOT", repr(str(ROOT))).replace("CASE", repr(case))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    launched = set(result.stdout.split())
    assert launched == {"_route_kernel", "_group_kernel", "_rank_kernel", "_starts_kernel", "_scatter_kernel",
                        "_tgemv1_kernel", "_tgemv2_kernel", "act_kernel", "_gemm1_kernel", "_gemm2_kernel",
                        "combine_kernel"}, launched


@pytest.mark.parametrize("method", ["default", "renormalize", "deepseek_v3", "llama4", "sparsemixer"])
def test_route_kernel_compiles_for_sm90_without_a_gpu(method):
    """Where triton is installed, the routing kernel lowers to SM90 machine code for every method (the compiler
    needs no GPU): a Triton error in a method's branch shows here, not first on a GPU."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource / GPUTarget")
    from moe_passes.kernels import triton_route

    k = {"llama4": 1, "sparsemixer": 2}.get(method, 8)
    groups = 4 if method == "deepseek_v3" else 1
    sig = dict(logits_ptr="*fp32", bias_ptr="*fp32", w_ptr="*fp32", ids_ptr="*i64", zero_ptr="*i32", n_zero="i32",
               stride_l="i32", E="i32", param="fp32", K="constexpr", KP="constexpr", METHOD="constexpr",
               NG="constexpr", EG="constexpr", TOPK_GROUP="constexpr", HAS_BIAS="constexpr", PDL="constexpr")
    consts = dict(K=k, KP=triton.next_power_of_2(k), METHOD=triton_route.METHOD_CODES[method], NG=groups,
                  EG=128 // groups, TOPK_GROUP=max(1, groups // 2), HAS_BIAS=method == "deepseek_v3", PDL=False)
    names = list(sig)
    try:
        src = ASTSource(triton_route._route_kernel, sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    except TypeError as exc:  # another triton's ASTSource signature
        pytest.skip(f"this triton's ASTSource takes other arguments: {exc}")
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1))
    assert compiled.asm.get("ptx")
    if method == "sparsemixer":  # the mask's division is IEEE round-to-nearest, as torch's
        assert "div.rn" in compiled.asm["ptx"]
