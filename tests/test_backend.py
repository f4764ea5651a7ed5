"""The moe_nvfp4 backend end to end: discovery, inner compilers, numerics, dynamic token counts, options."""

import importlib.metadata
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from moe_passes import FusedMoE
from moe_passes.kernels import registry
from moe_passes.kernels.reference import fused_moe_reference
from moe_passes.ops import KERNEL_OP

warnings.filterwarnings("ignore", category=UserWarning)

E, I = 8, 64


class SharedMLP(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.up = nn.Linear(hidden, 96, bias=False)
        self.down = nn.Linear(96, hidden, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


class Block(nn.Module):
    """A user's MoE block: router in fp32, FusedMoE with a shared expert."""

    def __init__(self, hidden, activation="relu2", routing="deepseek_v3", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        rows = I if activation == "relu2" else 2 * I
        self.gate = nn.Linear(hidden, E, bias=False)
        shared = SharedMLP(hidden).to(torch.bfloat16)
        self.moe = FusedMoE.from_float(
            torch.randn(E, rows, hidden, generator=g) / hidden ** 0.5, torch.randn(E, hidden, I, generator=g) / 8,
            top_k=2, activation=activation, routing=routing, shared_expert=shared,
            routing_bias=torch.randn(E, generator=g) * 0.1 if routing == "deepseek_v3" else None,
            n_group=2 if routing == "deepseek_v3" else None, topk_group=1 if routing == "deepseek_v3" else None,
            routed_scaling_factor=2.5 if routing == "deepseek_v3" else None,
            calibration=torch.randn(32, hidden, generator=g))

    def forward(self, x):
        return self.moe(x, self.gate(x.float()))


def _reference_block(block, x):
    m = block.moe
    routed = fused_moe_reference(x, block.gate(x.float()), *m.canonical_weights(), top_k=m.top_k,
                                 activation=m.activation, routing=m.routing, input_global_scale=m.input_global_scale,
                                 intermediate_global_scale=m.intermediate_global_scale, routing_bias=m.routing_bias,
                                 n_group=m.n_group, topk_group=m.topk_group,
                                 routed_scaling_factor=m.routed_scaling_factor)
    return routed.float() + m.shared_expert(x).float()


class CompileCounter:
    """Observer counting how often the backend's passes ran (one per compiled graph)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, stage, name, gm):
        if stage == "after" and name == "verify_moe_shapes":
            self.graphs.append(gm)


def test_backend_found_by_entry_point_without_import():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert names.get("moe_nvfp4") == "moe_passes.backend:moe_nvfp4_backend"
    code = ("import torch; f = torch.compile(lambda x: x * 2, backend='moe_nvfp4'); "
            "print(float(f(torch.ones(3)).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("6.0")


@pytest.mark.parametrize("inner", ["eager", "inductor"])
@pytest.mark.parametrize("hidden", [2688, 2048])
def test_compiled_matches_eager_and_reference(inner, hidden):
    torch._dynamo.reset()
    block = Block(hidden, seed=hidden)
    counter = CompileCounter()
    compiled = torch.compile(block, backend="moe_nvfp4", dynamic=True,
                             options={"inner": inner, "observers": [counter]})
    x = (torch.randn(24, hidden) * 0.5).bfloat16()
    with torch.no_grad():
        got, eager, ref = compiled(x).float(), block(x).float(), _reference_block(block, x)
    assert len(counter.graphs) == 1
    kernels = [n for n in counter.graphs[0].graph.nodes if n.target is KERNEL_OP]
    assert len(kernels) == 1 and kernels[0].meta["val"].shape[-1] == (2816 if hidden == 2688 else 2048)
    scale = eager.abs().max()
    assert scale > 0.1
    if inner == "eager":
        assert torch.equal(got, eager)  # same ops, same order
    else:
        # inductor reassociates the bf16 shared-expert GEMMs and the add: a few bf16 ulps at the output
        torch.testing.assert_close(got, eager, atol=4 * 2 ** -8 * scale.item(), rtol=2 ** -6)
    torch.testing.assert_close(got, ref, atol=4 * 2 ** -8 * scale.item(), rtol=2 ** -6)


def test_one_compile_serves_every_token_count():
    """dynamic=True and Dynamo's own shape rules: one graph for every count from 2 up (the first call has as
    many tokens as experts, which ties nothing), and one more for a single token."""
    torch._dynamo.reset()
    block = Block(2688, activation="silu", routing="renormalize")
    counter = CompileCounter()
    compiled = torch.compile(block, backend="moe_nvfp4", dynamic=True,
                             options={"inner": "eager", "observers": [counter]})
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for tokens in (E, 7, 64, 300, 2):
            x = torch.randn(tokens, 2688).bfloat16()
            assert torch.equal(compiled(x), block(x))
        assert len(counter.graphs) == 1
        x = torch.randn(1, 2688).bfloat16()
        assert torch.equal(compiled(x), block(x))
    assert len(counter.graphs) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before == 2
    placeholder_vals = [n.meta["val"] for n in counter.graphs[0].graph.find_nodes(op="placeholder")]
    assert any(isinstance(v.shape[0], torch.SymInt) for v in placeholder_vals if isinstance(v, torch.Tensor))


def test_every_activation_and_routing_compiles():
    for activation, routing in [("silu", "default"), ("gelu", "renormalize"), ("gelu_tanh", "deepseek_v3"),
                                ("relu2", "renormalize")]:
        torch._dynamo.reset()
        block = Block(272, activation=activation, routing=routing, seed=len(activation))
        compiled = torch.compile(block, backend="moe_nvfp4", options={"inner": "eager"})
        x = torch.randn(9, 272).bfloat16()
        with torch.no_grad():
            assert torch.equal(compiled(x), block(x)), (activation, routing)


def test_graph_needing_grad_is_refused_clearly():
    """Router and shared-expert parameters require grad by default; the MoE ops have no backward."""
    from moe_passes import MoEConfigError
    from moe_passes.testing import unwrap_compile_error

    torch._dynamo.reset()
    block = Block(272)
    compiled = torch.compile(block, backend="moe_nvfp4", options={"inner": "eager"})
    x = torch.randn(5, 272).bfloat16()
    with pytest.raises(Exception) as info:
        compiled(x)
    assert isinstance(unwrap_compile_error(info.value), MoEConfigError)
    assert "torch.no_grad()" in str(info.value)
    with torch.inference_mode():
        assert torch.equal(compiled(x), block(x))


def test_dump_dir_and_graph_logging(tmp_path, caplog):
    torch._dynamo.reset()
    block = Block(2688)
    compiled = torch.compile(block, backend="moe_nvfp4", options={"inner": "eager", "dump_dir": str(tmp_path)})
    with torch.no_grad():
        compiled(torch.randn(3, 2688).bfloat16())
    dumped = sorted(p.name for p in tmp_path.iterdir())
    ours = [name for name in dumped if name.startswith("moe_nvfp4_")]
    assert any("after_lower_fused_moe" in n for n in ours) and any("after_verify_moe_shapes" in n for n in ours)
    after = next(tmp_path.glob("*after_lower_fused_moe.py")).read_text()
    assert "constant_pad_nd" in after and "trtllm_nvfp4_moe" in after and "slice" in after
    before = next(tmp_path.glob("*before_lower_fused_moe.py")).read_text()
    assert "fused_moe" in before and "trtllm_nvfp4_moe" not in before
    assert len(dumped) > len(ours), "depyf wrote its own dumps beside ours"


def test_extra_passes_run_between_lowering_and_verification():
    torch._dynamo.reset()
    seen = []

    def my_pass(gm):
        seen.append(sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"}))

    compiled = torch.compile(Block(2688), backend="moe_nvfp4", options={"inner": "eager", "extra_passes": [my_pass]})
    with torch.no_grad():
        compiled(torch.randn(3, 2688).bfloat16())
    assert len(seen) == 1
    assert "moe_nvfp4.trtllm_nvfp4_moe.default" in seen[0] and "moe_nvfp4.fused_moe.default" not in seen[0]


def test_weights_prepared_once_not_per_call(monkeypatch):
    from moe_passes.kernels import registry
    from moe_passes.kernels.reference import REFERENCE

    prepared = []

    def counting_prepare(weights, shape):
        prepared.append(shape)
        return REFERENCE.prepare(weights, shape)

    spec = registry.KernelSpec(name="test_counting", description="reference with a counting prepare",
                               alignment=REFERENCE.alignment, activations=REFERENCE.activations,
                               routings=REFERENCE.routings, available=lambda d: True, prepare=counting_prepare,
                               run=REFERENCE.run)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    g = torch.Generator().manual_seed(0)
    moe = FusedMoE.from_float(torch.randn(E, I, 272, generator=g), torch.randn(E, 272, I, generator=g), top_k=2,
                              activation="relu2", kernel="test_counting")
    assert len(prepared) == 1 and prepared[0].hidden_padded == 512
    torch._dynamo.reset()
    compiled = torch.compile(moe, backend="moe_nvfp4", options={"inner": "eager"})
    with torch.no_grad():
        for tokens in (3, 5, 8):
            x, logits = torch.randn(tokens, 272).bfloat16(), torch.randn(tokens, E)
            assert torch.equal(compiled(x, logits), moe(x, logits))
    moe.to("cpu")  # same device: nothing to redo
    assert len(prepared) == 1


def test_moe_passes_compile_one_graph_even_when_tokens_equal_experts():
    """moe_passes.compile: tokens == experts on the first call, then other counts, on one graph (plus 1 token)."""
    import moe_passes

    block = Block(272, activation="silu", routing="renormalize")
    counter = CompileCounter()
    torch._dynamo.reset()
    run = moe_passes.compile(block, inner="eager", options={"observers": [counter]})
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for tokens in (E, 5, 300, 1, 3):
            x = torch.randn(tokens, 272).bfloat16()
            assert torch.equal(run(x), block(x))
    assert len(counter.graphs) == 2


def test_model_to_bfloat16_keeps_the_nvfp4_state():
    """model.to(torch.bfloat16) casts the router and shared expert, never the quantized state."""
    block = Block(272)
    x = torch.randn(6, 272).bfloat16()
    logits = torch.randn(6, E)
    with torch.no_grad():
        before = block.moe(x, logits)
        state = {k: v.clone() for k, v in block.moe.state_dict().items()}
        block.to(torch.bfloat16)
        assert block.gate.weight.dtype == torch.bfloat16
        for name, value in block.moe.state_dict().items():
            if not name.startswith("shared_expert"):
                assert value.dtype == state[name].dtype, name
                assert torch.equal(value.reshape(-1).view(torch.uint8), state[name].reshape(-1).view(torch.uint8)), name
        assert torch.equal(block.moe(x, logits), before)


def test_state_dict_round_trip_reprepares_the_kernel_copy():
    """Loading new canonical weights must reach the kernel's (padded) copy, not leave it stale."""
    a, b = Block(272, seed=1), Block(272, seed=2)
    x, logits = torch.randn(5, 272).bfloat16(), torch.randn(5, E)
    with torch.no_grad():
        want = b.moe(x, logits)
        assert not torch.equal(a.moe(x, logits), want)
        a.moe.load_state_dict(b.moe.state_dict())
        assert torch.equal(a.moe(x, logits), want)
    assert a.moe.kernel_weights().w13.shape[-1] * 2 == 512  # the padded copy was rebuilt, not aliased


def test_canonical_weights_are_the_unpadded_state_not_the_kernel_copy():
    """The reference must be fed canonical weights: the kernel copy is padded (and, on the Triton path,
    re-laid out), so ``canonical_weights`` hands back the layer's NVFP4 state itself, on the kernel's device."""
    block = Block(hidden=2688)
    m = block.moe
    canonical, kernel = m.canonical_weights(), m.kernel_weights()
    assert canonical.w13.shape[-1] * 2 == 2688 and kernel.w13.shape[-1] * 2 == 2816  # reference kernel: 256
    for name in registry.MoEWeights._fields:
        a, b = getattr(canonical, name), getattr(m, name)
        if a.dtype == torch.float8_e4m3fn:  # no CPU equality for float8: compare the bytes
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), name
        assert getattr(canonical, name).device == getattr(kernel, name).device
