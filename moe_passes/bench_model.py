"""``moe-nvfp4 bench --model NAME``: a transformers MoE model end to end, bf16 against NVFP4, in one process.

The model is built from a transformers config with a real model's layer shapes (:data:`PRESETS`), ``--layers``
decoder layers, random bf16 weights, directly on the device (nothing is downloaded).  Two variants run one after
the other on the same weights:

* ``bf16``: the model as built, ``torch.compile(model.forward, mode="reduce-overhead")`` (inductor);
* ``nvfp4``: the same model after :func:`moe_passes.integrations.transformers.convert` (in place, calibrated on
  random prompts), ``torch.compile(model.forward, backend="moe_nvfp4", mode="reduce-overhead")``.

For each variant, one compiled ``forward`` (``fullgraph``, static shapes: every batch size and the prefill get
their own graph) measures:

* **decode**: one token per sequence against a ``StaticCache``, after an eager 64-token prompt, at each batch
  size.  Each step feeds back the previous step's greedy token (an argmax on the device, as ``generate`` does).
  Steps are timed one by one (CUDA events, synchronized after each step, as ``generate``'s stopping check
  does) in rounds of ``--steps``; before every round the cache is rewound to the prompt, so positions stay
  within ``prompt + steps`` and every round decodes the same positions.  The static cache's attention always
  spans its full length (``--cache-len``, default the prompt plus the steps, rounded up to 64), so the rewind
  does not change the work of a step.  The same rounds are also timed back to back, synchronized once per round
  (``pipelined_ms``): the step's cost when the CPU can run ahead of the GPU.
* **prefill**: one forward of ``--prefill`` tokens at batch 1 without a cache, logits for the last token only
  (as ``generate``'s prefill asks for).
* **compile**: wall time of each graph's first call (trace, passes, inductor, and the first run; the CUDA graph
  is recorded on a later call).  The FX-graph and AOT-autograd caches are turned off for the compile, so a repeat
  run does not read its own disk cache (Triton's kernel cache on disk may still be warm; ``--warm-cache`` keeps
  them on).
* **profile**: ``torch.profiler`` over ``--profile-steps`` decode steps per batch size: CUDA kernels per step,
  the union of GPU activity per step (kernels, copies, memsets), and that over the median step time (GPU busy).
* **logit error**: ``||nvfp4 - bf16|| / ||bf16||`` of the first decode step's logits (same prompt, same input
  token) at each batch size.

Writes a JSON file (default ``benchmarks/results/<date>-<device>-e2e-<model>.json``) and, when matplotlib is
installed, a PNG next to it.  ``--device cpu --tiny`` runs the same code on a scaled-down config on the CPU with
no CUDA graphs (a smoke test: its timings mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import inspect
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import torch

__all__ = ["Preset", "PRESETS", "TARGETS", "build_config", "build_model", "make_static_cache", "main"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model family's config with a real model's shapes, and the same family scaled down for a CPU."""

    config_class: str
    model_class: str
    shapes: dict
    tiny: dict
    # the config key holding per-layer types and the real model's repeating pattern (hybrid models)
    layer_pattern: Optional[tuple] = None
    note: str = ""


