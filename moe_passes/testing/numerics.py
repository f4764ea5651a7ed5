"""Compare compiled against eager (and against the reference) numerics.

Compiled and eager run the same ops on the same bf16 values, so they must agree within bf16 rounding
(a couple of ulps of the output's scale: inductor may fuse the add and round once).  The reference
re-derives the MoE from the layer's canonical weights; it may differ by accumulation order, which can
flip an occasional NVFP4 rounding of the intermediate, so it gets a looser, scale-relative bound.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = ["Tolerance", "BF16_ROUNDING", "REFERENCE_TOLERANCE", "NumericsReport", "compare", "assert_close",
           "check_numerics"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """``max |a - b| <= max_rel * scale`` and ``||a - b|| <= mean_rel * ||b||``, ``scale = max |b|``."""

    max_rel: float
    mean_rel: float


# bf16 has an 8-bit mantissa: 2**-8 relative; allow two roundings of the largest element.
BF16_ROUNDING = Tolerance(max_rel=2 ** -7, mean_rel=2 ** -8)
REFERENCE_TOLERANCE = Tolerance(max_rel=0.05, mean_rel=0.01)


@dataclasses.dataclass
class NumericsReport:
    """Worst errors seen by :func:`check_numerics`, relative to the output scale."""

    calls: int = 0
    compiled_vs_eager: float = 0.0
    eager_vs_reference: float = 0.0
    compiled_vs_reference: float = 0.0


def compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b| / max |b|, ||a - b|| / ||b||)`` in float32 (0/0 counts as 0)."""
    a, b = actual.detach().float(), expected.detach().float()
    diff = (a - b).abs()
    scale = b.abs().max().item() if b.numel() else 0.0
    norm = b.norm().item() if b.numel() else 0.0
    max_rel = diff.max().item() / scale if scale else (0.0 if not diff.numel() or diff.max().item() == 0 else float("inf"))
    mean_rel = diff.norm().item() / norm if norm else (0.0 if not diff.numel() or diff.max().item() == 0 else float("inf"))
    return max_rel, mean_rel


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance = BF16_ROUNDING, *,
                 what: str = "output") -> float:
    """Same shape and dtype, all finite, and within ``tol``; returns the max relative error."""
    if tuple(actual.shape) != tuple(expected.shape) or actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: got {actual.dtype}{list(actual.shape)}, expected "
                             f"{expected.dtype}{list(expected.shape)}")
    for name, t in (("result", actual), ("expected value", expected)):
        if not torch.isfinite(t.float()).all():  # NaN compares as no error: never let it pass
            raise AssertionError(f"{what}: non-finite values in the {name}")
    max_rel, mean_rel = compare(actual, expected)
    if max_rel > tol.max_rel or mean_rel > tol.mean_rel:
        diff = (actual.float() - expected.float()).abs()
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
        raise AssertionError(
            f"{what}: max error {max_rel:.3g} of the output scale (allowed {tol.max_rel:.3g}), relative L2 error "
            f"{mean_rel:.3g} (allowed {tol.mean_rel:.3g}); worst at {where}: {actual.float()[where].item():.6g} vs "
            f"{expected.float()[where].item():.6g}")
    return max_rel


def check_numerics(compiled: Callable, eager: Callable, inputs: Iterable[Sequence[torch.Tensor]], *,
                   reference: Optional[Callable] = None, tol: Tolerance = BF16_ROUNDING,
                   reference_tol: Tolerance = REFERENCE_TOLERANCE) -> NumericsReport:
    """Run ``compiled`` and ``eager`` (and ``reference``) on each input tuple and compare.

    Compiled must equal eager within ``tol`` (bf16 rounding); both must match the reference within
    ``reference_tol``.  Returns the worst errors seen.
    """
    report = NumericsReport()
    with torch.no_grad():
        for args in inputs:
            got = compiled(*args)
            want = eager(*args)
            tokens = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else "?"
            report.compiled_vs_eager = max(report.compiled_vs_eager,
                                           assert_close(got, want, tol, what=f"compiled vs eager (tokens={tokens})"))
            if reference is not None:
                ref = reference(*args)
                report.eager_vs_reference = max(report.eager_vs_reference, assert_close(
                    want, ref, reference_tol, what=f"eager vs reference (tokens={tokens})"))
                report.compiled_vs_reference = max(report.compiled_vs_reference, assert_close(
                    got, ref, reference_tol, what=f"compiled vs reference (tokens={tokens})"))
            report.calls += 1
    return report
