"""Small MoE calls replayed from CUDA graphs that the kernel captures for itself.

Without CUDA graphs, a one-token call spends far more time on the host (routing set-up, planning, a handful of
Triton and driver launches: 150-550 us measured on an H100 host) than on the GPU (tens of us), so a model
compiled in the default mode ran its MoE layers at the host's pace.  For calls of at most the kernel's
``KernelSpec.graph_tokens`` tokens, :class:`CallGraphs` captures the whole kernel call once per (stream, token count,
weights) and afterwards replays it: a copy of the inputs into the graph's static buffers, one graph launch,
a copy of the output out.

Safety rests on three rules:

* every tensor a captured call reads is either a key of the graph (the weights, the scales, the routing
  bias and the expert biases, by address, shape and dtype; the inputs, by shape and dtype, copied in) or
  state the kernel keeps for the life of the process (``KernelSpec.prepare_state``); so a graph is replayed
  only on the memory it captured, or on memory at the same address and of the same shape, which it reads
  exactly as a fresh call would;
* each (device, caller stream) has its own capture stream and memory pool, and its graphs replay in that
  stream's order, never concurrently, so intermediates that graphs of one pool share are dead between calls;
* a call made while the stream is already being captured (``mode="reduce-overhead"``) runs the kernel
  directly: the outer graph holds it.

The first call with a new key runs eagerly (it compiles the kernels and makes lazily created state outside
any capture); the second captures and replays.

A kernel whose call is a single launch gains nothing from a graph: the copies in and out cost more host time
than the launch.  Its ``KernelSpec.direct`` returns, at the second call, a repeat of the call with its launch
bound once (the one-token CUDA decode, ``cuda_decode.DecodeCall``), kept under the same key and the same rules
in place of a graph.

Calls above ``graph_tokens`` are never captured (a graph per token count would hold a memory pool per prefill
length), but the same cache keeps their repeats, in a table of its own (many prefill lengths must not evict the
small calls' graphs): ``KernelSpec.replay`` returns, at the second call, the call's launches recorded once
(``triton_launch.Replay``), repeated on each call's own inputs and freshly allocated output and workspace;
where it refuses, the key remembers that and the kernel runs each call itself.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Optional

import torch

from moe_passes.kernels import options as kernel_options

# Records kept per process and table (graphs, repeats) before the least recently used is dropped (a graph holds
# its static buffers).
MAX_GRAPHS = 4096

_WARMED = object()  # a key seen once: the next call with it captures
_UNREPEATED = object()  # a key whose call has no repeat and must not be captured: the kernel runs it


def tensor_key(t: Optional[torch.Tensor]):
    """A tensor by address, shape, strides and dtype (None stays None): under unified virtual addressing the
    address names its device too, CPU memory included."""
    if t is None:
        return None
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


class _Captured:
    __slots__ = ("graph", "hidden_states", "router_logits", "out")

    def __init__(self, graph, hidden_states, router_logits, out):
        self.graph, self.hidden_states, self.router_logits, self.out = graph, hidden_states, router_logits, out

    def __call__(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        self.hidden_states.copy_(hidden_states)
        self.router_logits.copy_(router_logits)
        self.graph.replay()
        return self.out.clone()


class CallGraphs:
    """A process-wide cache of captured kernel calls (see the module docstring)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS):
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        # Calls that are never captured (capture=False) in a table of their own, so that many prefill lengths
        # cannot evict the small calls' graphs, each of which costs a capture to make again.
        self._repeats: collections.OrderedDict = collections.OrderedDict()
        self._streams: dict = {}  # (device index, caller stream id) -> (capture stream, memory pool)
        self.max_graphs = max_graphs
        # Copy in, replay and copy out of one graph must not interleave with another thread's on the same stream.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(1 for table in (self._graphs, self._repeats) for v in table.values()
                   if v is not _WARMED and v is not _UNREPEATED)

    def clear(self) -> None:
        self._graphs.clear()
        self._repeats.clear()
        self._streams.clear()

    def run(self, fn: Callable[..., torch.Tensor], name: str, hidden_states: torch.Tensor,
            router_logits: torch.Tensor, weights, scales: tuple, args, biases: Optional[dict] = None,
            direct: Optional[Callable] = None, key=None, capture: bool = True) -> torch.Tensor:
        """``fn(hidden_states, router_logits, weights, *scales, args, **biases)``, replayed from a graph when one
        exists.

        ``scales``: the remaining tensor (or None) arguments in ``fn``'s order; ``args``: the call's
        ``RunArgs`` (hashable); ``biases``: keyword tensors (the expert biases), keys of the graph like the
        weights.  The options in force (``args.options`` or the scoped default) are part of the key; with
        ``call_graphs`` off, or while the stream is capturing, ``fn`` runs directly.  ``direct`` (the kernel's
        ``KernelSpec.direct``, same arguments as ``fn``) may return, instead of a graph, a cheaper repeat of
        the call: ``repeat(hidden_states, router_logits)`` -> output, or None where it refuses (``fn`` runs).
        ``key``: a hashable the caller already built that determines all of the above but the inputs' shapes
        and dtypes, the stream and the options (the op's memoized-check key, ``ops._checked_call``, taken before
        ``fused_moe`` gathers and pads its inputs); None builds one here.  ``capture=False``: a call that
        ``direct`` does not repeat runs ``fn`` every time instead of being captured.
        """
        biases = biases or {}
        options = kernel_options.current(args.options)
        contiguous = hidden_states.is_contiguous() and router_logits.is_contiguous()
        if not options.call_graphs or torch.cuda.is_current_stream_capturing() or not contiguous:
            return fn(hidden_states, router_logits, weights, *scales, args, **biases)
        device = hidden_states.device.index
        if key is None:
            key = (name, device, tuple(tensor_key(t) for t in weights), tuple(tensor_key(t) for t in scales),
                   tuple((k, tensor_key(v)) for k, v in sorted(biases.items())), args)
        # The inputs as the graph sees them (a caller's key may predate a gather or pad that changes them; a
        # replay copies them in, and copy_ would broadcast a smaller input).  The raw stream handle, not a Stream
        # object: building one costs more than the rest of a hit.
        key = (key, hidden_states.shape, hidden_states.dtype, router_logits.shape, router_logits.dtype,
               torch._C._cuda_getCurrentRawStream(device), options)
        table = self._graphs if capture else self._repeats
        with self._lock:
            entry = table.get(key)
            if entry is None:
                self._remember(table, key, _WARMED)
            elif entry is _WARMED:
                entry = None if direct is None else direct(hidden_states, router_logits, weights, *scales, args,
                                                           **biases)
                if entry is None and capture:
                    entry = self._capture(key, torch.cuda.current_stream(hidden_states.device), fn, hidden_states,
                                          router_logits, weights, scales, args, biases)
                else:
                    self._remember(table, key, _UNREPEATED if entry is None else entry)
            else:
                table.move_to_end(key)
                if entry is _UNREPEATED:
                    entry = None
            if entry is not None:
                out = entry(hidden_states, router_logits)
                if out is not None:
                    return out
                table.pop(key, None)  # a repeat that refused; the next call warms the key again
        return fn(hidden_states, router_logits, weights, *scales, args, **biases)

    def _remember(self, table: collections.OrderedDict, key, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_graphs:
            table.popitem(last=False)

    def _capture(self, key, stream, fn, hidden_states, router_logits, weights, scales, args, biases) -> _Captured:
        device = hidden_states.device
        side = self._streams.get((device.index, stream.cuda_stream))
        if side is None:
            side = (torch.cuda.Stream(device), torch.cuda.graph_pool_handle())
            self._streams[(device.index, stream.cuda_stream)] = side
        capture_stream, pool = side
        static_x = torch.empty_like(hidden_states)
        static_logits = torch.empty_like(router_logits)
        graph = torch.cuda.CUDAGraph()
        capture_stream.wait_stream(stream)
        with torch.cuda.stream(capture_stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                out = fn(static_x, static_logits, weights, *scales, args, **biases)
            finally:
                graph.capture_end()
        stream.wait_stream(capture_stream)
        entry = _Captured(graph, static_x, static_logits, out)
        self._remember(self._graphs, key, entry)
        return entry


CALL_GRAPHS = CallGraphs()
