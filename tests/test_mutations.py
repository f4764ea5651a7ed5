"""Mutation testing of the verifier: deliberately broken passes must each fail at compile time with a clear
MoEShapeError (before any kernel runs), and neither the correct pipeline nor a correct rewrite of it (work moved
into the padded domain, slices moved or split) may ever be rejected.

Each mutant is a small extra pass (run after lowering, before verification, as a user's pass would be)
that introduces one padding bug.  Counts of caught / applied mutants and of false alarms over the fuzzed
correct cases are printed at the end of the module (run with ``-s`` or look at the terminal summary) and
asserted: every applied mutant caught, zero false alarms.
"""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_passes import MoEShapeError
from moe_passes.ops import KERNEL_OP
from moe_passes.passes import GraphPass, PassResult
from moe_passes.testing import (RecordingBackend, check_numerics, count_kernel_calls, find_nodes, mark_token_dims,
                                no_silent_fallback, unwrap_compile_error)
from moe_passes.testing import strategies as mst

aten = torch.ops.aten
LAYER = "decoder.moe"
COUNTS: dict = collections.defaultdict(lambda: collections.Counter())


# -- the mutants ---------------------------------------------------------------------------------------

def _kernel_sites(gm):
    """(kernel, pad or None, slice or None) per lowered MoE call."""
    sites = []
    for k in find_nodes(gm, "kernel"):
        x = k.args[0]
        pad = x if getattr(x, "target", None) is aten.constant_pad_nd.default else None
        slices = [u for u in k.users if u.target is aten.slice.Tensor]
        sites.append((k, pad, slices[0] if slices else None))
    return sites


def _width(node) -> int:
    """Last-dim size of a node that carries a fake value (placeholders do; lowered nodes get one only
    when the verifier propagates)."""
    return node.meta["val"].shape[-1]


def _copy_meta(new, old):
    new.meta.update({k: old.meta[k] for k in ("stack_trace", "nn_module_stack") if k in old.meta})
    return new


class Mutant(GraphPass):
    """A broken pass: ``mutate(gm, kernel, pad, slice)`` returns True when it changed that site."""

    def must_mention(self, problem) -> list[str]:
        """What a clear error for this bug names besides the layer: by default the padded width."""
        return [str(problem.hidden_padded)]

    def mutate(self, gm, kernel, pad, slice_) -> bool:
        raise NotImplementedError

    def __init__(self):
        super().__init__()
        self.matches = 0  # sites changed over all runs (0: this mutant does not apply to the problem)

    def run(self, gm):
        hits = sum(bool(self.mutate(gm, k, p, s)) for k, p, s in _kernel_sites(gm) if p is not None and s is not None)
        self.matches += hits
        return PassResult(changed=hits > 0, matches=hits)


class DropSlice(Mutant):
    """Treats the slice as a no-op: the padded [T, Hp] output meets the [T, H] shared output."""

    def mutate(self, gm, kernel, pad, slice_):
        slice_.replace_all_uses_with(kernel)
        gm.graph.erase_node(slice_)
        return True


def _shared_add(slice_):
    adds = [u for u in slice_.users if u.target is aten.add.Tensor]
    return adds[0] if adds else None


def _add_in_padded_domain(gm, kernel, slice_, pad_shared=None):
    """Rewrites ``add(slice(y_p), shared)`` into ``slice(add(y_p, shared'))``, ``shared'`` being the shared
    output padded by ``pad_shared`` (``[left, right]``) or as it is; False without a shared-expert add."""
    add = _shared_add(slice_)
    if add is None:
        return False
    other = add.args[1] if add.args[0] is slice_ else add.args[0]
    with gm.graph.inserting_before(add):
        if pad_shared is not None:
            other = _copy_meta(gm.graph.call_function(aten.constant_pad_nd.default, (other, pad_shared, 0.0)), add)
        early = _copy_meta(gm.graph.call_function(aten.add.Tensor, (kernel, other)), add)
        late = _copy_meta(gm.graph.call_function(aten.slice.Tensor, (early, 1, 0, slice_.args[3])), add)
    add.replace_all_uses_with(late)
    gm.graph.erase_node(add)
    return True


