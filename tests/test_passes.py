"""Graph tests of the backend's passes, written with the public kit (moe_passes.testing).

Covers the lowering's exact node sequence (pad -> kernel -> slice -> add for H=2688, no pad/slice for
H=2048), compile-time rejection of a pass that drops the slice (before any kernel runs, naming the
layer, both sizes and the user's line), and the pass manager's order, timing, observers, uuid and
graph logging (TORCH_LOGS-style artifact logging and dump_dir).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from moe_passes import MoEShapeError
from moe_passes.ops import KERNEL_OP
from moe_passes.passes import GraphPass, LowerFusedMoE, PassResult, VerifyMoEShapes, default_pipeline
from moe_passes.passes.manager import pass_uuid
from moe_passes.testing import (MoEProblem, RecordingBackend, assert_no_ops, assert_pattern, check_numerics,
                                count_kernel_calls, expect_shape_error, moe_reference, no_silent_fallback,
                                raises_compile_error, run_passes, run_pipeline, trace, verify)

aten = torch.ops.aten
LAYER = "blocks.0.moe"


class Block(nn.Module):
    """A user model: the MoE call below is the "user's source line" errors must point at."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x, logits):
        return self.moe(x, logits)  # the user's MoE line


USER_LINE = "return self.moe(x, logits)  # the user's MoE line"


def _problem(hidden: int) -> MoEProblem:
    return MoEProblem(hidden=hidden, intermediate=64, experts=4, top_k=2, activation="relu2", shared=32,
                      seed=hidden, name=LAYER)


def _traced(hidden: int):
    problem = _problem(hidden)
    block = Block(problem.build().moe)
    x, logits = problem.inputs(tokens=7, seed=1)
    return problem, block, trace(block, x, logits)


@pytest.fixture(scope="module")
def nano():
    """Nemotron-3-Nano's hidden size 2688 (pads to 2816), with a shared expert; traced once."""
    return _traced(2688)


@pytest.fixture(scope="module")
def qwen():
    """An aligned hidden size (Qwen3-30B's 2048): no padding at all."""
    return _traced(2048)