PRESETS: dict[str, Preset] = {
    "qwen3-30b-a3b": Preset(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        shapes=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                    num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    vocab_size=151936, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
                    decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
        tiny=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                  norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)),
    "deepseek-v3": Preset(
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        # every one of the N layers is an MoE layer (the real model's first three are dense)
        shapes=dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
                    num_experts_per_tok=8, n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                    norm_topk_prob=True, first_k_dense_replace=0, num_attention_heads=128, num_key_value_heads=128,
                    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                    vocab_size=129280, max_position_embeddings=163840, tie_word_embeddings=False),
        tiny=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                  num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                  norm_topk_prob=True, first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                  vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False),
        note="bf16 weights are 22.5 GiB per layer: --layers 1 or 2 on an 80 GB card"),
    "nemotron-3-nano": Preset(
        "NemotronHConfig", "NemotronHForCausalLM",
        shapes=dict(hidden_size=2688, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
                    n_routed_experts=128, num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                    norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                    mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
                    vocab_size=131072, tie_word_embeddings=False),
        tiny=dict(hidden_size=64, moe_intermediate_size=32, moe_shared_expert_intermediate_size=64,
                  n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                  norm_topk_prob=True, num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=4,
                  mamba_head_dim=16, ssm_state_size=16, n_groups=2, intermediate_size=64, vocab_size=512,
                  tie_word_embeddings=False),
        # Mamba-2, MoE, ..., attention: the real model's 52 layers repeat this mix (23 / 23 / 6)
        layer_pattern=("layers_block_type", ("linear_attention", "moe", "linear_attention", "moe",
                                             "linear_attention", "full_attention", "moe")),
        note="the Mamba-2 layers' shapes are from public model cards, not checked against config.json"),
    "gemma-4-26b-a4b": Preset(
        "Gemma4TextConfig", "Gemma4ForCausalLM",
        shapes=dict(hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, enable_moe_block=True,
                    num_experts=128, top_k_experts=8, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                    sliding_window=1024, vocab_size=262144),
        tiny=dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=32, enable_moe_block=True,
                  num_experts=8, top_k_experts=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  sliding_window=256, vocab_size=512, vocab_size_per_layer_input=512, hidden_size_per_layer_input=16),
        layer_pattern=("layer_types", ("sliding_attention",) * 5 + ("full_attention",)),
        note="attention and dense-MLP sizes are from public model cards, not checked against config.json"),
    "gpt-oss-20b": Preset(
        "GptOssConfig", "GptOssForCausalLM",
        shapes=dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
                    vocab_size=201088, swiglu_limit=7.0, tie_word_embeddings=False),
        tiny=dict(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128, vocab_size=512,
                  tie_word_embeddings=False),
        layer_pattern=("layer_types", ("sliding_attention", "full_attention")),
        note="a decode cache longer than the 128-token window is refused (--prompt plus --steps at most 128)"),
}

# Issue 26's targets: nvfp4 over bf16 decode speed-up per batch size, prefill speed-up, the share of nvfp4's
# decode step the GPU is busy, and nvfp4's first-call compile time over bf16's.
TARGETS = dict(decode_speedup={1: 1.6, 16: 1.8, 64: 1.5}, prefill_speedup=1.3, gpu_busy_fraction=0.9,
               compile_ratio=1.5)


# -- the model ------------------------------------------------------------------------------------------------
def build_config(name: str, layers: int, *, tiny: bool = False):
    """The preset's transformers config with ``layers`` decoder layers (raises LookupError when this
    transformers has no such config class)."""
    import transformers

    preset = PRESETS[name]
    config_cls = getattr(transformers, preset.config_class, None)
    if config_cls is None:
        raise LookupError(f"transformers {transformers.__version__} has no {preset.config_class}")
    kwargs = dict(preset.tiny if tiny else preset.shapes)
    if preset.layer_pattern is not None:
        key, pattern = preset.layer_pattern
        kwargs[key] = [pattern[i % len(pattern)] for i in range(layers)]
    kwargs["num_hidden_layers"] = layers
    return config_cls(**kwargs)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Parameters are created in this dtype: no float32 copy of a 151936 x 2048 embedding first.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(name: str, config, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The preset's model class on ``device`` in ``dtype`` with transformers' random initialization."""
    import transformers

    model_cls = getattr(transformers, PRESETS[name].model_class)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(config)
    return model.eval().requires_grad_(False)


class BenchSettingsError(ValueError):
    """Settings the model cannot run with (found once it is built): reported as one line, exit code 2."""


def make_static_cache(config, max_cache_len: int, batch: int, device: torch.device, dtype: torch.dtype):
    """A transformers ``StaticCache`` for ``batch`` sequences.  transformers 5.x allocates it lazily at the first
    update (run that eagerly, before compiling); older releases took the batch, device and dtype up front."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs: dict[str, Any] = dict(config=config, max_cache_len=max_cache_len)
    for key, value in (("max_batch_size", batch), ("batch_size", batch), ("device", device), ("dtype", dtype)):
        if key in params:
            kwargs[key] = value
    cache = StaticCache(**kwargs)
    window = getattr(config.get_text_config(), "sliding_window", None)
    if window is not None and any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        if window < max_cache_len:
            raise BenchSettingsError(f"a static cache of {max_cache_len} tokens outgrows the sliding window "
                                     f"({window}): transformers' sliding static layers would recompile the model "
                                     "every decode step; lower --cache-len or --prompt/--steps")
        _unslide(cache, max_cache_len)
    return cache


def _unslide(cache, max_cache_len: int) -> None:
    """Replace the sliding-window layers of a cache that their window covers with plain static layers.

    Exact: a window at least ``max_cache_len`` long never drops a cached token.  Needed because transformers'
    sliding static layer counts its length in a Python int, so every decode step is a new Dynamo guard (a
    recompile per step, then the recompile limit) and rewinding cannot reset it.
    """
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers if isinstance(layers, list) else ()):
        if getattr(layer, "is_sliding", False) and isinstance(layer, StaticLayer):
            layers[i] = StaticLayer(max_cache_len=max_cache_len)


