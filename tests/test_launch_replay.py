"""``triton_launch.record`` / ``Replay`` on the CPU: a recorded call's launches repeat with each call's own input,
output and workspace addresses, keyed tensors as recorded and kernel state kept alive; a dry run that computes
with torch, launches nothing or returns no allocation of its own is refused.

The stand-in kernels run on host memory through the integer addresses the replay hands them (ctypes), so a
wrong address gives a wrong result, not only a wrong number.  The Triton path is checked on the GPU
(tests/test_gpu_launch_replay.py)."""

from __future__ import annotations

import ctypes
import functools
import gc
import types
import weakref

import pytest
import torch

from moe_passes.kernels import graphed, registry, triton_launch
from moe_passes.kernels.triton_launch import Refused, record


def _at(address: int, n: int) -> torch.Tensor:
    """``n`` float32 at a host address, shared (writes land there)."""
    return torch.frombuffer((ctypes.c_char * (4 * n)).from_address(address), dtype=torch.float32, count=n)


class _Kernel:
    """A launchable as the replay sees a compiled kernel: ``run(gx, gy, gz, stream, function, metadata, hooks...,
    *values)`` with pointers as integers."""

    def __init__(self, body):
        self.body, self.function, self.packed_metadata, self.grids = body, object(), object(), []

    def run(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter, exit_, *values):
        assert function is self.function and metadata is self.packed_metadata and stream == 7
        self.grids.append((gx, gy, gz))
        self.body(*values)


def _scale(x_ptr, y_ptr, n, a):
    _at(y_ptr, n).copy_(a * _at(x_ptr, n))


def _add3(y_ptr, w_ptr, s_ptr, out_ptr, n, flag):
    assert flag is None
    _at(out_ptr, n).copy_(_at(y_ptr, n) + _at(w_ptr, n) + _at(s_ptr, n))


SCALE, ADD3 = _Kernel(_scale), _Kernel(_add3)


@pytest.fixture
def stub_triton(monkeypatch):
    """The replay's view of Triton: no launch hook, device 0, stream 7."""
    runtime = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    monkeypatch.setattr(triton_launch, "knobs", types.SimpleNamespace(runtime=runtime))
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(triton_launch, "driver", types.SimpleNamespace(active=active))
    return runtime


def _call(x, w, state, a):
    """What a kernel entry point does: allocate, view, launch twice, return its output."""
    n = x.shape[0]
    recorder = triton_launch._RECORDER.get()
    workspace = torch.empty(2 * n + 3)
    y = workspace[3:3 + n]  # a view at an offset into an allocation
    out = torch.empty(n)
    scratch = torch.empty(5, dtype=torch.int64).view(torch.float64)  # allocated, never launched on
    assert scratch.numel() == 5
    recorder.add(SCALE, (2,), (x[1:], y[1:], n - 1, a), 0)  # views into the input and the workspace
    recorder.add(ADD3, (1, 2), (y, w, state, out, n, None), 0)
    return out


def test_a_replay_runs_on_each_calls_own_memory(stub_triton):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    n, a = 37, 1.5
    w = torch.randn(n, generator=g, dtype=torch.float64).float()  # keyed: passed by address as recorded
    state = torch.randn(n, generator=g)  # kernel state: the replay keeps it alive
    x0 = torch.randn(n, generator=g)
    replay = record(functools.partial(_call, x0, w, state, a), (x0,), (w,))
    assert SCALE.grids == [] and ADD3.grids == []  # the dry run launched nothing
    state_ref = weakref.ref(state)
    expect_state = state.clone()
    del state
    gc.collect()
    assert state_ref() is not None
    outs = []
    for _ in range(3):
        x = torch.randn(n + 4, generator=g)[4:]  # fresh memory every call, 16-byte aligned like x0
        assert x.data_ptr() % 16 == x0.data_ptr() % 16
        out = replay(x)
        assert torch.equal(out[1:], a * x[1:] + w[1:] + expect_state[1:])  # out[0]: workspace never written
        assert out.shape == (n,) and out.dtype == torch.float32
        outs.append(out)
    assert len({o.data_ptr() for o in outs}) == 3  # each call its own output, all alive
    assert SCALE.grids == [(2, 1, 1)] * 3 and ADD3.grids == [(1, 2, 1)] * 3