def _drop_slice(gm: torch.fx.GraphModule) -> PassResult:
    """A broken user pass: treats the slice after the kernel as a no-op and removes it."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is aten.slice.Tensor and getattr(node.args[0], "target", None) is KERNEL_OP:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    return PassResult(changed=count > 0, matches=count)


# -- lowering ------------------------------------------------------------------------------------------

def test_traced_graph_is_the_aten_graph_with_symbolic_tokens(nano):
    _, _, gm = nano
    fused = [n for n in gm.graph.nodes if n.target is torch.ops.moe_nvfp4.fused_moe.default]
    assert len(fused) == 1
    tokens, width = fused[0].meta["val"].shape
    assert isinstance(tokens, torch.SymInt), "the token count must stay symbolic"
    assert width == 2688
    assert all("val" in n.meta for n in gm.graph.find_nodes(op="placeholder"))


def test_lowering_unaligned_exact_sequence(nano):
    _, _, gm = nano
    run = run_passes(gm, LowerFusedMoE())
    run.check_before_ops(["fused_moe"])  # present before, fully replaced after
    run.check_after_ops(["pad", "trtllm_nvfp4_moe", "slice", "add"])
    (chain,) = run.assert_pattern("pad -> trtllm_nvfp4_moe -> slice -> add", exact=True, count=1)
    pad, kernel, slice_, add = chain
    assert pad.args[1] == [0, 2816 - 2688]
    assert slice_.args[1:] == (1, 0, 2688)
    assert kernel.meta["moe_nvfp4"] == {"layer": LAYER, "hidden": 2688, "hidden_padded": 2816}
    # The add stays in the unpadded domain: its other operand is the shared expert's [T, 2688] output.
    assert add.args[0] is slice_ and add.args[1].meta["val"].shape[-1] == 2688
    assert run.records[0].name == "lower_fused_moe" and run.records[0].result.matches == 1
    verify(run.after)
    # The input graph is untouched (trace once, run many).
    assert run.op_count("fused_moe", before=True) == 1 and run.op_count("pad", before=True) == 0


def test_lowering_aligned_has_no_pad_and_no_slice(qwen):
    _, _, gm = qwen
    run = run_pipeline(gm)
    assert [r.name for r in run.records] == ["lower_fused_moe", "verify_moe_shapes"]
    assert run.op_count("trtllm_nvfp4_moe") == 1 and run.op_count("fused_moe") == 0
    assert_no_ops(run.after, "pad", "slice")
    run.assert_pattern("trtllm_nvfp4_moe -> add", exact=True, count=1)


def test_backend_compile_lowers_and_matches_eager_and_reference(nano):
    problem, block, _ = nano
    torch._dynamo.reset()
    backend = RecordingBackend(inner="eager")
    compiled = torch.compile(block, backend=backend, dynamic=True)
    with no_silent_fallback():
        report = check_numerics(compiled, block, [problem.inputs(t, seed=t) for t in (1, 7, 64, 300)],
                                reference=lambda x, logits: moe_reference(block, x, logits))
    assert backend.num_compiles == 1, "one compile must serve token counts 1, 7, 64 and 300"
    assert report.calls == 4
    backend.check_before_ops(["fused_moe"])
    backend.assert_pattern("pad -> kernel -> slice -> add", exact=True)
    assert backend.last.pass_names == ["lower_fused_moe", "verify_moe_shapes"]


# -- the dropped slice ---------------------------------------------------------------------------------

def test_pass_dropping_the_slice_fails_compile_before_anything_runs(nano):
    problem, block, _ = nano
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=RecordingBackend(inner="eager", extra_passes=[_drop_slice]), dynamic=True)
    x, logits = problem.inputs(tokens=5, seed=2)
    with count_kernel_calls() as calls, raises_compile_error(MoEShapeError) as err:
        compiled(x, logits)
    assert calls.total == 0, "the kernel ran although compilation must fail first"
    error = err.value
    assert isinstance(err.outer, torch._dynamo.exc.BackendCompilerFailed)
    message = str(error)
    assert "2816" in message and "2688" in message
    assert error.sizes == (2816, 2688)
    assert error.layer == LAYER and LAYER in message
    assert error.source and __file__ in error.source and USER_LINE in error.source
    assert USER_LINE in message
    # Eager still works: the failure is the broken pass's, found at compile time.
    assert block(x, logits).shape == (5, 2688)


def test_dropped_slice_caught_on_the_traced_graph_too(nano):
    _, _, gm = nano
    run = run_pipeline(gm, [_drop_slice], raise_errors=False)
    assert isinstance(run.error, MoEShapeError)
    assert run.error.sizes == (2816, 2688)
    rejected = run.graph_at("before", "verify_moe_shapes")
    assert_no_ops(rejected, "slice")
    assert expect_shape_error(rejected).layer == LAYER


# -- the pass manager ----------------------------------------------------------------------------------

class _Tag(GraphPass):
    """Test pass: records its call and optionally sleeps."""

    def __init__(self, name, log, sleep=0.0):
        self.name = name
        super().__init__()
        self.log, self.sleep = log, sleep

    def run(self, gm):
        self.log.append(self.name)
        time.sleep(self.sleep)
        return PassResult(changed=False, matches=len(self.log))


def test_pass_manager_order_timing_and_records(qwen):
    _, _, gm = qwen
    log = []
    passes = [_Tag("c", log), _Tag("a", log, sleep=0.02), _Tag("b", log)]
    run = run_passes(gm, passes)
    assert log == ["c", "a", "b"]
    assert [r.name for r in run.records] == ["c", "a", "b"]
    assert [r.result.matches for r in run.records] == [1, 2, 3]
    assert all(isinstance(r.seconds, float) and r.seconds >= 0 for r in run.records)
    assert run.records[1].seconds >= 0.02 > run.records[0].seconds
    assert [(s.stage, s.pass_name) for s in run.snapshots] == [
        ("before", "c"), ("after", "c"), ("before", "a"), ("after", "a"), ("before", "b"), ("after", "b")]


def test_pass_manager_observers_see_every_graph_in_order(nano):
    _, _, gm = nano
    seen = []
    manager = default_pipeline()
    manager.observers.append(lambda stage, name, g: seen.append((stage, name, sum(n.target is KERNEL_OP
                                                                                  for n in g.graph.nodes))))
    run_passes(gm, manager)
    assert seen == [("before", "lower_fused_moe", 0), ("after", "lower_fused_moe", 1),
                    ("before", "verify_moe_shapes", 1), ("after", "verify_moe_shapes", 1)]
    assert [r.name for r in manager.records] == ["lower_fused_moe", "verify_moe_shapes"]


def test_pass_manager_cleans_up_and_checks_results(qwen):
    _, _, gm = qwen

    def add_dead_node(g):
        x = next(iter(g.graph.find_nodes(op="placeholder")))
        with g.graph.inserting_after(x):
            g.graph.call_function(aten.clone.default, (x,))
        # returns None: the manager assumes a change and cleans up (dead-code elimination)

    run = run_passes(gm, add_dead_node)
    assert run.records[0].result.changed and "assumed" in run.records[0].result.detail
    assert run.op_count("clone") == 0

    with pytest.raises(TypeError, match="returned int"):
        run_passes(gm, lambda g: 3)


def test_pass_uuid_tracks_code_and_order():
    class One(GraphPass):
        def run(self, gm):
            return PassResult(changed=False)

    class Two(GraphPass):
        def run(self, gm):
            return PassResult(changed=True)

    assert One().uuid() == One().uuid()
    assert One().uuid() != Two().uuid()
    assert LowerFusedMoE().uuid() != VerifyMoEShapes().uuid()
    assert default_pipeline().uuid() == default_pipeline().uuid()
    assert default_pipeline([One()]).uuid() != default_pipeline().uuid()
    assert default_pipeline([One(), Two()]).uuid() != default_pipeline([Two(), One()]).uuid()
    assert default_pipeline([_drop_slice]).uuid() != default_pipeline([One()]).uuid()
    assert [type(p).__name__ for p in default_pipeline([One()]).passes] == ["LowerFusedMoE", "One", "VerifyMoEShapes"]


def test_pass_uuid_covers_parameters_helpers_and_refuses_what_it_cannot_key(tmp_path, monkeypatch):
    """Passes differing only in parameters (a GraphPass's attributes, a factory's closure) get different keys;
    a helper beside the class counts; a pass with no readable source or an address in its state gets None, and
    the pipeline with it None (inductor then bypasses its FX graph cache instead of serving a stale graph)."""
    import importlib

    class Scale(GraphPass):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def run(self, gm):
            return PassResult(changed=False)

    def factory(k):
        def scale(gm):
            return PassResult(changed=k > 0)
        return scale

    assert Scale(5).uuid() == Scale(5).uuid() != Scale(7).uuid()
    assert pass_uuid(factory(2)) == pass_uuid(factory(2)) != pass_uuid(factory(3))

    class Callable:  # no GraphPass, no uuid: keyed like one, by its module and attributes
        def __init__(self, k):
            self.k = k

        def __call__(self, gm):
            return None

    assert pass_uuid(Callable(1)) == pass_uuid(Callable(1)) != pass_uuid(Callable(2))
    def scaled(gm, k):
        return None

    class Holder:  # a bound method's object holds its parameters
        def __init__(self, k):
            self.k = k

        def run(self, gm):
            return None

    assert pass_uuid(Holder(2).run) == pass_uuid(Holder(2).run) != pass_uuid(Holder(3).run)
    big = torch.zeros(5000)
    other = big.clone()
    other[2500] = 1.0  # the same repr (elided middle), other bytes
    assert pass_uuid(factory(big)) != pass_uuid(factory(other))

    assert pass_uuid(functools.partial(scaled, k=2)) == pass_uuid(functools.partial(scaled, k=2))
    assert pass_uuid(functools.partial(scaled, k=2)) != pass_uuid(functools.partial(scaled, k=3))
    assert Scale(object()).uuid() is None and default_pipeline([Scale(object())]).uuid() is None
    exec_ns = {}
    exec("def nowhere(gm):\n    return None", exec_ns)  # no source file: cannot be keyed
    assert pass_uuid(exec_ns["nowhere"]) is None
    module = tmp_path / "user_pass_mod.py"
    body = ("from moe_passes.passes import GraphPass\n\ndef helper():\n    return {}\n\n"
            "class UsesHelper(GraphPass):\n    def run(self, gm):\n        return helper()\n")
    module.write_text(body.format(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("user_pass_mod")
    before = mod.UsesHelper().uuid()
    module.write_text(body.format(22))  # only the helper beside the class changes (and the file's size: linecache)
    assert importlib.reload(mod).UsesHelper().uuid() != before


# -- observability -------------------------------------------------------------------------------------

def test_graph_logging_through_the_graph_code_artifact(nano):
    _, _, gm = nano
    from moe_passes.passes import manager

    records = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    manager._graph_code_log.addHandler(handler)  # torch's loggers do not propagate to the root
    torch._logging.set_logs(graph_code=True)
    try:
        run_pipeline(gm)
    finally:
        torch._logging.set_logs()
        manager._graph_code_log.removeHandler(handler)
    assert "__graph_code" in manager._graph_code_log.name
    labels = [r.getMessage() for r in records if "moe_nvfp4 " in r.getMessage()]
    assert any("moe_nvfp4 before lower_fused_moe" in m and "fused_moe" in m for m in labels)
    after = [m for m in labels if "moe_nvfp4 after lower_fused_moe" in m]
    assert after and "trtllm_nvfp4_moe" in after[0] and "constant_pad_nd" in after[0]


def test_torch_logs_env_shows_pass_graphs(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import torch
        from moe_passes.testing import MoEProblem
        p = MoEProblem(hidden=320, intermediate=64, experts=2, top_k=1, shared=32)
        block = p.build()
        torch.compile(block, backend="moe_nvfp4", options={"inner": "eager"})(*p.inputs(3))
    """))
    # The script must import this checkout, not whichever moe_passes is installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TORCH_LOGS="graph_code",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "moe_nvfp4 after lower_fused_moe" in out.stderr


