"""The custom ops (opcheck) and the clear errors every bad input gets, eagerly and at compile time."""

import re
import warnings

import pytest
import torch
from torch import nn

from moe_passes import FusedMoE, MoEConfigError, MoEShapeError
from moe_passes.kernels import registry
from moe_passes.kernels.reference import REFERENCE
from moe_passes.testing import unwrap_compile_error as unwrap_moe_error

# test_schema runs the op under a mode that multiplies inputs to detect mutation, which CPU float8
# cannot do; the fake, autograd-registration and AOT-dispatch checks all run.
OPCHECK_UTILS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


warnings.filterwarnings("ignore", category=UserWarning)

E, H, I = 4, 272, 32  # 272 pads to 512 for the TRTLLM alignment


def _layer(hidden=H, activation="silu", **kw):
    g = torch.Generator().manual_seed(hidden)
    rows = I if activation == "relu2" else 2 * I
    return FusedMoE.from_float(torch.randn(E, rows, hidden, generator=g) / 10,
                               torch.randn(E, hidden, I, generator=g) / 10, top_k=2, activation=activation, **kw)


def _inputs(tokens=5, hidden=H, experts=E):
    return torch.randn(tokens, hidden).bfloat16() / 10, torch.randn(tokens, experts)


def _op_args(moe, x, logits):
    return (x, logits, *moe.kernel_weights(), moe.input_global_scale, moe.intermediate_global_scale, moe.routing_bias)


def _fused_args(moe, x, logits):
    return _op_args(moe, x, logits) + (moe.hidden_size, moe.top_k, moe.activation, moe.routing, moe.n_group,
                                        moe.topk_group, moe.routed_scaling_factor, moe.kernel, "layer0")


def _kernel_args(moe, x_padded, logits):
    return _op_args(moe, x_padded, logits) + (moe.top_k, moe.activation, moe.routing, moe.n_group, moe.topk_group,
                                              moe.routed_scaling_factor, moe.kernel, "layer0")


def test_opcheck_fused_moe():
    moe = _layer()
    x, logits = _inputs()
    torch.library.opcheck(torch.ops.moe_nvfp4.fused_moe.default, _fused_args(moe, x, logits), test_utils=OPCHECK_UTILS)


def test_opcheck_kernel_op():
    moe = _layer(routing="deepseek_v3", routing_bias=torch.randn(E), n_group=2, topk_group=1,
                 routed_scaling_factor=2.5)
    x, logits = _inputs()
    x_p = torch.nn.functional.pad(x, (0, 512 - H))
    torch.library.opcheck(torch.ops.moe_nvfp4.trtllm_nvfp4_moe.default, _kernel_args(moe, x_p, logits),
                          test_utils=OPCHECK_UTILS)
    out = torch.ops.moe_nvfp4.trtllm_nvfp4_moe(*_kernel_args(moe, x_p, logits))
    assert out.shape == (5, 512)
    # the FusedMoE op is exactly pad -> kernel -> slice
    assert torch.equal(torch.ops.moe_nvfp4.fused_moe(*_fused_args(moe, x, logits)), out[:, :H])


def test_eager_call_with_inputs_needing_grad_refuses_backward_clearly():
    # The ops have no backward: the output still requires grad (so no gradient goes silently missing) and
    # backward raises our error; the forward value is the same as without grad.
    moe = _layer()
    x, logits = _inputs()
    x.requires_grad_(True)
    out = moe(x, logits)
    assert out.requires_grad
    with torch.no_grad():
        assert torch.equal(out, moe(x, logits))
    with pytest.raises(MoEConfigError, match=r"fused_moe has no backward.*torch.no_grad\(\)"):
        out.float().sum().backward()


# ------------------------------------------------------------------------------------ bad inputs
class Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x, logits):
        return self.moe(x, logits)


def _both_ways(moe, x, logits, exc_type, match):
    """The same clear error eagerly and through torch.compile (before anything runs)."""
    with pytest.raises(exc_type, match=match):
        moe(x, logits)
    torch._dynamo.reset()
    compiled = torch.compile(Block(moe), backend="moe_nvfp4", options={"inner": "eager"})
    with pytest.raises(Exception) as info:
        compiled(x, logits)
    inner = unwrap_moe_error(info.value)
    assert isinstance(inner, exc_type), repr(info.value)
    assert re.search(match, str(inner)), str(inner)


def test_router_logits_with_wrong_expert_count():
    moe = _layer()
    x, _ = _inputs()
    _both_ways(moe, x, torch.randn(5, E + 1), MoEShapeError, r"score 5 experts but the weights hold 4")


def test_hidden_states_wider_than_weights():
    moe = _layer()
    _both_ways(moe, *_inputs(hidden=600), MoEShapeError, r"600 wide, wider than the weights' 512")