def _rewind(cache, length: int) -> None:
    """Set every attention layer's cache length back to ``length`` (in place: the tensors keep the static
    addresses the CUDA graphs read).  Recurrent (Mamba) state just keeps evolving, at the same cost per step."""
    rewound = 0
    for layer in getattr(cache, "layers", ()):
        cumulative = getattr(layer, "cumulative_length", None)
        if isinstance(cumulative, torch.Tensor):
            cumulative.fill_(length)
            rewound += 1
    if not rewound:
        raise RuntimeError(f"cannot rewind {type(cache).__name__}: no layer keeps a cumulative_length tensor "
                           "(this transformers release lays the static cache out differently)")


def _cache_kwarg(model) -> str:
    # transformers 5.2x renamed the forward's past_key_values to cache (the old name is deprecated)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# -- timing --------------------------------------------------------------------------------------------------
class _Clock:
    """Per-call times: CUDA events on a GPU (the stream's time between two calls), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1e3
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    def wall(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start


def _summary(seconds: list) -> dict:
    ms = [s * 1e3 for s in seconds]
    return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), samples=len(ms))


def _gpu_activity(trace_path: str, steps: int) -> dict:
    """Kernels per step, GPU busy time per step (the union of kernel, copy and memset intervals) and the
    kernels that take the most time, from a chrome trace of ``steps`` decode steps."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    busy_us, end = 0.0, -math.inf
    for start, stop in sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in gpu):
        if stop <= end:
            continue
        busy_us += stop - max(start, end)
        end = stop
    per_name: dict[str, list] = {}
    for e in kernels:
        entry = per_name.setdefault(e.get("name", "?"), [0, 0.0])
        entry[0] += 1
        entry[1] += float(e.get("dur", 0))
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:15]
    return dict(kernels_per_step=len(kernels) / steps, copies_per_step=(len(gpu) - len(kernels)) / steps,
                gpu_busy_ms_per_step=busy_us / 1e3 / steps,
                kernel_ms_per_step=sum(float(e.get("dur", 0)) for e in kernels) / 1e3 / steps,
                top_kernels=[dict(name=n[:160], calls_per_step=c / steps, ms_per_step=d / 1e3 / steps)
                             for n, (c, d) in top])


# -- one variant -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    batches: list
    prompt: int
    prefill: int
    cache_len: int
    warmup: int
    steps: int
    rounds: int
    profile_steps: int
    prefill_repeats: int
    mode: Optional[str]
    fullgraph: bool
    inner: str
    seed: int
    cold_compile: bool = True


def _compile(model, backend: str, settings: Settings) -> tuple[Callable, str]:
    """``model.forward`` compiled, and how (as a torch.compile call would spell it)."""
    kwargs: dict[str, Any] = dict(fullgraph=settings.fullgraph, dynamic=False)
    if settings.inner == "eager":  # the CPU smoke test: no inductor, no CUDA graphs
        if backend == "moe_nvfp4":
            return (torch.compile(model.forward, backend="moe_nvfp4", options={"inner": "eager"}, **kwargs),
                    'backend="moe_nvfp4", options={"inner": "eager"}')
        return torch.compile(model.forward, backend="aot_eager", **kwargs), 'backend="aot_eager"'
    if settings.mode is not None:
        kwargs["mode"] = settings.mode
    spelled = ", ".join(f"{k}={v!r}" for k, v in dict(backend=backend, **kwargs).items())
    return torch.compile(model.forward, backend=backend, **kwargs), spelled


