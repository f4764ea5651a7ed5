"""Hypothesis strategies for MoE problems (needs ``hypothesis``, a test dependency).

Sizes are drawn from small pools rather than wide ranges: every distinct hidden size is a distinct
compiled graph (and, under inductor, a cold compile), so a CPU run stays fast by reusing a handful of
them.  The pools still cover what matters: aligned (multiple of the kernel's 256) and unaligned hidden
sizes, a real model size that pads (Nemotron-3-Nano's 2688 -> 2816), sizes that are not even a multiple
of the NVFP4 block (16), intermediates that need padding, one expert, ``top_k == experts``, one token.

Scale knobs (environment variables, read when a strategy is built):

``MOE_NVFP4_FUZZ_EXAMPLES``  multiplies every suite's example count (default 1; e.g. 10 for a long run)
``MOE_NVFP4_FUZZ_SHRINK``    ``1``: let hypothesis shrink failing examples (off by default: every shrink
                             step is a compile, and a failure should be reported in seconds, not minutes)
``MOE_NVFP4_FUZZ_SIZES``     ``ci`` (default): the small pools below; ``full``: adds the real hidden sizes
                             of FACTS.md's models (2048, 2816, 2880, 7168, 1024), more experts, larger
                             intermediates and token counts up to 4096

Example::

    from hypothesis import given
    from moe_passes.testing import strategies as mst

    @mst.fuzz_settings(10)
    @given(problem=mst.moe_problems(aligned=False), tokens=mst.token_counts())
    def test_something(problem, tokens): ...
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from moe_passes.contract import (ACTIVATIONS, PARAMETRIC_ACTIVATIONS, PARAMETRIC_ROUTINGS, ROUTING_METHODS,
                                 TRTLLM_ALIGNMENT)
from moe_passes.testing.problems import MoEProblem

__all__ = ["fuzz_examples", "fuzz_settings", "full_sizes", "hidden_sizes", "intermediate_sizes", "expert_counts",
           "token_counts", "activations", "routings", "weight_dtypes", "logits_dtypes", "moe_problems",
           "REAL_HIDDEN_SIZES", "CI_HIDDEN_ALIGNED", "CI_HIDDEN_UNALIGNED"]

ALIGN = TRTLLM_ALIGNMENT.hidden

# Hidden sizes of real models (FACTS.md): Nemotron-3-Nano, Nemotron-3-Super (latent), Gemma-4-26B, Qwen3-30B,
# DeepSeek-V3, gpt-oss-120b.
REAL_HIDDEN_SIZES = (2688, 1024, 2816, 2048, 7168, 2880)
# CI pools: few distinct sizes so compiled graphs repeat.  Unaligned: Nemotron-Nano's real 2688 (pads to 2816),
# gpt-oss's 2880 scaled down 8x (360: not a multiple of the 16-element NVFP4 block, pads to 512), and a
# small 320 (pads to 512).  Aligned: 256 and 512.
CI_HIDDEN_ALIGNED = (256, 512)
CI_HIDDEN_UNALIGNED = (320, 360, 2688)


def fuzz_examples(base: int) -> int:
    """``base`` scaled by ``MOE_NVFP4_FUZZ_EXAMPLES`` (a float multiplier, default 1), at least 1."""
    factor = float(os.environ.get("MOE_NVFP4_FUZZ_EXAMPLES", "1") or 1)
    return max(1, int(round(base * factor)))


def full_sizes() -> bool:
    return os.environ.get("MOE_NVFP4_FUZZ_SIZES", "ci").strip().lower() == "full"


def fuzz_settings(base_examples: int, **overrides) -> settings:
    """Hypothesis settings for compile-heavy fuzzing: scaled example count, no deadline, no too_slow check."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    shrink = os.environ.get("MOE_NVFP4_FUZZ_SHRINK", "0").strip().lower()
    if shrink not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"MOE_NVFP4_FUZZ_SHRINK={shrink!r}: use 1 (shrink failing examples) or 0")
    if shrink in ("1", "true", "yes", "on"):
        phases.append(Phase.shrink)
    kwargs = dict(max_examples=fuzz_examples(base_examples), deadline=None, phases=phases,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture],
                  print_blob=True)
    kwargs.update(overrides)
    return settings(**kwargs)


def hidden_sizes(aligned: Optional[bool] = None) -> st.SearchStrategy[int]:
    """Hidden sizes: ``aligned=True`` multiples of 256, ``False`` sizes that need padding, None either."""
    if full_sizes():
        aligned_pool = sorted(set(CI_HIDDEN_ALIGNED) | {h for h in REAL_HIDDEN_SIZES if h % ALIGN == 0})
        unaligned_pool = sorted(set(CI_HIDDEN_UNALIGNED) | {h for h in REAL_HIDDEN_SIZES if h % ALIGN} | {336, 2000})
    else:
        aligned_pool, unaligned_pool = list(CI_HIDDEN_ALIGNED), list(CI_HIDDEN_UNALIGNED)
    pool = aligned_pool if aligned else unaligned_pool if aligned is False else aligned_pool + unaligned_pool
    return st.sampled_from(pool)