def test_dump_dir_writes_every_pass_graph(nano, tmp_path):
    problem, block, _ = nano
    torch._dynamo.reset()
    backend = RecordingBackend(inner="eager", dump_dir=tmp_path)
    with no_silent_fallback():
        torch.compile(block, backend=backend, dynamic=True)(*problem.inputs(3, seed=3))
    ours = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("moe_nvfp4_"))
    assert [name.split("_", 3)[3] for name in ours] == [
        "before_lower_fused_moe.py", "after_lower_fused_moe.py", "before_verify_moe_shapes.py",
        "after_verify_moe_shapes.py"]
    before = (tmp_path / ours[0]).read_text()
    after = (tmp_path / ours[1]).read_text()
    assert "fused_moe" in before and "trtllm_nvfp4_moe" not in before
    assert "trtllm_nvfp4_moe" in after and "constant_pad_nd" in after and "slice" in after
    # depyf's own dump of Dynamo's graph lands there too.
    assert any(p.suffix == ".py" and not p.name.startswith("moe_nvfp4_") for p in tmp_path.rglob("*"))


def test_kit_pattern_failure_names_the_mismatch_and_shows_the_graph(nano):
    _, _, gm = nano
    after = run_passes(gm, LowerFusedMoE()).after
    with pytest.raises(AssertionError) as info:
        assert_pattern(after, "pad -> kernel -> add")
    text = str(info.value)
    assert "longest partial match" in text and "expected add" in text
    assert ">> %constant_pad_nd" in text and "aten.slice.Tensor" in text


