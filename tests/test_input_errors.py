"""Bad input gets the project's own error under torch.compile as in eager, and nothing goes silently wrong:
devices, NaN/inf, activations beyond the calibrated range."""

import uuid
import warnings

import pytest
import torch
from torch import nn

from moe_passes import FusedMoE, MoEConfigError, MoEError, MoEShapeError
from moe_passes.errors import MoENonFiniteError, MoERangeWarning
from moe_passes.kernels import registry
from moe_passes.kernels.reference import REFERENCE

E, H, I = 4, 272, 32  # 272 pads to 512 for the TRTLLM alignment


def _layer(name=None, calibration=None, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # uncalibrated / padding notices
        return FusedMoE.from_float(torch.randn(E, 2 * I, H, generator=g) / 10, torch.randn(E, H, I, generator=g) / 10,
                                   top_k=2, name=name or f"model.layers.{seed}.mlp", calibration=calibration, **kw)


class Block(nn.Module):
    """A decoder's MoE block: a router, then the layer.  ``width`` is what the block was built for."""

    def __init__(self, moe, width=H, experts=E):
        super().__init__()
        self.gate = nn.Linear(width, experts, bias=False)
        self.moe = moe

    def forward(self, x, logits=None):
        return self.moe(x, self.gate(x.float()) if logits is None else logits)


def _bad_call(case, moe, g):
    """A model and inputs with one mistake; the expected error type and message."""
    x = torch.randn(5, H, generator=g).bfloat16()
    if case == "hidden width":  # the block (and its router) built for 336, the layer for 272
        wide = torch.randn(5, H + 64, generator=g).bfloat16()
        match = r"hidden states are 336 wide but the layer's hidden size is 272"
        return Block(moe, width=H + 64), (wide,), MoEShapeError, match
    if case == "expert count":
        return Block(moe, experts=E + 1), (x,), MoEShapeError, r"router_logits score 5 experts but the weights hold 4"
    if case == "token count":
        logits = torch.randn(6, E, generator=g)
        return Block(moe), (x, logits), MoEShapeError, r"router_logits has 6 tokens, hidden_states 5"
    assert case == "dtype"
    return Block(moe), (x.float(),), MoEConfigError, r"hidden_states must be bfloat16.*got torch.float32"


CASES = ("hidden width", "expert count", "token count", "dtype")


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_bad_input_under_compile_raises_the_eager_error(case, dynamic):
    moe = _layer(seed=CASES.index(case))
    block, args, exc_type, match = _bad_call(case, moe, torch.Generator().manual_seed(CASES.index(case)))
    block.requires_grad_(False)
    with pytest.raises(exc_type, match=match) as eager:
        block(*args)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="moe_nvfp4", dynamic=dynamic, options={"inner": "eager"})
    with pytest.raises(exc_type, match=match) as info:
        compiled(*args)
    assert str(info.value) == str(eager.value)
    assert f"MoE layer '{moe.name}'" in str(info.value)
    assert len(str(info.value)) < 300, "the message is the layer's, not Dynamo's"


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_bad_input_under_other_backends(backend):
    moe = _layer(seed=7)
    block, args, exc_type, match = _bad_call("hidden width", moe, torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(exc_type, match=match):
        torch.compile(block, backend=backend)(*args)


def test_bad_input_under_fullgraph_shows_the_message_not_fake_tensors():
    # fullgraph=True forbids any exception leaving the graph, so the type is Dynamo's; the text must be ours.
    moe = _layer(seed=8)
    block, args, _, match = _bad_call("hidden width", moe, torch.Generator().manual_seed(8))
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception) as info:
        torch.compile(block, backend="moe_nvfp4", fullgraph=True)(*args)
    text = str(info.value)
    assert "hidden states are 336 wide but the layer's hidden size is 272" in text
    assert moe.name in text
    assert "FakeTensor" not in text


