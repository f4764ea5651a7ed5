"""``moe_passes.compile`` across token counts, from the MoE op's fake up to ``generate`` on converted
transformers models.

The MoE ops must add no guard on the token count (not even when a first call has as many tokens as
there are experts), so that a converted model gets the graphs Dynamo gives any model: one dynamic graph
for every token count from 2 up, one for a single token, and under ``generate`` with a KV cache the
prefill / decode graphs transformers' cache calls for; a second prompt of another length compiles
nothing new.  Every compiled output is checked against the eager converted model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import moe_passes
from moe_passes import FusedMoE
from moe_passes.errors import MoEConfigError
from moe_passes.ops import KERNEL_OP

VOCAB = 128


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Past the recompile limit Dynamo would quietly run eager and hide a recompile storm.
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            yield
    torch._dynamo.reset()


def test_moe_ops_add_no_guard_on_the_token_count():
    """Both fake functions, token count symbolic and equal to the expert count on this trace."""
    experts, hidden = 8, 272
    g = torch.Generator().manual_seed(11)
    moe = FusedMoE.from_float(torch.randn(experts, 64, hidden, generator=g), torch.randn(experts, hidden, 32, generator=g),
                              top_k=2, activation="silu", routing="renormalize",
                              calibration=torch.randn(16, hidden, generator=g))
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    tokens_dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DUCK, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(experts, hidden).bfloat16(), source=ConstantSource("x"),
                         symbolic_context=tokens_dynamic)
    logits = mode.from_tensor(torch.randn(experts, experts), source=ConstantSource("logits"),
                              symbolic_context=tokens_dynamic)
    tokens = x.shape[0]
    assert isinstance(tokens, torch.SymInt) and logits.shape[0].node.expr == tokens.node.expr
    state = [None if t is None else mode.from_tensor(t, static_shapes=True)
             for t in (*moe.kernel_weights(), moe.input_global_scale, moe.intermediate_global_scale, moe.routing_bias)]
    args = (moe.top_k, moe.activation, moe.routing, None, None, None, moe.kernel, "layer")
    padded_width = moe.kernel_shape.hidden_padded
    with mode, enable_python_dispatcher():
        out = torch.ops.moe_nvfp4.fused_moe(x, logits, *state, hidden, *args)
        padded = torch.nn.functional.pad(x, (0, padded_width - hidden))
        out_padded = torch.ops.moe_nvfp4.trtllm_nvfp4_moe(padded, logits, *state, *args)
    assert env.guards == [] and env.replacements == {}, (env.guards, env.replacements)
    assert out.shape == (tokens, hidden) and out_padded.shape == (tokens, padded_width)
    assert isinstance(out.shape[0], torch.SymInt) and isinstance(out_padded.shape[0], torch.SymInt)


def _graph_counter():
    graphs = []

    def count(gm):
        graphs.append(sum(1 for n in gm.graph.nodes if n.target is KERNEL_OP))

    return graphs, count


def test_compile_takes_mode_with_backend_options():
    """torch.compile refuses mode= beside options=; moe_passes.compile binds its options to the backend."""
    g = torch.Generator().manual_seed(12)
    moe = FusedMoE.from_float(torch.randn(8, 64, 256, generator=g), torch.randn(8, 256, 32, generator=g), top_k=2,
                              activation="silu", calibration=torch.randn(16, 256, generator=g))
    graphs, count = _graph_counter()
    compiled = moe_passes.compile(moe, inner="eager", extra_passes=[count], mode="default", fullgraph=True)
    with pytest.raises(MoEConfigError, match="disagree"):  # mode= and options' mode: one of them, not both
        moe_passes.compile(moe, mode="reduce-overhead", options={"mode": "max-autotune"})
    x, logits = torch.randn(6, 256, generator=g).bfloat16(), torch.randn(6, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(compiled(x, logits), moe(x, logits))
    assert graphs == [1]


# -- converted transformers models ---------------------------------------------------------------------
def _converted_qwen3_moe(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    from moe_passes.integrations.transformers import convert

    config = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    report = convert(model, calibration=torch.randint(0, VOCAB, (2, 16), generator=gen))
    assert len(report.converted) == 2 and not report.skipped
    return model


def test_converted_model_forward_across_token_counts():
    """Issue 25: 8, then 1, then 5 tokens used to fail inside attention (TorchRuntimeError in SDPA)."""
    model = _converted_qwen3_moe()
    graphs, count = _graph_counter()
    compiled = moe_passes.compile(model, inner="eager", extra_passes=[count])
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tokens in (8, 1, 5, 12):
            ids = torch.randint(0, VOCAB, (1, tokens), generator=gen)
            got, want = compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # 8, 5 and 12 tokens share the dynamic graph; one token has its own; both hold both MoE layers.
    assert graphs == [2, 2]


def _generate_logits(model, prompt, use_cache):
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_generate_keeps_a_stable_set_of_graphs(use_cache):
    model = _converted_qwen3_moe(seed=1)
    eager = copy.deepcopy(model)
    graphs, count = _graph_counter()
    # generate calls the module, so the forward is what gets compiled (as the docs say).
    model.forward = moe_passes.compile(model.forward, inner="eager", extra_passes=[count])
    gen = torch.Generator().manual_seed(3)
    after_prompt = []
    with torch.no_grad():
        for length in (8, 5):
            prompt = torch.randint(1, VOCAB, (1, length), generator=gen)
            tokens, logits = _generate_logits(model, prompt, use_cache)
            want_tokens, want_logits = _generate_logits(eager, prompt, use_cache)
            torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(tokens, want_tokens)
            after_prompt.append(len(graphs))
    assert all(n == 2 for n in graphs), graphs
    # The second prompt, of another length, compiles nothing new.
    assert after_prompt[1] == after_prompt[0], after_prompt
    if use_cache:
        # prefill, the first decode step (the cache holds the prefill's strided keys), later decode steps
        assert after_prompt[0] <= 3, after_prompt
    else:
        # every call has 5 to 11 tokens: one dynamic graph
        assert after_prompt[0] == 1, after_prompt


def test_readme_usage_with_inductor_through_generate():
    """The headline, default inner compiler included: moe_passes.compile(model) on a converted model."""
    model = _converted_qwen3_moe(seed=2)
    eager = copy.deepcopy(model)
    graphs, count = _graph_counter()
    # a cache hit from an earlier run would skip the passes, and the count with them
    model.forward = moe_passes.compile(model.forward, extra_passes=[count], options={"fx_graph_cache": False})
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for length in (6, 9):
            prompt = torch.randint(1, VOCAB, (1, length), generator=gen)
            tokens, logits = _generate_logits(model, prompt, True)
            want_tokens, want_logits = _generate_logits(eager, prompt, True)
            # inductor reorders fp32 sums: logits agree to rounding; greedy tokens then agree unless tied
            torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
            assert torch.equal(tokens, want_tokens)
    assert 1 <= len(graphs) <= 3 and all(n == 2 for n in graphs), graphs