# -- assert_pattern(exact=True) ------------------------------------------------------------------------

class _Residual(nn.Module):
    """A user model with other adds, slices and pads around the MoE block."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x, logits):
        h = torch.nn.functional.pad(x, (0, 4))[:, : x.shape[1]] + 1.0
        return h + self.moe(h, logits)


@pytest.mark.parametrize("path, name", [("L['self'].blocks.0.moe", "blocks.0.moe"), ("L['model'].moe", "moe"),
                                        ("L__self___blocks_0_moe", "blocks_0_moe"),
                                        ("G['glob_model'].blocks.0.moe", "glob_model.blocks.0.moe")])
def test_unnamed_layers_are_named_by_their_module_path(path, name):
    """Dynamo's module paths lose its scope prefixes; a module-level model keeps its variable's name."""
    from moe_passes.passes.lower_fused_moe import layer_name

    node = torch.fx.Graph().placeholder("x")
    node.meta["nn_module_stack"] = {"outer": ("L['self']", nn.Module), "inner": (path, nn.Module)}
    assert layer_name(node) == name


def test_trace_with_inductor_gives_the_graph_after_its_post_grad_rewrites():
    """inner="inductor": the graph a default compile's passes get, where the shared expert's last mm and the
    add after it are already one addmm; the kit's default (eager) graph still has the add."""
    problem = MoEProblem(hidden=272, intermediate=64, experts=4, top_k=2, shared=32)
    block, (x, logits) = problem.build(), problem.inputs(5)
    counts = {}
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        targets = [n.target for n in trace(block, x, logits, inner=inner).graph.nodes]
        counts[inner] = (targets.count(torch.ops.aten.addmm.default), targets.count(torch.ops.aten.add.Tensor))
    assert counts == {"eager": (0, 1), "inductor": (1, 0)}