class AddBeforeSlice(Mutant):
    """Moves the shared-expert add into the padded domain: ``slice(add(y_p, shared))``."""

    def mutate(self, gm, kernel, pad, slice_):
        return _add_in_padded_domain(gm, kernel, slice_)


class PadSharedOnTheLeft(Mutant):
    """Pads the shared output on the left before adding it to the padded routed output: every shape agrees,
    but column c of one meets column c - pad of the other."""

    def mutate(self, gm, kernel, pad, slice_):
        return _add_in_padded_domain(gm, kernel, slice_, [pad.args[1][1], 0])


class NormOverPaddedColumns(Mutant):
    """RMS-normalizes the routed output before the slice: the mean runs over the padding columns too."""

    def mutate(self, gm, kernel, pad, slice_):
        with gm.graph.inserting_before(slice_):
            square = gm.graph.call_function(aten.mul.Tensor, (kernel, kernel))
            mean = gm.graph.call_function(aten.mean.dim, (square, [-1], True))
            scale = gm.graph.call_function(aten.rsqrt.default, (gm.graph.call_function(aten.add.Tensor, (mean, 1.0)),))
            normed = gm.graph.call_function(aten.mul.Tensor, (kernel, scale))
        slice_.replace_input_with(kernel, normed)
        return True


class WrongPadWidth(Mutant):
    """Pads one NVFP4 block (16) too many: activations wider than the padded weights."""

    def mutate(self, gm, kernel, pad, slice_):
        pad.args = (pad.args[0], [0, pad.args[1][1] + 16], *pad.args[2:])
        return True


class PadTooNarrow(Mutant):
    """Pads one block too few."""

    def mutate(self, gm, kernel, pad, slice_):
        pad.args = (pad.args[0], [0, pad.args[1][1] - 16], *pad.args[2:])
        return True


class PadOnTokenDim(Mutant):
    """Pads the token dimension instead of the hidden one (``[0, 0, 0, n]``)."""

    def must_mention(self, problem):
        return ["tokens", str(problem.hidden_padded - problem.hidden)]

    def mutate(self, gm, kernel, pad, slice_):
        pad.args = (pad.args[0], [0, 0, 0, pad.args[1][1]], *pad.args[2:])
        return True


class DropPad(Mutant):
    """Feeds the unpadded activations to the kernel."""

    def mutate(self, gm, kernel, pad, slice_):
        kernel.replace_input_with(pad, pad.args[0])
        gm.graph.erase_node(pad)
        return True


class PadActivationsOnTheLeft(Mutant):
    """Pads the activations on the left: the right width, but every column meets another column's weights."""

    def mutate(self, gm, kernel, pad, slice_):
        pad.args = (pad.args[0], [pad.args[1][1], 0], *pad.args[2:])
        return True


class ShiftActivationsOneColumn(Mutant):
    """Drops the first activation column and pads one more on the right: shapes agree, columns do not."""

    def mutate(self, gm, kernel, pad, slice_):
        x = pad.args[0]
        with gm.graph.inserting_before(pad):
            shifted = gm.graph.call_function(aten.slice.Tensor, (x, 1, 1, _width(x)))
        _copy_meta(shifted, x)
        pad.args = (shifted, [0, pad.args[1][1] + 1], *pad.args[2:])
        return True


