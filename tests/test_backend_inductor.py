"""The backend on inductor's own pipeline: our passes as its post-grad custom pass, ``mode=`` presets,
inductor options, the FX graph cache, and clear errors for what it cannot take."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from moe_passes import FusedMoE, MoEConfigError
from moe_passes.backend import MoEPostGradPass
from moe_passes.kernels.reference import fused_moe_reference
from moe_passes.ops import FUSED_MOE, KERNEL_OP
from moe_passes.passes import default_pipeline
from moe_passes.testing import unwrap_compile_error

E, H, I = 8, 272, 64


class Block(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate = nn.Linear(H, E, bias=False)
        self.moe = FusedMoE.from_float(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5,
                                       torch.randn(E, H, I, generator=g) / 8, top_k=2, activation="silu",
                                       routing="renormalize", calibration=torch.randn(16, H, generator=g))

    def forward(self, x):
        return self.moe(x, self.gate(x.float())) * 2


def _compile(block, **kwargs):
    torch._dynamo.reset()
    return torch.compile(block, backend="moe_nvfp4", **kwargs)


def _reference(block, x):
    m = block.moe
    return 2 * fused_moe_reference(x, block.gate(x.float()), *m.canonical_weights(), top_k=2, activation="silu",
                                   routing="renormalize", input_global_scale=m.input_global_scale,
                                   intermediate_global_scale=m.intermediate_global_scale).float()


def test_passes_run_inside_inductor_and_leave_no_hook_behind():
    seen = {}

    def probe(gm):
        # runs as part of our post-grad pass: inductor's config holds it only for this compile call
        seen["hook"] = torch._inductor.config.post_grad_custom_post_pass
        seen["targets"] = {n.target for n in gm.graph.nodes if n.op == "call_function"}

    block = Block()
    # a cache hit (an earlier run of this test) would skip the passes, and the probe with them
    compiled = _compile(block, options={"extra_passes": [probe], "fx_graph_cache": False})
    x = torch.randn(11, H).bfloat16()
    with torch.no_grad():
        got = compiled(x).float()
    assert isinstance(seen["hook"], MoEPostGradPass)
    assert KERNEL_OP in seen["targets"] and FUSED_MOE not in seen["targets"]
    assert torch._inductor.config.post_grad_custom_post_pass is None
    torch.testing.assert_close(got, _reference(block, x), atol=2e-2 * got.abs().max().item(), rtol=2 ** -6)


def test_mode_and_inductor_options_reach_inductor():
    seen = []

    def probe(gm):
        seen.append((torch._inductor.config.triton.cudagraphs, torch._inductor.config.epilogue_fusion))

    block = Block(1)
    x = torch.randn(5, H).bfloat16()
    with torch.no_grad():
        expected = block(x)
        # torch.compile refuses mode= together with options=, so the mode can ride in the options
        for kwargs in ({"mode": "reduce-overhead"},
                       {"options": {"mode": "reduce-overhead", "extra_passes": [probe], "epilogue_fusion": False,
                                    "fx_graph_cache": False}}):
            out = _compile(block, **kwargs)(x)  # CUDA graphs skip CPU tensors: the mode still applies
            torch.testing.assert_close(out, expected, atol=2e-2 * expected.abs().max().item(), rtol=2 ** -6)
    assert seen == [(True, False)]


def test_previous_post_grad_pass_still_runs_and_keys_the_cache():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Counting(CustomGraphPass):
        calls = 0

        def __call__(self, graph):
            Counting.calls += 1

        def uuid(self):
            return "counting-v1"

    user_pass = Counting()
    with torch._inductor.config.patch(post_grad_custom_post_pass=user_pass, fx_graph_cache=False), torch.no_grad():
        _compile(Block(2))(torch.randn(3, H).bfloat16())
        assert torch._inductor.config.post_grad_custom_post_pass is user_pass
    assert Counting.calls == 1
    manager = default_pipeline()
    assert MoEPostGradPass(manager, user_pass).uuid() == (manager.uuid(), ("counting-v1",))
    # inductor also takes a list there: each runs first, and each enters the key
    Counting.calls = 0
    with torch._inductor.config.patch(post_grad_custom_post_pass=[user_pass, user_pass], fx_graph_cache=False), \
            torch.no_grad():
        _compile(Block(2))(torch.randn(3, H).bfloat16())
    assert Counting.calls == 2
    assert MoEPostGradPass(manager, [user_pass]).uuid() == (manager.uuid(), ("counting-v1",))

    class Aware(Counting):
        def __call__(self, graph, is_inference):
            pass

    with torch._inductor.config.patch(post_grad_custom_post_pass=Aware(), fx_graph_cache=False), torch.no_grad(), \
            pytest.raises(Exception) as info:
        _compile(Block(2))(torch.randn(3, H).bfloat16())
    assert "takes is_inference" in str(info.value)


def test_extra_passes_from_a_generator_and_one_observer_are_taken():
    seen = []
    compiled = _compile(Block(3), options={"inner": "eager", "extra_passes": (p for p in [lambda gm: seen.append(1)]),
                                           "observers": lambda stage, name, gm: seen.append(stage)})
    with torch.no_grad():
        compiled(torch.randn(4, H).bfloat16())
    assert seen.count(1) == 1 and "before" in seen and "after" in seen


def test_dump_dir_keeps_every_graph_of_a_graph_break(tmp_path):
    """Each compile (here two graphs around a graph break) numbers its dumps on from the directory's."""
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Block(3), Block(4)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(Broken(), backend="moe_nvfp4", options={"inner": "eager", "dump_dir": tmp_path})(
            torch.randn(4, H).bfloat16())
    dumps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("moe_nvfp4_"))
    per_graph = len(dumps) // 2
    assert per_graph >= 2 and len(dumps) == 2 * per_graph and len(set(d[:13] for d in dumps)) == len(dumps), dumps


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "fastest"}, ["unknown mode 'fastest'", "reduce-overhead"]),
    ({"options": {"cudagraph": True}}, ["unknown moe_nvfp4 backend option", "'cudagraph'", "triton.cudagraphs"]),
    ({"options": {"inner": "eager", "mode": "reduce-overhead"}}, ["inner='eager'", "need inner='inductor'"]),
    ({"options": {"post_grad_custom_post_pass": None}}, ["extra_passes"]),
    ({"options": {"post-grad-custom-post-pass": None}}, ["extra_passes"]),  # hyphens name the same option
    ({"options": {"epilogue_fusion": "no"}}, ["inductor options", "epilogue_fusion"]),
    ({"options": {"observers": [1]}}, ["observers must be callables"]),
    ({"options": {"dump_dir": 5}}, ["dump_dir must be a path"]),
])
def test_bad_modes_and_options_are_clear_errors(kwargs, words):
    compiled = _compile(Block(3), **kwargs)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(4, H).bfloat16())
    error = unwrap_compile_error(info.value)
    assert isinstance(error, MoEConfigError), repr(info.value)
    for word in words:
        assert word in str(error)