def test_hidden_states_narrower_than_layer():
    moe = _layer()
    _both_ways(moe, *_inputs(hidden=256), MoEShapeError, r"256 wide but the layer's hidden size is 272")


def test_unsupported_dtype():
    moe = _layer()
    x, logits = _inputs()
    _both_ways(moe, x.float(), logits, MoEConfigError, r"must be bfloat16")
    _both_ways(moe, x, logits.to(torch.int32), MoEConfigError, r"router_logits must be a 2-D float32")


def test_a_passed_check_never_lets_a_different_bad_call_through(monkeypatch):
    # Eager calls remember the calls that passed their checks (ops._checked_call); a later call that differs in
    # any checked property (a shape, a dtype, an argument) must still be checked, and fail as a first call would.
    from moe_passes import ops

    moe = _layer()
    x, logits = _inputs()
    args = _kernel_args(moe, torch.nn.functional.pad(x, (0, 512 - H)), logits)
    good = torch.ops.moe_nvfp4.trtllm_nvfp4_moe(*args)
    assert any("layer0" in k for k in ops._CHECKED), "the passing call was not remembered"
    bad_calls = {
        r"must be bfloat16": (args[0].float(),) + args[1:],
        r"score 5 experts": args[:1] + (torch.randn(5, E + 1),) + args[2:],
        r"w13 must be a 3-D torch.uint8": args[:2] + (args[2].view(torch.int8),) + args[3:],
        r"top_k=5 must be between 1": args[:11] + (5,) + args[12:],
        r"input_global_scale must be a float32": args[:8] + (args[8].double(),) + args[9:],
    }
    for match, bad in bad_calls.items():
        with pytest.raises((MoEConfigError, MoEShapeError), match=match):
            torch.ops.moe_nvfp4.trtllm_nvfp4_moe(*bad)
    # and the remembered call still runs, with the same result
    assert torch.equal(torch.ops.moe_nvfp4.trtllm_nvfp4_moe(*args), good)
    # a kernel spec swapped under the same name is checked again (its capabilities are part of the check)
    import dataclasses

    spec = registry.get(moe.kernel)
    monkeypatch.setitem(registry._REGISTRY, moe.kernel, dataclasses.replace(spec, activations=frozenset({"relu2"})))
    with pytest.raises(MoEConfigError, match=r"does not support activation 'silu'"):
        torch.ops.moe_nvfp4.trtllm_nvfp4_moe(*args)


def test_padded_size_breaking_kernel_alignment():
    moe = _layer()
    x, logits = _inputs()
    w = moe.kernel_weights()
    # weights padded to 400 (not a multiple of 256): what a wrong preparation would hand the kernel
    bad = registry.MoEWeights(w.w13[..., :200], w.w13_scale[..., :25], w.w13_global_scale, w.w2[:, :400],
                              w.w2_scale[:, :400], w.w2_global_scale)
    args = (torch.nn.functional.pad(x, (0, 400 - H)), logits, *bad, moe.input_global_scale,
            moe.intermediate_global_scale, None, 2, "silu", "renormalize", None, None, None, "reference", "layer0")
    with pytest.raises(MoEShapeError, match=r"padded hidden size 400 breaks kernel 'reference'.s alignment of 256"):
        torch.ops.moe_nvfp4.trtllm_nvfp4_moe(*args)


def test_activation_the_kernel_does_not_support(monkeypatch):
    limited = registry.KernelSpec(
        name="test_no_gelu_tanh", description="test kernel without tanh GeGLU", alignment=REFERENCE.alignment,
        activations=frozenset({"silu", "gelu", "relu2"}), routings=REFERENCE.routings, available=lambda d: True,
        prepare=REFERENCE.prepare, run=REFERENCE.run, unsupported_reasons={"gelu_tanh": "only erf GELU"})
    monkeypatch.setitem(registry._REGISTRY, limited.name, limited)
    with pytest.raises(MoEConfigError, match=r"does not support activation 'gelu_tanh' \(only erf GELU\)"):
        _layer(activation="gelu_tanh", kernel="test_no_gelu_tanh")
    # a layer built for another kernel and then pointed at this one fails at compile time
    moe = _layer(activation="gelu_tanh")
    moe.kernel = "test_no_gelu_tanh"
    _both_ways(moe, *_inputs(), MoEConfigError, r"does not support activation 'gelu_tanh'")