def test_a_replay_declines_other_alignments_and_launch_hooks(stub_triton):
    n = 16
    w, state, x0 = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    replay = record(lambda: _call(x0, w, state, 2.0), (x0,), (w,))
    spare = torch.ones(n + 1)
    assert replay(spare[1:]) is None  # 4 bytes off x0's alignment
    stub_triton.launch_enter_hook = types.SimpleNamespace(calls=[print])
    assert replay(torch.ones(n)) is None
    stub_triton.launch_enter_hook = types.SimpleNamespace(calls=[])  # Triton's empty hook chain
    assert torch.equal(replay(torch.ones(n))[1:], torch.full((n - 1,), 2.0))


def test_a_dry_run_that_computes_is_refused(stub_triton):
    x = torch.randn(8)

    def computes():
        out = torch.empty(8)
        triton_launch._RECORDER.get().add(SCALE, (1,), (x, out, 8, 1.0), 0)
        return out + 1  # a replay would skip this add

    with pytest.raises(Refused, match="aten.add"):
        record(computes, (x,), ())
    with pytest.raises(Refused, match="launched no kernel"):
        record(lambda: torch.empty(8), (x,), ())

    def returns_input():
        triton_launch._RECORDER.get().add(SCALE, (1,), (x, x, 8, 1.0), 0)
        return x

    with pytest.raises(Refused, match="output"):
        record(returns_input, (x,), ())

    def returns_part_of_an_allocation():  # a replay allocates the output alone: launches past it would overrun
        buffer = torch.empty(16)
        triton_launch._RECORDER.get().add(SCALE, (1,), (x, buffer, 16, 1.0), 0)
        return buffer[:8]

    with pytest.raises(Refused, match="output"):
        record(returns_part_of_an_allocation, (x,), ())
    assert triton_launch._RECORDER.get() is None  # nothing left recording after a refusal


def test_a_launch_on_another_device_is_refused(stub_triton):
    x = torch.randn(8)

    def two_devices():
        out = torch.empty(8)
        recorder = triton_launch._RECORDER.get()
        recorder.add(SCALE, (1,), (x, out, 8, 1.0), 0)
        recorder.add(SCALE, (1,), (x, out, 8, 1.0), 1)
        return out

    with pytest.raises(Refused, match="two devices"):
        record(two_devices, (x,), ())


def test_repeats_never_evict_captured_records(monkeypatch):
    """Keys that are never captured (``capture=False``: every prefill length) have a table of their own: however
    many there are, the small calls' records stay, and each table drops its own least recently used."""
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    graphs = graphed.CallGraphs(max_graphs=3)
    args = registry.RunArgs(top_k=1, activation="silu", routing="renormalize")
    weights = registry.MoEWeights(*(torch.zeros(1) for _ in range(6)))
    ran = []

    def fn(x, logits, *rest):
        ran.append(("entry", x.shape[0]))
        return 2 * x

    def direct(x, logits, *rest):
        def repeat(x, logits):
            ran.append(("repeat", x.shape[0]))
            return 2 * x
        return repeat

    def call(tokens: int, capture: bool):
        x = torch.randn(tokens, 4)
        got = graphs.run(fn, "k", x, torch.zeros(tokens, 2), weights, (None, None, None), args, None, direct,
                         key=("layer",), capture=capture)
        assert torch.equal(got, 2 * x)
        return ran[-1]

    assert [call(1, True) for _ in range(3)] == [("entry", 1), ("repeat", 1), ("repeat", 1)]
    for tokens in range(100, 110):
        assert [call(tokens, False) for _ in range(2)] == [("entry", tokens), ("repeat", tokens)]
    assert call(1, True) == ("repeat", 1)  # ten repeat keys later, the small call's record is still there
    assert call(109, False) == ("repeat", 109) and call(100, False) == ("entry", 100)  # 100 was dropped
    assert len(graphs) == 1 + 2