def test_backward_under_cuda_graph_mode_is_refused_clearly():
    mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU())  # no MoE layer: the mode alone decides
    compiled = _compile(mlp, mode="reduce-overhead")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(4, 16, requires_grad=True))
    error = unwrap_compile_error(info.value)
    assert isinstance(error, MoEConfigError) and "torch.no_grad()" in str(error)


_CACHE_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from moe_passes import FusedMoE
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    gate = nn.Linear(272, 8, bias=False)
    moe = FusedMoE.from_float(torch.randn(8, 128, 272, generator=g), torch.randn(8, 272, 64, generator=g), top_k=2,
                              calibration=torch.randn(16, 272, generator=g))
    f = torch.compile(lambda x: moe(x, gate(x.float())), backend="moe_nvfp4")
    with torch.no_grad():
        f(torch.randn(6, 272).bfloat16())
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    misses = counters["inductor"]["fxgraph_cache_miss"]
    bypass = counters["inductor"]["fxgraph_cache_bypass"]
    print(f"hits={hits} misses={misses} bypass={bypass}")
""")


def test_second_process_hits_the_fx_graph_cache(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], capture_output=True, text=True, env=env,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(result.stdout.strip().splitlines()[-1])
    counts = [dict(item.split("=") for item in run.split()) for run in runs]
    assert counts[0] == {"hits": "0", "misses": "1", "bypass": "0"}, runs
    assert int(counts[1]["hits"]) >= 1 and counts[1]["misses"] == "0" and counts[1]["bypass"] == "0", runs