def intermediate_sizes() -> st.SearchStrategy[int]:
    """Expert intermediate sizes: aligned (64, 128) and ones that pad (48 -> 64 gated, 96 -> 128 plain; 40
    is not a multiple of 16)."""
    pool = [40, 48, 64, 96, 128]
    if full_sizes():
        pool += [256, 704, 768]
    return st.sampled_from(pool)


def expert_counts() -> st.SearchStrategy[int]:
    return st.sampled_from([1, 2, 4, 8] + ([16, 64] if full_sizes() else []))


def token_counts(max_tokens: Optional[int] = None) -> st.SearchStrategy[int]:
    """Token counts: always includes 1 among the favourites; "large" is 300 on CI, up to 4096 with full sizes."""
    large = max_tokens or (4096 if full_sizes() else 300)
    favourites = [t for t in (1, 2, 7, 64, 300, 4096) if t <= large]
    return st.one_of(st.sampled_from(favourites), st.integers(1, large))


# Every kernel takes these; a parametric one (swiglu_oai) is drawn only when asked for by name.
_PLAIN_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a not in PARAMETRIC_ACTIVATIONS)


def activations() -> st.SearchStrategy[str]:
    return st.sampled_from(_PLAIN_ACTIVATIONS)


# Every kernel's routing takes these; a parametric one (sparsemixer) is drawn only when asked for by name.
_PLAIN_ROUTINGS = tuple(r for r in ROUTING_METHODS if r not in PARAMETRIC_ROUTINGS)


def routings() -> st.SearchStrategy[str]:
    return st.sampled_from(_PLAIN_ROUTINGS)


def weight_dtypes() -> st.SearchStrategy[torch.dtype]:
    """Dtypes of the float weights handed to ``FusedMoE.from_float``."""
    return st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def logits_dtypes() -> st.SearchStrategy[torch.dtype]:
    """Router-logit dtypes the ops accept (hidden states are always bf16, the kernels' activation dtype)."""
    return st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def moe_problems(draw, *, hidden: Optional[st.SearchStrategy[int]] = None, aligned: Optional[bool] = None,
                 shared: Optional[bool] = None, activation: Optional[Sequence[str]] = None,
                 routing: Optional[Sequence[str]] = None, experts: Optional[st.SearchStrategy[int]] = None,
                 name: str = "") -> MoEProblem:
    """A valid MoE layer configuration.

    ``aligned`` restricts the hidden size (see :func:`hidden_sizes`), ``shared`` forces a shared expert on or
    off, ``activation`` / ``routing`` restrict those choices, ``experts`` replaces :func:`expert_counts`.  Routing arguments are always consistent:
    ``llama4`` gets ``top_k=1``; ``sparsemixer`` (only when named in ``routing``) ``top_k=2``, at least
    two experts and a ``jitter_eps``; ``deepseek_v3`` gets ``n_group`` dividing the experts, ``topk_group <=
    n_group`` with enough experts in the kept groups for ``top_k``, optionally a correction bias and a
    routed scaling factor.
    """
    h = draw(hidden if hidden is not None else hidden_sizes(aligned))
    act = draw(st.sampled_from(list(activation or _PLAIN_ACTIVATIONS)))
    method = draw(st.sampled_from(list(routing or _PLAIN_ROUTINGS)))
    experts = draw(experts if experts is not None else expert_counts())
    n_group = topk_group = scaling = params = None
    bias = False
    if method == "llama4":
        top_k = 1
    elif method == "sparsemixer":
        experts = max(experts, 2)
        top_k = 2
        params = (draw(st.sampled_from([0.0, 0.01, 0.1, 0.5])),)
    elif method == "deepseek_v3":
        n_group = draw(st.sampled_from([g for g in (1, 2, 4) if experts % g == 0]))
        topk_group = draw(st.integers(1, n_group))
        top_k = draw(st.integers(1, min(experts // n_group * topk_group, 8)))
        bias = draw(st.booleans())
        scaling = draw(st.sampled_from([None, 1.0, 2.5]))
    else:
        top_k = draw(st.integers(1, min(experts, 8)))
    with_shared = draw(st.booleans()) if shared is None else shared
    return MoEProblem(
        hidden=h, intermediate=draw(intermediate_sizes()), experts=experts, top_k=top_k, activation=act,
        routing=method, n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling, routing_bias=bias,
        routing_params=params,
        shared=draw(st.sampled_from([32, 64])) if with_shared else None, weight_dtype=draw(weight_dtypes()),
        logits_dtype=draw(logits_dtypes()), seed=draw(st.integers(0, 2 ** 16)), name=name)
