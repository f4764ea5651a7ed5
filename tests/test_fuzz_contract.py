"""Shape-contract properties, fuzzed: padded sizes are >= the true ones, aligned and minimal; the layer's
kernel weights, the lowering's pad and the ops' fake functions all agree with the contract and with the
shapes the real ops produce."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_passes.contract import NVFP4_BLOCK, Alignment, MoEShape, align_hidden_dim, round_up
from moe_passes.ops import FUSED_MOE, KERNEL_OP
from moe_passes.passes import LowerFusedMoE
from moe_passes.testing import find_nodes, run_passes, trace
from moe_passes.testing import strategies as mst

alignments = st.builds(Alignment, hidden=st.sampled_from([16, 64, 128, 256, 512]),
                       intermediate_gated=st.sampled_from([16, 32, 64, 128]),
                       intermediate_plain=st.sampled_from([16, 64, 128, 256]))


@mst.fuzz_settings(300)
@given(hidden=st.integers(1, 16384), inter=st.integers(1, 8192), experts=st.integers(1, 512),
       activation=mst.activations(), alignment=alignments, data=st.data())
def test_padded_sizes_are_minimal_aligned_upper_bounds(hidden, inter, experts, activation, alignment, data):
    top_k = data.draw(st.integers(1, experts))
    shape = MoEShape(hidden=hidden, intermediate=inter, experts=experts, top_k=top_k, activation=activation,
                     alignment=alignment)
    for true, padded, align in ((hidden, shape.hidden_padded, alignment.hidden),
                                (inter, shape.intermediate_padded, alignment.intermediate(activation))):
        assert padded >= true
        assert padded % align == 0
        assert padded - align < true, "padded more than one alignment step: not minimal"
    assert shape.needs_hidden_pad == (hidden % alignment.hidden != 0)
    w = shape.weight_shapes()
    hp, ip = shape.hidden_padded, shape.intermediate_padded
    rows = (2 if shape.gated else 1) * ip
    assert w["w13"] == (experts, rows, hp // 2) and w["w13_scale"] == (experts, rows, hp // NVFP4_BLOCK)
    assert w["w2"] == (experts, hp, ip // 2) and w["w2_scale"] == (experts, hp, ip // NVFP4_BLOCK)
    assert shape.weight_bytes() == experts * (rows * hp // 2 + rows * hp // 16 + hp * ip // 2 + hp * ip // 16 + 8)


@mst.fuzz_settings(40)
@given(experts=st.integers(1, 4), rows=st.sampled_from([16, 32, 64]), blocks=st.integers(1, 40),
       inter=st.sampled_from([16, 32, 64]), alignment=st.sampled_from([32, 128, 256]), seed=st.integers(0, 99))
def test_align_hidden_dim_pads_weights_to_the_contract_with_zeros(experts, rows, blocks, inter, alignment, seed):
    hidden = blocks * NVFP4_BLOCK
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randint(1, 256, (experts, rows, hidden // 2), dtype=torch.uint8, generator=g)
    s13 = torch.rand(experts, rows, hidden // 16, generator=g).add(0.5).to(torch.float8_e4m3fn)
    w2 = torch.randint(1, 256, (experts, hidden, inter // 2), dtype=torch.uint8, generator=g)
    s2 = torch.rand(experts, hidden, inter // 16, generator=g).add(0.5).to(torch.float8_e4m3fn)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p13, ps13, p2, ps2, hp = align_hidden_dim(w13, s13, w2, s2, alignment=alignment)
    assert hp == round_up(hidden, alignment)
    assert p13.shape == (experts, rows, hp // 2) and ps13.shape == (experts, rows, hp // 16)
    assert p2.shape == (experts, hp, inter // 2) and ps2.shape == (experts, hp, inter // 16)
    assert torch.equal(p13[..., :hidden // 2], w13) and torch.equal(p2[:, :hidden], w2)
    assert torch.equal(ps13[..., :hidden // 16].view(torch.uint8), s13.view(torch.uint8))
    assert not p13[..., hidden // 2:].any() and not p2[:, hidden:].any()
    assert not ps13[..., hidden // 16:].view(torch.uint8).any() and not ps2[:, hidden:].view(torch.uint8).any()


def _op_args(layer, x, logits, *, kernel_op: bool):
    args = [x, logits, *layer.kernel_weights(), layer.input_global_scale, layer.intermediate_global_scale,
            layer.routing_bias]
    if not kernel_op:
        args.append(layer.hidden_size)
    return args + [layer.top_k, layer.activation, layer.routing, layer.n_group, layer.topk_group,
                   layer.routed_scaling_factor, layer.kernel, layer.name]


def _symbolic_fake(mode, t):
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    if not isinstance(t, torch.Tensor):
        return t
    dims = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.ndim - 1) if t.ndim == 2 else [DimDynamic.STATIC] * t.ndim
    return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


@mst.fuzz_settings(12)
@given(problem=mst.moe_problems(), tokens=mst.token_counts(max_tokens=64))
def test_fake_output_shapes_equal_real_output_shapes(problem, tokens):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    layer = problem.build().moe
    assert tuple(layer.kernel_weights().w2.shape) == problem.shape.weight_shapes()["w2"]
    assert {k: tuple(v.shape) for k, v in layer.kernel_weights()._asdict().items()} == problem.shape.weight_shapes()
    x, logits = problem.inputs(tokens, seed=tokens)
    x_padded = torch.nn.functional.pad(x, (0, problem.hidden_padded - problem.hidden))
    for op, inp, width in ((FUSED_MOE, x, problem.hidden), (KERNEL_OP, x_padded, problem.hidden_padded)):
        args = _op_args(layer, inp, logits, kernel_op=op is KERNEL_OP)
        real = op(*args)
        assert real.shape == (tokens, width) and real.dtype == torch.bfloat16
        assert real.float().abs().sum() > 0, "fresh random inputs must give a non-zero output"
        mode = FakeTensorMode(shape_env=ShapeEnv(specialize_zero_one=False), allow_non_fake_inputs=False)
        with mode:
            fake_args = [_symbolic_fake(mode, a) for a in args]
            fake = op(*fake_args)
        # Symbolic token count flows through; the width is static and equals the real one.
        assert isinstance(fake.shape[0], torch.SymInt) and str(fake.shape[0]) == str(fake_args[0].shape[0])
        assert fake.shape[1] == real.shape[1] and fake.dtype == real.dtype
        with FakeTensorMode() as static_mode:
            static = op(*[static_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert static.shape == real.shape


@mst.fuzz_settings(10)
@given(problem=mst.moe_problems(), tokens=st.sampled_from([1, 3, 8]))
def test_lowering_pads_exactly_to_the_contract(problem, tokens):
    block = problem.build()
    gm = trace(block, *problem.inputs(tokens))
    after = run_passes(gm, LowerFusedMoE()).after
    pads, slices = find_nodes(after, "pad"), find_nodes(after, "slice")
    (kernel,) = find_nodes(after, "kernel")
    extra = problem.hidden_padded - problem.hidden
    if extra == 0:
        assert not pads and not slices
    else:
        (pad,), (slice_,) = pads, slices
        assert pad.args[1] == [0, extra] and kernel.args[0] is pad
        assert slice_.args[0] is kernel and slice_.args[1:] == (1, 0, problem.hidden)
    assert kernel.meta["moe_nvfp4"]["hidden_padded"] == problem.hidden_padded
    assert after.graph.find_nodes(op="placeholder")[0].meta["val"] is not None


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