def test_assert_close_never_passes_non_finite_values():
    """NaN compares as no error (NaN > tol is False): a NaN or inf on either side must fail, not pass."""
    from moe_passes.testing import assert_close

    good = torch.randn(3, 8).bfloat16()
    assert_close(good, good.clone())
    for bad_value in (float("nan"), float("inf")):
        bad = good.clone()
        bad[1, 2] = bad_value
        with pytest.raises(AssertionError, match="non-finite values in the expected value"):
            assert_close(good, bad)
        with pytest.raises(AssertionError, match="non-finite values in the result"):
            assert_close(bad, good)


def test_exact_pattern_is_about_the_chain_not_the_whole_graph():
    """The documented ``pad -> trtllm_nvfp4_moe -> slice -> add`` with ``exact=True`` holds on a model
    that has other pads, slices and adds of its own."""
    problem = _problem(320)
    gm = trace(_Residual(problem.build().moe), *problem.inputs(tokens=3))
    run = run_pipeline(gm)
    assert run.op_count("add") >= 3 and run.op_count("pad") == 2
    (chain,) = run.assert_pattern("pad -> trtllm_nvfp4_moe -> slice -> add", exact=True, count=1)
    assert chain[0].args[1] == [0, 512 - 320] and chain[2].args[1:] == (1, 0, 320)


def test_exact_pattern_rejects_a_value_used_off_the_chain(nano):
    _, _, gm = nano
    after = run_passes(gm, LowerFusedMoE()).after
    (kernel,) = [n for n in after.graph.nodes if n.target is KERNEL_OP]
    with after.graph.inserting_after(kernel):
        leak = after.graph.call_function(aten.clone.default, (kernel,))
    assert_pattern(after, "pad -> kernel -> slice -> add")  # the chain is there ...
    with pytest.raises(AssertionError) as info:  # ... but the padded output also goes elsewhere
        assert_pattern(after, "pad -> kernel -> slice -> add", exact=True)
    text = str(info.value)
    assert f"%{kernel.name}" in text and f"%{leak.name} (aten.clone.default)" in text and "off the chain" in text
    assert_pattern(after, "slice -> add", exact=True)  # the chain's own values still only go along it


def _two_mm_chains(complete_second: bool) -> torch.fx.GraphModule:
    def f(x, y):
        first = aten.relu.default(aten.add.Tensor(aten.mm.default(x, y), x))
        second = aten.add.Tensor(aten.mm.default(x, y), y)
        return first, aten.relu.default(second) if complete_second else aten.neg.default(second)
    return torch.fx.symbolic_trace(f)


def test_exact_pattern_rejects_a_chain_that_starts_and_stops():
    complete, partial = _two_mm_chains(True), _two_mm_chains(False)
    assert len(assert_pattern(complete, "mm -> add -> aten.relu", exact=True)) == 2
    assert len(assert_pattern(partial, "mm -> add -> aten.relu")) == 1
    with pytest.raises(AssertionError, match=r"partial match %mm_default_1 -> %add_tensor_1; .*expected aten.relu"):
        assert_pattern(partial, "mm -> add -> aten.relu", exact=True)


def test_exact_pattern_rejects_fan_out_and_count_zero_means_none(nano):
    """Two full chains through one kernel (its padded output feeding a second slice and add) are a value used off
    its chain, whatever the count; count=0 asserts that a chain is absent; a plain linear chain whose first op
    repeats inside it is exact."""
    _, _, gm = nano
    after = run_passes(gm, LowerFusedMoE()).after
    (kernel,) = [n for n in after.graph.nodes if n.target is KERNEL_OP]
    (slice_,) = [u for u in kernel.users if u.target is aten.slice.Tensor]
    with after.graph.inserting_after(slice_):
        other = after.graph.call_function(aten.slice.Tensor, (kernel, 1, 0, slice_.args[3]))
        extra = after.graph.call_function(aten.add.Tensor, (other, other))
    assert len(assert_pattern(after, "pad -> kernel -> slice -> add")) == 2
    with pytest.raises(AssertionError, match=f"%{kernel.name} is on the chain, but its output is also used off"):
        assert_pattern(after, "pad -> kernel -> slice -> add", exact=True)
    assert_pattern(after, "kernel -> mm", count=0)  # absent, as asserted
    with pytest.raises(AssertionError, match="found 2 chains, expected 0"):
        assert_pattern(after, "slice -> add", count=0)
    assert extra in after.graph.nodes

    def adds(x):
        return aten.add.Tensor(aten.add.Tensor(aten.add.Tensor(aten.add.Tensor(x, x), x), x), x)

    assert len(assert_pattern(torch.fx.symbolic_trace(adds), "add -> add -> add", exact=True)) == 2


