"""Router logits that exercise sparsemixer's masks (PhiMoE): ties at the top, rows all negative, and experts
placed just inside and just outside the mask threshold of the first and of the second pick.  Shared by the
CPU reference tests and the GPU Triton tests."""

from __future__ import annotations

import torch


def sparsemixer_logits(tokens: int, experts: int, jitter_eps: float, seed: int, margin: float = 1e-3) -> torch.Tensor:
    """float32 ``[tokens, experts]``.  An expert placed near a pick's threshold has ``(m - s) / max(|s|, m)``
    ``= 2 * jitter_eps * (1 +- margin)``: ``margin`` is far above float32's rounding of ``s`` (about 3e-6 of the
    ratio at jitter_eps 0.01), so float32 and float64 agree on every mask."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(tokens, experts, generator=g, dtype=torch.float64) * 2
    s[0::4] += 3.0  # the best logit positive
    s[1::4] -= 8.0  # every logit negative: the factor is |s|, not the best logit
    s[2::8] = s[2::8].round()  # many ties
    s[3::8, experts // 2] = s[3::8].amax(-1)  # the best logit twice: the second pick ties the first
    s[5::8] = 0.0  # 0 / 0 ratios: no expert masked
    threshold = 2 * jitter_eps
    for t in range(tokens):
        if t % 8 == 5:
            continue
        order = s[t].argsort(descending=True, stable=True).tolist()
        for rank in (0, 1):
            m = float(s[t, order[rank]])
            for n, j in enumerate(order[2 + rank::3][:4]):
                r = threshold * (1 + margin if n % 2 else 1 - margin)
                if m > 0 and r <= 2:
                    s[t, j] = m * (1 - r)  # |s| <= m: the factor is m
                elif m <= 0 and r < 1:
                    s[t, j] = m / (1 - r)  # s <= m <= 0: the factor is |s|
    return s.float()


def sparsemixer_fp64(logits: torch.Tensor, jitter_eps: float):
    """The formula, token by token in float64 Python numbers: ``(weights float64 [T, 2], ids int64 [T, 2])``."""
    import math

    weights, ids = [], []
    for row in logits.double().tolist():
        picked, w = [], []
        for _ in range(2):
            rest = [i for i in range(len(row)) if i not in picked]
            best = max(row[i] for i in rest)
            pick = min(i for i in rest if row[i] == best)  # the lowest expert among equals

            def masked(x):
                den = max(abs(x), best)
                ratio = (best - x) / den if den != 0 else math.nan  # 0 / 0: NaN, never above the threshold
                return ratio > 2 * jitter_eps

            total = sum(math.exp(row[i] - best) for i in rest if not masked(row[i]))
            w.append(1.0 / total)  # the pick's own term is exp(0)
            picked.append(pick)
        weights.append(w)
        ids.append(picked)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids, dtype=torch.int64)