class ActivationsPaddedToOtherAlignment(Mutant):
    """Pads activations to a multiple of 128 while the weights were padded to the kernel's 256."""

    def mutate(self, gm, kernel, pad, slice_):
        hidden = _width(pad.args[0])
        other = -(-hidden // 128) * 128 - hidden
        if other == pad.args[1][1]:
            return False  # the two alignments agree for this size: not a bug here
        pad.args = (pad.args[0], [0, other], *pad.args[2:])
        return True


class WeightsPaddedToOtherAlignment(Mutant):
    """Cuts the kernel's weights back to a multiple of 128 (keeping activations at 256): weights and
    activations padded differently, seen from the weights' side."""

    def mutate(self, gm, kernel, pad, slice_):
        hidden = _width(pad.args[0])
        narrow = -(-hidden // 128) * 128
        padded = hidden + pad.args[1][1]
        if narrow == padded:
            return False
        names = [a.name for a in KERNEL_OP._schema.arguments]
        args = list(kernel.args)
        with gm.graph.inserting_before(kernel):
            for name, dim, size in (("w13", 2, narrow // 2), ("w13_scale", 2, narrow // 16), ("w2", 1, narrow),
                                    ("w2_scale", 1, narrow)):
                i = names.index(name)
                args[i] = gm.graph.call_function(aten.slice.Tensor, (args[i], dim, 0, size))
        kernel.args = tuple(args)
        return True


class SliceTooNarrow(Mutant):
    """Slices back one block short of the hidden size."""

    def mutate(self, gm, kernel, pad, slice_):
        slice_.args = (kernel, 1, 0, slice_.args[3] - 16)
        return True


class SliceWrongOffset(Mutant):
    """Slices the right width from the wrong place (``[16, 16 + H)``): shapes agree, columns do not."""

    def mutate(self, gm, kernel, pad, slice_):
        slice_.args = (kernel, 1, 16, slice_.args[3] + 16)
        return True


class SliceTokenDim(Mutant):
    """Slices the token dimension instead of the hidden one."""

    def mutate(self, gm, kernel, pad, slice_):
        slice_.args = (kernel, 0, 0, slice_.args[3])
        return True


class PaddedOutputEscapes(Mutant):
    """Returns the kernel's padded output from the graph instead of the sliced (and added) result."""

    def mutate(self, gm, kernel, pad, slice_):
        output = next(iter(gm.graph.find_nodes(op="output")))
        for node in list(slice_.users) + [slice_]:
            if node in output.all_input_nodes:
                output.replace_input_with(node, kernel)
                return True
        return False


class BroadcastAgainstColumn(Mutant):
    """Drops the slice and adds a ``[T, 1]`` reduction of the shared output: broadcasting hides the
    width mismatch from shape propagation."""

    def mutate(self, gm, kernel, pad, slice_):
        add = _shared_add(slice_)
        if add is None:
            return False
        other = add.args[1] if add.args[0] is slice_ else add.args[0]
        with gm.graph.inserting_before(add):
            column = _copy_meta(gm.graph.call_function(aten.sum.dim_IntList, (other, [1], True)), add)
        add.args = (kernel, column)
        gm.graph.erase_node(slice_)
        return True


class RouterLogitsLoseAnExpert(Mutant):
    """Hands the kernel router logits for one expert fewer than its weights hold."""

    def must_mention(self, problem):
        return [f"{problem.experts - 1} experts", str(problem.experts)]

    def mutate(self, gm, kernel, pad, slice_):
        logits = kernel.args[1]
        experts = logits.meta["val"].shape[1]
        if experts < 2:
            return False
        with gm.graph.inserting_before(kernel):
            kernel.replace_input_with(logits, gm.graph.call_function(aten.slice.Tensor, (logits, 1, 0, experts - 1)))
        return True


MUTANTS = [DropSlice, AddBeforeSlice, PadSharedOnTheLeft, NormOverPaddedColumns, WrongPadWidth, PadTooNarrow,
           PadOnTokenDim, DropPad, PadActivationsOnTheLeft, ShiftActivationsOneColumn,
           ActivationsPaddedToOtherAlignment, WeightsPaddedToOtherAlignment, SliceTooNarrow, SliceWrongOffset,
           SliceTokenDim, PaddedOutputEscapes, BroadcastAgainstColumn, RouterLogitsLoseAnExpert]


# -- the suite -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    caught = sum(c["caught"] for name, c in COUNTS.items() if name != "correct")
    applied = sum(c["applied"] for name, c in COUNTS.items() if name != "correct")
    correct = COUNTS["correct"]
    lines = ["", "moe_nvfp4 mutation suite:"]
    lines += [f"  {name:<36} caught {c['caught']}/{c['applied']} (not applicable {c['skipped']})"
              for name, c in COUNTS.items() if name != "correct"]
    lines.append(f"  mutants caught: {caught}/{applied}")
    lines.append(f"  false alarms:   {correct['rejected']}/{correct['cases']} correct cases")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else _nullcontext():
        print("\n".join(lines))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.__name__)
@mst.fuzz_settings(3)
@given(problem=mst.moe_problems(aligned=False, shared=True, experts=st.sampled_from([2, 4, 8]), name=LAYER),
       tokens=st.sampled_from([1, 5, 33]))
def test_mutant_is_caught_at_compile_time(mutant, problem, tokens):
    counts = COUNTS[mutant.__name__]
    block = problem.build()
    torch._dynamo.reset()
    broken = mutant()
    backend = RecordingBackend(inner="eager", extra_passes=[broken])
    compiled = torch.compile(block, backend=backend)
    x, logits = mark_token_dims(*problem.inputs(tokens))
    error = None
    with count_kernel_calls() as calls, no_silent_fallback():
        try:
            compiled(x, logits)
        except Exception as exc:  # noqa: BLE001 - classified below
            error = unwrap_compile_error(exc)
    assert backend.num_compiles >= 1 and mutant.__name__ in [s.pass_name for s in backend.last.snapshots]
    if broken.matches == 0:
        counts["skipped"] += 1
        assert error is None, f"{mutant.__name__} changed nothing, yet the compile failed: {error}"
        return
    counts["applied"] += 1
    assert isinstance(error, MoEShapeError), (
        f"{mutant.__name__} was not rejected with a MoEShapeError (got {type(error).__name__}: {error})")
    assert calls.total == 0, "a kernel ran before the broken graph was rejected"
    message = str(error)
    assert error.layer == LAYER and LAYER in message, message
    for text in broken.must_mention(problem):
        assert text in message, f"{mutant.__name__}: {text!r} missing from the error:\n{message}"
    assert "graph node" in message or "padded output" in message, message
    counts["caught"] += 1


# -- correct rewrites: shape-correct graphs the verifier must accept ------------------------------------

class Rewrite(Mutant):
    """A correct pass: moves work into the padded domain or reshapes it, and slices the padding away before
    anything else sees it.  A rejection is a false alarm."""


class PadSharedAddSlice(Rewrite):
    """Pads the shared output to the kernel's width, adds in the padded domain, then slices back:
    ``slice(add(y_p, pad(shared)), 0, H)``."""

    def mutate(self, gm, kernel, pad, slice_):
        return _add_in_padded_domain(gm, kernel, slice_, [0, pad.args[1][1]])


class AddPaddedSliceLater(Rewrite):
    """Adds in the padded domain, scales, goes through a view with a leading unit dimension, and slices
    only there: ``squeeze(slice(unsqueeze(mul(add(y_p, pad(shared)), 1.0), 0), 2, 0, H), 0)``."""

    def mutate(self, gm, kernel, pad, slice_):
        add = _shared_add(slice_)
        if add is None:
            return False
        other = add.args[1] if add.args[0] is slice_ else add.args[0]
        g = gm.graph
        with g.inserting_before(add):
            other_p = g.call_function(aten.constant_pad_nd.default, (other, [0, pad.args[1][1]], 0.0))
            summed = g.call_function(aten.mul.Tensor, (g.call_function(aten.add.Tensor, (other_p, kernel)), 1.0))
            wide = g.call_function(aten.unsqueeze.default, (summed, 0))
            narrow = g.call_function(aten.slice.Tensor, (wide, 2, 0, slice_.args[3]))
            late = g.call_function(aten.squeeze.dim, (narrow, 0))
        add.replace_all_uses_with(late)
        g.erase_node(add)
        return True


class SliceInTwoAndConcatenate(Rewrite):
    """Slices the two halves of the true columns separately and concatenates them."""

    def mutate(self, gm, kernel, pad, slice_):
        hidden = slice_.args[3]
        half = hidden // 32 * 16
        with gm.graph.inserting_before(slice_):
            low = gm.graph.call_function(aten.slice.Tensor, (kernel, 1, 0, half))
            high = gm.graph.call_function(aten.slice.Tensor, (kernel, 1, half, hidden))
            both = gm.graph.call_function(aten.cat.default, ([low, high], 1))
        slice_.replace_all_uses_with(both)
        gm.graph.erase_node(slice_)
        return True


class SliceTwiceThroughTranspose(Rewrite):
    """Transposes the padded output, trims part of the padding, transposes back, then trims the rest."""

    def mutate(self, gm, kernel, pad, slice_):
        hidden, extra = slice_.args[3], pad.args[1][1]
        g = gm.graph
        with g.inserting_before(slice_):
            flipped = g.call_function(aten.permute.default, (kernel, [1, 0]))
            trimmed = g.call_function(aten.slice.Tensor, (flipped, 0, 0, hidden + extra // 2))
            back = g.call_function(aten.transpose.int, (trimmed, 0, 1))
        slice_.args = (back, *slice_.args[1:])
        return True


REWRITES = [PadSharedAddSlice, AddPaddedSliceLater, SliceInTwoAndConcatenate, SliceTwiceThroughTranspose]


@pytest.mark.parametrize("rewrite", REWRITES, ids=lambda r: r.__name__)
@mst.fuzz_settings(2)
@given(problem=mst.moe_problems(aligned=False, shared=True, experts=st.sampled_from([2, 4]), name=LAYER),
       tokens=st.sampled_from([5, 33]))
def test_correct_rewrite_is_accepted(rewrite, problem, tokens):
    block = problem.build()
    torch._dynamo.reset()
    correct = rewrite()
    backend = RecordingBackend(inner="eager", extra_passes=[correct])
    compiled = torch.compile(block, backend=backend)
    COUNTS["correct"]["cases"] += 1
    try:
        with no_silent_fallback():
            check_numerics(compiled, block, [mark_token_dims(*problem.inputs(t, seed=t)) for t in (1, tokens)])
    except Exception as exc:
        if isinstance(unwrap_compile_error(exc), MoEShapeError):
            COUNTS["correct"]["rejected"] += 1
        raise
    assert backend.num_compiles == 1 and correct.matches == 1, "the rewrite must have applied, once"


BENIGN_EXTRA_PASSES = {
    "none": [],
    "identity": [lambda gm: PassResult(changed=False)],
    "recompile_only": [lambda gm: PassResult(changed=True, detail="no-op that asks for cleanup")],
}


@mst.fuzz_settings(24)
@given(problem=mst.moe_problems(name=LAYER), tokens=st.lists(mst.token_counts(max_tokens=64), min_size=1, max_size=2),
       extra=st.sampled_from(sorted(BENIGN_EXTRA_PASSES)))
def test_correct_pipeline_is_never_rejected(problem, tokens, extra):
    block = problem.build()
    torch._dynamo.reset()
    backend = RecordingBackend(inner="eager", extra_passes=BENIGN_EXTRA_PASSES[extra])
    compiled = torch.compile(block, backend=backend)
    COUNTS["correct"]["cases"] += 1
    try:
        with no_silent_fallback():
            check_numerics(compiled, block, [mark_token_dims(*problem.inputs(t, seed=t)) for t in [1, *tokens]])
    except Exception as exc:
        if isinstance(unwrap_compile_error(exc), MoEShapeError):
            COUNTS["correct"]["rejected"] += 1
        raise
    assert backend.num_compiles == 1