def test_top_k_larger_than_experts_and_bad_configs():
    g = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    with pytest.raises(MoEConfigError, match=r"top_k=5 exceeds the number of experts \(4\)"):
        FusedMoE.from_float(*g, top_k=5)
    with pytest.raises(MoEConfigError, match="unknown activation"):
        FusedMoE.from_float(*g, top_k=2, activation="swish")
    with pytest.raises(MoEConfigError, match="unknown routing"):
        FusedMoE.from_float(*g, top_k=2, routing="sinkhorn")
    with pytest.raises(MoEConfigError, match="do not form an MoE layer"):
        FusedMoE.from_float(g[0], torch.randn(E, H, I + 1), top_k=2)
    with pytest.raises(MoEConfigError, match="llama4 routing picks one expert"):
        FusedMoE.from_float(*g, top_k=2, routing="llama4")
    with pytest.raises(MoEConfigError, match="unknown kernel 'cutlass'"):
        FusedMoE.from_float(*g, top_k=2, kernel="cutlass")
    with pytest.raises(MoEConfigError, match=r"calibration must be float hidden states \[N, 272\]"):
        FusedMoE.from_float(*g, top_k=2, calibration=torch.randn(4, 100))
    bad_calibration = torch.randn(4, H)
    bad_calibration[1, 3] = float(torch.tensor(float("inf") if torch.rand(()) < 0.5 else float("nan")))
    with pytest.raises(MoEConfigError, match="calibration contains NaN or infinite"):
        FusedMoE.from_float(*g, top_k=2, calibration=bad_calibration)
    with pytest.raises(MoEConfigError, match="float16/bfloat16/float32"):
        FusedMoE.from_float(g[0].to(torch.float8_e4m3fn), g[1], top_k=2)
    # deepseek_v3's groups: checked when the layer is built, not at its first call
    with pytest.raises(MoEConfigError, match="top_k=3 is more than the 2 experts"):
        FusedMoE.from_float(*g, top_k=3, routing="deepseek_v3", n_group=2, topk_group=1)
    with pytest.raises(MoEConfigError, match="n_group must be a positive int"):
        FusedMoE.from_float(*g, top_k=2, routing="deepseek_v3", n_group=0)
    with pytest.raises(MoEConfigError, match="topk_group=3 must be between 1 and n_group=2"):
        FusedMoE.from_float(*g, top_k=2, routing="deepseek_v3", n_group=2, topk_group=3)
    with pytest.raises(MoEConfigError, match="routed_scaling_factor must be a finite positive"):
        FusedMoE.from_float(*g, top_k=2, routing="deepseek_v3", routed_scaling_factor=float("nan"))
    with pytest.raises(MoEConfigError, match="routing_bias contains NaN"):
        FusedMoE.from_float(*g, top_k=2, routing="deepseek_v3", routing_bias=torch.tensor([0.0, float("nan"), 0, 0]))
    for scale in (0.0, -1.0, float("inf"), torch.ones(2)):
        with pytest.raises(MoEConfigError, match="input_global_scale must be one finite positive number"):
            FusedMoE(FusedMoE.from_float(*g, top_k=2).canonical_weights(), hidden_size=H, intermediate_size=I,
                     top_k=2, input_global_scale=scale)


def test_unknown_backend_option():
    torch._dynamo.reset()
    compiled = torch.compile(Block(_layer()), backend="moe_nvfp4", options={"inner": "tvm"})
    with pytest.raises(Exception) as info:
        compiled(*_inputs())
    assert isinstance(unwrap_moe_error(info.value), MoEConfigError)
    assert "inner='tvm'" in str(info.value)