@contextlib.contextmanager
def _compile_config(graphs: int, cold: bool):
    """Allow one recompile per graph; ``cold``: compile without the FX-graph and AOT-autograd disk caches."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with contextlib.ExitStack() as stack:
        stack.enter_context(dynamo_config.patch(**{limit: max(8, graphs + 2)}))
        if cold:
            stack.enter_context(inductor_config.patch(fx_graph_cache=False))
        if cold and hasattr(functorch_config, "enable_autograd_cache"):
            stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
        yield


def _compile_counters() -> dict:
    """Dynamo's and inductor's counters that say whether the CUDA graphs took: graphs compiled, graph breaks,
    graphs that fell back to no CUDA graph, and inputs copied into a graph's pool at every replay."""
    from torch._dynamo.utils import counters

    return dict(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()),
                cudagraph_skips=counters["inductor"]["cudagraph_skips"],
                cudagraph_non_static_inputs=counters["inductor"]["cudagraph_recorded_non_static_inputs"])


def _inputs(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    # From their own CPU generator, so both variants see the same tokens whatever ran before.
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 7919 + length)
    return torch.randint(0, vocab, (batch, length), generator=g)


def run_variant(label: str, model, backend: str, settings: Settings, device: torch.device, log=print) -> dict:
    """Decode steps at every batch size, the prefill, first-call times and a profile of one compiled variant.
    Returns the figures and, under ``"_first_logits"``, each batch size's first decode step's logits (CPU)."""
    clock = _Clock(device)
    cudagraphs = device.type == "cuda" and settings.mode is not None and "reduce-overhead" in settings.mode
    cache_kw = _cache_kwarg(model)
    vocab = model.config.get_text_config().vocab_size
    compiled, spelled = _compile(model, backend, settings)
    result: dict[str, Any] = dict(backend=backend, compile=spelled, weights_GiB=_model_bytes(model) / 2**30,
                                  first_calls_s={}, decode={}, profile={})
    first_logits = {}
    counters_before = _compile_counters()

    def step(ids, cache):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(input_ids=ids, **{cache_kw: cache}, use_cache=True)

    with torch.no_grad(), _compile_config(len(settings.batches) + 1, settings.cold_compile):
        for batch in settings.batches:
            cache = make_static_cache(model.config, settings.cache_len, batch, device, torch.bfloat16)
            prompt = _inputs(vocab, batch, settings.prompt, settings.seed).to(device)
            model(input_ids=prompt, **{cache_kw: cache}, use_cache=True, logits_to_keep=1)  # eager: allocates it
            token = _inputs(vocab, batch, 1, settings.seed + 1).to(device)
            first_calls = []
            out, seconds = clock.wall(lambda: step(token, cache))
            first_calls.append(seconds)
            first_logits[batch] = out.logits[:, -1].float().cpu()
            for _ in range(settings.warmup):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out, seconds = clock.wall(lambda: step(token, cache))
                first_calls.append(seconds)
            result["first_calls_s"][f"decode_b{batch}"] = first_calls
            times = []
            for _ in range(settings.rounds):
                _rewind(cache, settings.prompt)
                for _ in range(settings.steps):
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    out, seconds = clock.time(lambda: step(token, cache))
                    times.append(seconds)
            # The same rounds back to back, synchronized once per round: what the steps cost when the CPU can run
            # ahead (a serving loop that overlaps its scheduling); far below the figure above, a step waits on the CPU.
            pipelined = []
            for _ in range(settings.rounds):
                _rewind(cache, settings.prompt)

                def round_():
                    nonlocal out
                    for _ in range(settings.steps):
                        out = step(out.logits[:, -1].argmax(-1, keepdim=True), cache)

                pipelined.append(clock.time(round_)[1] / settings.steps)
            result["decode"][str(batch)] = dict(_summary(times), pipelined_ms=statistics.median(pipelined) * 1e3)
            d = result["decode"][str(batch)]
            log(f"  {label:6s} decode batch {batch:3d}: {d['median_ms']:8.3f} ms/step (min {d['min_ms']:.3f}, max "
                f"{d['max_ms']:.3f}; back to back {d['pipelined_ms']:.3f}; first call {first_calls[0]:.1f} s)")
            try:
                p = _profile(step, cache, out, settings, device, clock, result["decode"][str(batch)]["median_ms"])
            except Exception as exc:  # the timings above are worth keeping when the profiler fails
                p = dict(error=f"{type(exc).__name__}: {exc}"[:500])
                log(f"  {label:6s} profile batch {batch:3d} failed: {p['error']}")
            result["profile"][str(batch)] = p
            if p is not None and "error" not in p:
                log(f"  {label:6s} profile batch {batch:3d}: {p['kernels_per_step']:.0f} kernels/step, GPU busy "
                    f"{p['gpu_busy_ms_per_step']:.3f} ms/step = {p['gpu_busy_fraction']:.0%} of the step")
            del cache, out
        ids = _inputs(vocab, 1, settings.prefill, settings.seed + 2).to(device)

        def prefill():
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(input_ids=ids, use_cache=False, logits_to_keep=1)

        first_calls = []
        for _ in range(1 + settings.warmup):
            _, seconds = clock.wall(prefill)
            first_calls.append(seconds)
        result["first_calls_s"][f"prefill_{settings.prefill}"] = first_calls
        times = [clock.time(prefill)[1] for _ in range(settings.prefill_repeats)]
        result["prefill"] = dict(tokens=settings.prefill, batch=1, **_summary(times))
        log(f"  {label:6s} prefill {settings.prefill} tokens: {result['prefill']['median_ms']:8.3f} ms "
            f"(first call {first_calls[0]:.1f} s)")
        if device.type == "cuda" and settings.profile_steps > 0:
            def prefills():
                for _ in range(3):
                    prefill()
                    clock.sync()

            try:
                result["prefill"]["profile"] = _traced(prefills, 3, clock, result["prefill"]["median_ms"])
            except Exception as exc:
                result["prefill"]["profile"] = dict(error=f"{type(exc).__name__}: {exc}"[:500])
    result["compile_s"] = result["first_calls_s"][f"decode_b{settings.batches[0]}"][0]
    result["counters"] = {k: v - counters_before[k] for k, v in _compile_counters().items()}
    # The ptxas Triton keys this process's later compiles on (its cache key holds the version; warm_compile.py
    # compares processes).
    result["triton_ptxas_path"] = os.environ.get("TRITON_PTXAS_PATH")
    log(f"  {label:6s} {result['counters']}")
    if device.type == "cuda":
        result["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    result["_first_logits"] = first_logits
    del compiled
    return result


def _profile(step, cache, out, settings: Settings, device: torch.device, clock: _Clock, step_ms: float):
    if device.type != "cuda" or settings.profile_steps <= 0:
        return None
    _rewind(cache, settings.prompt)
    holder = [out]

    def steps():  # synchronized after every step, as the timed steps are
        for _ in range(settings.profile_steps):
            token = holder[0].logits[:, -1].argmax(-1, keepdim=True)
            holder[0] = step(token, cache)
            clock.sync()

    return _traced(steps, settings.profile_steps, clock, step_ms)


def _traced(calls: Callable[[], Any], count: int, clock: _Clock, call_ms: float) -> dict:
    """:func:`_gpu_activity` of ``calls()`` (``count`` calls) under the profiler; GPU busy over ``call_ms``."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        clock.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _, wall = clock.wall(calls)
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        activity = _gpu_activity(path, count)
    activity["steps"] = count
    activity["wall_ms_per_step_profiled"] = wall * 1e3 / count
    activity["gpu_busy_fraction"] = activity["gpu_busy_ms_per_step"] / call_ms
    return activity


# -- the run -----------------------------------------------------------------------------------------------------
def _rel_err(b: torch.Tensor, a: torch.Tensor) -> float:
    return float((b.float() - a.float()).norm() / a.float().norm())


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``; a name without a GPU model number -> its lowercase words."""
    match = re.search(r"\b([a-z]{1,2}\d{2,3}[a-z]?)\b", name.lower())
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _meta(device: torch.device, argv: list) -> dict:
    import platform

    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(date=now.date().isoformat(), time_utc=now.strftime("%H:%M:%S"), device=name,
                device_slug=device_slug(name) if device.type == "cuda" else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, transformers=transformers.__version__, triton=triton_version,
                command="moe-nvfp4 bench " + " ".join(argv), git_commit=_git_commit())


def _comparison(bf16: dict, nvfp4: dict, batches: list) -> dict:
    comp: dict[str, Any] = dict(
        decode_speedup={str(b): bf16["decode"][str(b)]["median_ms"] / nvfp4["decode"][str(b)]["median_ms"]
                        for b in batches},
        prefill_speedup=bf16["prefill"]["median_ms"] / nvfp4["prefill"]["median_ms"],
        compile_ratio=nvfp4["compile_s"] / bf16["compile_s"],
        logit_rel_err={str(b): _rel_err(nvfp4["_first_logits"][b], bf16["_first_logits"][b]) for b in batches})
    checks = {}
    for b, target in TARGETS["decode_speedup"].items():
        if str(b) in comp["decode_speedup"]:
            checks[f"decode_speedup_b{b}"] = dict(value=comp["decode_speedup"][str(b)], target=f">= {target}",
                                                  met=comp["decode_speedup"][str(b)] >= target)
    checks["prefill_speedup"] = dict(value=comp["prefill_speedup"], target=f">= {TARGETS['prefill_speedup']}",
                                     met=comp["prefill_speedup"] >= TARGETS["prefill_speedup"])
    for b, p in nvfp4["profile"].items():
        if p is not None and "error" not in p:
            checks[f"gpu_busy_b{b}"] = dict(value=p["gpu_busy_fraction"], target=f">= {TARGETS['gpu_busy_fraction']}",
                                            met=p["gpu_busy_fraction"] >= TARGETS["gpu_busy_fraction"])
    checks["compile_ratio"] = dict(value=comp["compile_ratio"], target=f"<= {TARGETS['compile_ratio']}",
                                   met=comp["compile_ratio"] <= TARGETS["compile_ratio"])
    comp["targets"] = checks
    return comp


def plot(data: dict, path: str) -> bool:
    """Decode step time per batch size and the prefill time, bf16 against nvfp4 (False without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    variants = data["variants"]
    batches = [str(b) for b in data["settings"]["batches"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[3, 1]))
    width = 0.38
    for i, (name, v) in enumerate(variants.items()):
        xs = [j + (i - 0.5) * width for j in range(len(batches))]
        ys = [v["decode"][b]["median_ms"] for b in batches]
        errs = [[y - v["decode"][b]["min_ms"] for y, b in zip(ys, batches)],
                [v["decode"][b]["max_ms"] - y for y, b in zip(ys, batches)]]
        ax1.bar(xs, ys, width, yerr=errs, capsize=3, label=f"{name} ({v['backend']})")
        ax2.bar([i], [v["prefill"]["median_ms"]], 0.6, label=name)
    if "comparison" in data:  # the speed-up over each pair of bars
        comp = data["comparison"]
        for j, b in enumerate(batches):
            top = max(v["decode"][b]["max_ms"] for v in variants.values())
            ax1.annotate(f"{comp['decode_speedup'][b]:.2f}x", (j, top), ha="center", va="bottom", fontsize=9)
        ax2.set_title(f"{comp['prefill_speedup']:.2f}x", fontsize=9)
    ax1.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax1.set_ylabel("ms per decode step (median, min-max)")
    ax1.legend(fontsize=8)
    ax2.set_xticks(range(len(variants)), list(variants))
    ax2.set_ylabel(f"ms per prefill of {data['settings']['prefill']} tokens")
    meta = data["meta"]
    fig.suptitle(f"{data['model']['name']}, {data['model']['layers']} layers, {meta['device']}, {meta['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _preflight(name: str) -> Optional[str]:
    """Why ``convert`` cannot run the preset's MoE blocks (checked on the tiny config on the CPU), or None."""
    import logging

    from moe_passes.integrations.transformers import convert

    try:
        config = build_config(name, 2 if PRESETS[name].layer_pattern is None else len(PRESETS[name].layer_pattern),
                              tiny=True)
    except LookupError as exc:
        return str(exc)
    model = build_model(name, config, torch.device("cpu"), torch.float32)
    logger = logging.getLogger("moe_passes.integrations.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the reasons are reported below, once
    try:
        report = convert(model)
    finally:
        logger.setLevel(level)
    if report.skipped or not report.converted:
        reasons = sorted({s.reason for s in report.skipped}) or ["no MoE block found"]
        return f"convert leaves its MoE blocks alone: {'; '.join(reasons)}"
    return None


def _default_out(meta: dict, model: str, tiny: bool) -> str:
    suffix = "-tiny" if tiny else ""
    return os.path.join("benchmarks", "results", f"{meta['date']}-{meta['device_slug']}-e2e-{model}{suffix}.json")


def _positive_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of integers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="moe-nvfp4 bench",
                                     description=__doc__.split("\n\n")[0].strip("`: "))
    parser.add_argument("--model", required=True, choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--batches", type=_positive_list, default=[1, 16, 64], help="decode batch sizes (1,16,64)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (64)")
    parser.add_argument("--prefill", type=int, default=2048, help="tokens of the timed prefill at batch 1 (2048)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed round (32)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size (5)")
    parser.add_argument("--warmup", type=int, default=5, help="calls after the first, before timing (5)")
    parser.add_argument("--profile-steps", type=int, default=10, help="profiled decode steps per batch size (10)")
    parser.add_argument("--prefill-repeats", type=int, default=10, help="timed prefills (10)")
    parser.add_argument("--cache-len", type=int, default=None,
                        help="static cache length (default: the prompt and the longest run of steps, rounded up "
                             "to 64)")
    parser.add_argument("--mode", default="reduce-overhead",
                        help="torch.compile mode of both variants ('none': no mode; the CPU ignores it)")
    parser.add_argument("--no-fullgraph", action="store_true", help="allow graph breaks")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's FX-graph and AOT-autograd disk caches on (faster repeat runs; the "
                             "first-call times then measure a warm compile)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the preset's family scaled down (CPU smoke test)")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor",
                        help="eager: bf16 under aot_eager and moe_nvfp4 with its eager inner compiler (no mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-<device>-e2e-"
                                                    "<model>.json); the PNG goes next to it")
    opts = parser.parse_args(argv)
    for flag in ("layers", "prompt", "prefill", "steps", "rounds", "prefill_repeats"):
        if getattr(opts, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("warmup", "profile_steps"):
        if getattr(opts, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must not be negative")
    try:
        device = torch.device(opts.device)
    except RuntimeError as exc:
        parser.error(f"--device {opts.device!r} is not a device: {exc}")
    if importlib.util.find_spec("transformers") is None:
        print("moe-nvfp4 bench --model needs transformers: pip install -e '.[transformers]'", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("moe-nvfp4 bench --model needs a CUDA GPU (the benchmark times CUDA graphs); for a smoke run of the "
              "same code on the CPU use --device cpu --tiny --inner eager", file=sys.stderr)
        return 2
    mode = None if opts.mode.lower() == "none" or device.type != "cuda" or opts.inner == "eager" else opts.mode
    # the first call and the warm-up run on from the prompt; every timed or profiled round is rewound first
    needed = opts.prompt + max(1 + opts.warmup, opts.steps, opts.profile_steps)
    cache_len = opts.cache_len or 64 * math.ceil(needed / 64)
    if cache_len < needed:
        parser.error(f"--cache-len {cache_len} cannot hold the prompt and {needed - opts.prompt} steps")
    settings = Settings(batches=opts.batches, prompt=opts.prompt, prefill=opts.prefill, cache_len=cache_len,
                        warmup=opts.warmup, steps=opts.steps, rounds=opts.rounds, profile_steps=opts.profile_steps,
                        prefill_repeats=opts.prefill_repeats, mode=mode, fullgraph=not opts.no_fullgraph,
                        inner=opts.inner, seed=opts.seed, cold_compile=not opts.warm_cache)

    reason = _preflight(opts.model)
    if reason is not None:
        print(f"moe-nvfp4 bench --model {opts.model}: skipped, {reason}", file=sys.stderr)
        return 2
    if PRESETS[opts.model].note:
        print(f"# {opts.model}: {PRESETS[opts.model].note}", flush=True)

    from moe_passes.integrations.transformers import convert

    meta = _meta(device, argv)
    out = opts.out or _default_out(meta, opts.model, opts.tiny)
    config = build_config(opts.model, opts.layers, tiny=opts.tiny)
    data: dict[str, Any] = dict(
        meta=meta,
        model=dict(name=opts.model, tiny=opts.tiny, layers=opts.layers, config_class=PRESETS[opts.model].config_class,
                   shapes=PRESETS[opts.model].tiny if opts.tiny else PRESETS[opts.model].shapes, dtype="bfloat16"),
        settings=dict(dataclasses.asdict(settings), decode_input="the previous step's greedy token (argmax on the "
                      "device)", cache_rewind="before every round, to the prompt length"),
        variants={})
    print(f"# {meta['device']}  torch {meta['torch']}  transformers {meta['transformers']}  commit "
          f"{meta['git_commit']}\n# {opts.model}{' (tiny)' if opts.tiny else ''}: {opts.layers} layers, batches "
          f"{opts.batches}, prompt {opts.prompt}, prefill {opts.prefill}, cache {cache_len}, mode {mode}", flush=True)

    def log(line):
        print(line, flush=True)

    def write():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(data, f, indent=1)

    start = time.perf_counter()
    model = build_model(opts.model, config, device, torch.bfloat16, opts.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    log(f"  built the bf16 model in {time.perf_counter() - start:.1f} s ({_model_bytes(model) / 2**30:.2f} GiB)")
    data["model"]["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    try:
        bf16 = run_variant("bf16", model, "inductor", settings, device, log)
    except BenchSettingsError as exc:  # raised before the first timed step
        print(f"moe-nvfp4 bench --model {opts.model}: {exc}", file=sys.stderr)
        return 2
    data["variants"]["bf16"] = _public(bf16)
    write()

    # The compiled bf16 graphs and their CUDA graph pools go before the conversion needs memory.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    vocab = config.get_text_config().vocab_size
    calibration = _inputs(vocab, 4, opts.prompt, opts.seed + 3).to(device)
    clock = _Clock(device)
    with torch.no_grad():
        report, convert_s = clock.wall(lambda: convert(model, calibration=calibration))
    if report.skipped or not report.converted:
        print(f"moe-nvfp4 bench --model {opts.model}: convert left blocks alone on the full-size model:\n{report}",
              file=sys.stderr)
        return 2
    log(f"  converted {len(report.converted)} MoE blocks in {convert_s:.1f} s (kernel {report.converted[0].kernel})")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    nvfp4 = run_variant("nvfp4", model, "moe_nvfp4", settings, device, log)
    nvfp4["convert_s"] = convert_s
    nvfp4["conversion"] = dict(converted=len(report.converted), kernel=report.converted[0].kernel,
                               calibration=f"4 x {opts.prompt} random tokens")
    data["variants"]["nvfp4"] = _public(nvfp4)
    data["comparison"] = _comparison(bf16, nvfp4, settings.batches)
    torch._dynamo.reset()
    write()

    comp = data["comparison"]
    log(f"\n{'':10s}{'bf16 ms':>10s}{'nvfp4 ms':>10s}{'speedup':>9s}{'logit err':>11s}")
    for b in settings.batches:
        log(f"decode {b:<3d}{bf16['decode'][str(b)]['median_ms']:10.3f}{nvfp4['decode'][str(b)]['median_ms']:10.3f}"
            f"{comp['decode_speedup'][str(b)]:9.2f}{comp['logit_rel_err'][str(b)]:11.4f}")
    log(f"prefill   {bf16['prefill']['median_ms']:10.3f}{nvfp4['prefill']['median_ms']:10.3f}"
        f"{comp['prefill_speedup']:9.2f}")
    log(f"compile s {bf16['compile_s']:10.1f}{nvfp4['compile_s']:10.1f}   (nvfp4 / bf16 {comp['compile_ratio']:.2f})")
    for key, check in comp["targets"].items():
        log(f"target {key:18s} {check['value']:.3f} {check['target']:>7s}  {'met' if check['met'] else 'NOT met'}")
    png = os.path.splitext(out)[0] + ".png"
    if plot(data, png):
        log(f"wrote {out} and {png}")
    else:
        log(f"wrote {out} (matplotlib is not installed: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