def test_building_a_problem_leaves_the_global_generator_alone():
    problem = MoEProblem(hidden=64, intermediate=32, experts=4, top_k=2, shared=32)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        problem.build()
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1])  # the caller's seed still decides what it draws next
    assert torch.equal(problem.build().moe.shared_expert.up.weight, problem.build().moe.shared_expert.up.weight)


# -- the kit on a real model ---------------------------------------------------------------------------

def _tiny_converted_qwen3_moe():
    """Two Qwen3-MoE decoder layers (hidden 64, padded to 256 for the kernel), converted to FusedMoE."""
    transformers = pytest.importorskip("transformers")
    from moe_passes.integrations.transformers import convert

    config = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                         max_position_embeddings=64, norm_topk_prob=True)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    report = convert(model, calibration=torch.randint(0, 128, (2, 8)))
    assert len(report.converted) == 2
    return model


@pytest.fixture(scope="module")
def qwen3_cached():
    """The converted model called once with a KV cache, eager and compiled through a RecordingBackend."""
    model = _tiny_converted_qwen3_moe()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    backend = RecordingBackend(inner="eager")
    with torch.no_grad():
        want = model(ids, use_cache=True)
        got = torch.compile(model, backend=backend)(ids, use_cache=True)
    torch._dynamo.reset()
    return backend, want, got


def test_recording_backend_on_a_transformers_model_with_kv_cache(qwen3_cached):
    """A cached call puts real tensor constants (the empty cache's tensors) into the ATen graph; the kit's
    snapshots must not clone them (under the compile's fake mode that fails, on a real model it would copy
    the weights once per snapshot)."""
    backend, want, got = qwen3_cached
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for layer in range(2):
        torch.testing.assert_close(got.past_key_values.layers[layer].keys, want.past_key_values.layers[layer].keys)
    record = next(r for r in backend.compiles if r.after is not None and r.op_count("kernel"))
    assert record.op_count("fused_moe", before=True) == 2
    record.assert_pattern("pad -> kernel -> slice", count=2)
    constants = [name for name, _ in record.after.named_buffers()]
    assert constants, "the cached call is expected to carry tensor constants into the graph"
    # The snapshot shares the compile's tensors instead of cloning them, and can be verified again.
    assert all(getattr(record.after, name) is getattr(record.before, name) for name in constants)
    verify(record.after)


def test_exact_pattern_on_a_transformers_model(qwen3_cached):
    """Rotary embeddings, the cache update and residual adds put many other slices and adds in the graph."""
    backend, _, _ = qwen3_cached
    record = next(r for r in backend.compiles if r.after is not None and r.op_count("kernel"))
    assert record.op_count("slice") > 2 and record.op_count("pad") == 2
    record.assert_pattern("pad -> kernel -> slice", exact=True, count=2)


# -- the docs' examples --------------------------------------------------------------------------------

def _doc_files_and_commands(text: str):
    """docs/testing.md's files (python blocks starting ``# path.py``) and, per test file, the shell commands
    of the first bash block after it that names it."""
    files, commands, last_tests = {}, {}, []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        first = body.splitlines()[0] if body.strip() else ""
        if lang == "python" and first.startswith("# ") and first.endswith(".py"):
            path = first[2:].strip()
            files[path] = body
            last_tests = [path] if path.startswith("tests/") else last_tests
        elif lang == "bash":
            for path in last_tests:
                commands.setdefault(path, [line for line in body.splitlines() if path in line])
    return files, commands


def test_docs_testing_examples_run_with_the_commands_they_state(tmp_path):
    """Every test file in docs/testing.md states the command that runs it, and that command passes all of
    its tests in a fresh project folder holding the docs' files."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "testing.md")) as f:
        files, commands = _doc_files_and_commands(f.read())
    tests = sorted(p for p in files if p.startswith("tests/"))
    assert tests, "docs/testing.md has no test files"
    missing = [p for p in tests if not commands.get(p)]
    assert not missing, f"docs/testing.md states no command (a bash block naming the file) for {missing}"
    for path, body in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for path in tests:
        for command in commands[path]:
            argv = command.split()
            argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
            out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            expected = len(re.findall(r"^def test_", files[path], re.M))
            assert out.returncode == 0 and f"{expected} passed" in out.stdout, (
                f"`{command}` from docs/testing.md:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