def test_sparsemixer_layer_errors_and_op_parameter():
    """PhiMoE's routing: the layer needs its jitter_eps and top_k 2; the ops carry jitter_eps as
    ``routing_params`` (only where the layer has one), check it eagerly and in the fake, and route with it."""
    from moe_passes.kernels.reference import fused_moe_reference

    with pytest.raises(MoEConfigError, match=r"sparsemixer routing needs its parameter \[jitter_eps\]"):
        _layer(routing="sparsemixer")
    for bad, match in (([-1.0], ">= 0"), ([float("nan")], "finite"), ([0.1, 0.2], r"\[jitter_eps\]")):
        with pytest.raises(MoEConfigError, match=match):
            _layer(routing="sparsemixer", routing_params=bad)
    with pytest.raises(MoEConfigError, match="picks 2 experts per token, got top_k=3"):
        g = torch.Generator().manual_seed(0)
        FusedMoE.from_float(torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g), top_k=3,
                            routing="sparsemixer", routing_params=[0.01])
    with pytest.raises(MoEConfigError, match="takes no parameters"):
        _layer(routing="renormalize", routing_params=[0.01])
    moe = _layer(routing="sparsemixer", routing_params=[0.2])
    assert moe.routing_params == [0.2] and "routing_params=[0.2]" in repr(moe)
    assert _layer()._bias_args() == {} and moe._bias_args() == {"routing_params": [0.2]}
    # 64 tokens: with 5 tokens the jitter eps changed no choice on 2 of 40 draws, and the check below failed
    x, logits = _inputs(tokens=64)
    want = fused_moe_reference(x, logits, *moe.canonical_weights(), top_k=2, routing="sparsemixer",
                               routing_params=[0.2], input_global_scale=moe.input_global_scale,
                               intermediate_global_scale=moe.intermediate_global_scale)
    # the layer's weights are padded to 512 (the reference's are not): the same up to summation order
    close = dict(atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(moe(x, logits), want, **close)
    other = fused_moe_reference(x, logits, *moe.canonical_weights(), top_k=2, routing="sparsemixer",
                                routing_params=[0.0], input_global_scale=moe.input_global_scale,
                                intermediate_global_scale=moe.intermediate_global_scale)
    # the parameter matters on these inputs (at least 0.2 relative on each of 200 draws)
    assert ((want.float() - other.float()).norm() / want.float().norm()).item() > 0.1
    args = _fused_args(moe, x, logits)
    with pytest.raises(MoEConfigError, match="needs its parameter"):
        torch.ops.moe_nvfp4.fused_moe(*args)
    with pytest.raises(MoEConfigError, match="finite"):
        torch.ops.moe_nvfp4.fused_moe(*args, routing_params=[float("inf")])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(MoEConfigError, match="needs its parameter"):
            torch.ops.moe_nvfp4.fused_moe(*args)
    torch.testing.assert_close(torch.ops.moe_nvfp4.fused_moe(*args, routing_params=[0.2]), want, **close)


def test_bad_parallel_settings_are_config_errors():
    """A parallel= that is no ExpertParallel / TensorParallel (a string, a flag), on the layer or the backend, and a
    rank outside its group (get_rank's -1 for a non-member) are MoEConfigErrors, not AttributeErrors later."""
    from moe_passes.parallel import expert_block, intermediate_block

    g = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    with pytest.raises(MoEConfigError, match="parallel must be an ExpertParallel or TensorParallel"):
        FusedMoE.from_float(*g, top_k=2, parallel="ep")
    for rank in (-1, 2, 5):
        with pytest.raises(MoEConfigError, match=f"rank {rank} is not one of the 2 ranks"):
            expert_block(E, 2, rank)
        with pytest.raises(MoEConfigError, match=f"rank {rank} is not one of the 2 ranks"):
            intermediate_block(64, 2, rank)
    torch._dynamo.reset()
    compiled = torch.compile(Block(_layer()), backend="moe_nvfp4", options={"inner": "eager", "parallel": "ep"})
    with pytest.raises(Exception) as info:
        compiled(*_inputs())
    assert isinstance(unwrap_moe_error(info.value), MoEConfigError) and "options['parallel']" in str(info.value)


def test_the_layer_owns_copies_of_its_state_and_reprepares_where_it_is_loaded(tmp_path):
    """Biases and scales are copies (a caller's later in-place change, a Parameter or a graph-attached scale must
    not reach the layer); a layer unpickled where another kernel is chosen (torch.load(map_location=...)) prepares
    its kernel copy again; a name that is no str is refused when the layer is built."""
    import copy

    g = torch.Generator().manual_seed(7)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / 8, torch.randn(E, H, I, generator=g) / 8
    bias = torch.nn.Parameter(torch.randn(E, generator=g))
    b2 = torch.randn(E, H, generator=g)
    moe = FusedMoE.from_float(w13, w2, top_k=2, routing="deepseek_v3", routing_bias=bias, w2_bias=b2)
    x, logits = torch.randn(5, H, generator=g).bfloat16(), torch.randn(5, E, generator=g)
    before = moe(x, logits)
    with torch.no_grad():
        bias.mul_(-100)
        b2.zero_()
    assert torch.equal(moe(x, logits), before)
    assert not moe.routing_bias.requires_grad and type(moe.routing_bias) is torch.Tensor
    scale = torch.tensor(300.0, requires_grad=True) * 1.0
    layer = FusedMoE(moe.canonical_weights(), hidden_size=H, intermediate_size=I, top_k=2, input_global_scale=scale)
    assert copy.deepcopy(layer).input_global_scale.grad_fn is None
    moe.kernel = "trtllm"  # as if saved where another kernel ran: its copy is prepared again on load
    torch.save(moe, tmp_path / "moe.pt")
    loaded = torch.load(tmp_path / "moe.pt", weights_only=False)
    assert loaded.kernel == "reference" and torch.equal(loaded(x, logits), before)
    with pytest.raises(MoEConfigError, match="name must be a str"):
        FusedMoE.from_float(w13, w2, top_k=2, name=3)