@pytest.mark.parametrize("rank", ["hidden states", "router logits"])
def test_wrong_rank_under_dynamic_fullgraph_shows_the_message(rank):
    """The rank errors describe the shape, whose token count is symbolic under dynamic=True: the message
    must not need str() of a symbolic size, which Dynamo cannot trace (fullgraph then showed only that)."""
    moe = _layer(seed=10)
    g = torch.Generator().manual_seed(10)
    x, logits = torch.randn(5, H, generator=g).bfloat16(), torch.randn(5, E, generator=g)
    args = (x[None], logits) if rank == "hidden states" else (x, logits[:, 0])
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception) as info:
        torch.compile(moe, backend="moe_nvfp4", dynamic=True, fullgraph=True)(*args)
    want = "hidden_states must be [tokens, hidden]" if rank == "hidden states" else "router_logits must be a 2-D"
    assert want in str(info.value) and moe.name in str(info.value)


def test_a_good_call_after_a_bad_one_still_compiles():
    from moe_passes.testing import RecordingBackend

    moe = _layer(seed=9)
    block = Block(moe).requires_grad_(False)
    backend = RecordingBackend(inner="eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend)
    g = torch.Generator().manual_seed(9)
    with pytest.raises(MoEConfigError):
        compiled(torch.randn(3, H, generator=g))
    x = torch.randn(3, H, generator=g).bfloat16()
    torch.testing.assert_close(compiled(x), block(x), atol=0, rtol=0)
    assert backend.num_compiles >= 1 and backend.last.op_count(torch.ops.moe_nvfp4.trtllm_nvfp4_moe.default) == 1


# ------------------------------------------------------------------------------------ devices and dtypes
def test_inputs_on_another_device_than_the_layer():
    # "meta" stands in for a second device on a CPU-only machine: the check is the same comparison.
    moe = _layer(seed=10)
    x, logits = torch.randn(5, H).bfloat16(), torch.randn(5, E)
    torch._dynamo.reset()
    compiled = torch.compile(Block(moe), backend="moe_nvfp4", options={"inner": "eager"})
    for call in (moe, compiled):
        with pytest.raises(MoEConfigError, match=r"'model.layers.10.mlp': router_logits are on meta but hidden"):
            call(x, logits.to("meta"))
        with pytest.raises(MoEConfigError, match=r"'model.layers.10.mlp': w13 is on cpu but hidden_states on meta"):
            call(x.to("meta"), logits.to("meta"))


def _op_args(moe, x, logits, **replace):
    tensors = dict(zip(registry.MoEWeights._fields, moe.kernel_weights()),
                   input_global_scale=moe.input_global_scale, intermediate_global_scale=moe.intermediate_global_scale,
                   routing_bias=torch.zeros(E))
    tensors.update(replace)
    return (x, logits, *tensors.values(), moe.hidden_size, moe.top_k, moe.activation, "deepseek_v3", None, None, None,
            moe.kernel, moe.name)


@pytest.mark.parametrize("name", ["w13", "w2_scale", "w2_global_scale", "input_global_scale", "routing_bias"])
def test_every_tensor_argument_on_the_hidden_states_device(name):
    moe = _layer(seed=11)
    x, logits = torch.randn(5, H).bfloat16(), torch.randn(5, E)
    args = dict(zip(registry.MoEWeights._fields, moe.kernel_weights()), input_global_scale=moe.input_global_scale,
                routing_bias=torch.zeros(E))
    elsewhere = args[name].to("meta")
    with pytest.raises(MoEConfigError, match=rf"'{moe.name}': {name} is on meta but hidden_states on cpu"):
        torch.ops.moe_nvfp4.fused_moe(*_op_args(moe, x, logits, **{name: elsewhere}))


def test_scale_and_bias_dtypes():
    moe = _layer(seed=12)
    x, logits = torch.randn(5, H).bfloat16(), torch.randn(5, E)
    with pytest.raises(MoEConfigError, match=r"input_global_scale must be a float32 tensor with one element"):
        torch.ops.moe_nvfp4.fused_moe(*_op_args(moe, x, logits, input_global_scale=moe.input_global_scale.double()))
    with pytest.raises(MoEConfigError, match=r"routing_bias must be a float tensor of shape \(4,\)"):
        torch.ops.moe_nvfp4.fused_moe(*_op_args(moe, x, logits, routing_bias=torch.zeros(E, dtype=torch.int64)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inputs_on_the_cpu_with_the_layer_on_the_gpu():
    moe = _layer(seed=13).cuda()
    x = torch.randn(5, H, device="cuda").bfloat16()
    torch._dynamo.reset()
    compiled = torch.compile(Block(moe), backend="moe_nvfp4")
    for call in (moe, compiled):
        with pytest.raises(MoEConfigError, match=r"router_logits are on cpu but hidden_states on cuda:0"):
            call(x, torch.randn(5, E))
        with pytest.raises(MoEConfigError, match=r"w13 is on cuda:0 but hidden_states on cpu"):
            call(x.cpu(), torch.randn(5, E))


# ------------------------------------------------------------------------------------ NaN / inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hidden_states_name_the_layer(bad):
    moe = _layer(seed=14)
    g = torch.Generator().manual_seed(14)
    x = torch.randn(5, H, generator=g).bfloat16()
    x[int(torch.randint(5, (1,), generator=g)), int(torch.randint(H, (1,), generator=g))] = bad
    with pytest.raises(MoENonFiniteError, match=rf"MoE layer '{moe.name}': the hidden states contain NaN or infinite"):
        moe(x, torch.randn(5, E, generator=g))
    assert issubclass(MoENonFiniteError, (MoEError, ValueError))


# ------------------------------------------------------------------------------------ calibrated range
def _calibrated(seed):
    g = torch.Generator().manual_seed(seed)
    calibration = torch.randn(64, H, generator=g) / 10
    return _layer(name=f"range.{uuid.uuid4().hex[:8]}", calibration=calibration, seed=seed), calibration


def test_activations_beyond_calibration_warn_once_per_layer_with_the_factor():
    moe, calibration = _calibrated(15)
    g = torch.Generator().manual_seed(15)
    calibrated = float(calibration.abs().amax())
    scale = 3 + 5 * float(torch.rand((), generator=g))
    x = (torch.randn(7, H, generator=g) / 10 * scale).bfloat16()
    logits = torch.randn(7, E, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moe((torch.randn(7, H, generator=g) / 10).clamp(-0.99 * calibrated, 0.99 * calibrated).bfloat16(), logits)
        assert not [w for w in caught if issubclass(w.category, MoERangeWarning)]
        moe(x, logits)
        moe(x * 2, logits)  # the same layer again: no second warning
        other, _ = _calibrated(16)
        other(x, logits)
    ranged = [w for w in caught if issubclass(w.category, MoERangeWarning)]
    assert [moe.name in str(w.message) for w in ranged] == [True, False]
    assert other.name in str(ranged[1].message)
    factor = float(x.float().abs().amax()) / calibrated
    assert f"{factor:.2f}x the calibrated amax" in str(ranged[0].message)


def test_kernels_keeping_bf16_activations_are_not_checked(monkeypatch):
    # The Hopper path keeps activations in bf16: nothing saturates, so it must not pay for a check.
    bf16 = registry.KernelSpec(
        name="test_bf16_activations", description="test kernel with bf16 activations", alignment=REFERENCE.alignment,
        activations=REFERENCE.activations, routings=REFERENCE.routings, available=lambda d: True,
        prepare=REFERENCE.prepare, run=REFERENCE.run, quantizes_activations=False)
    monkeypatch.setitem(registry._REGISTRY, bf16.name, bf16)
    moe, _ = _calibrated(17)
    moe.kernel = bf16.name
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(17)).bfloat16() * 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moe(x, torch.randn(7, E))
    assert not [w for w in caught if issubclass(w.category, MoERangeWarning)]
