"""The Triton kernel's weight layout and the bit arithmetic its PTX relies on, checked on the CPU.

The GPU code cuts bf16 patterns out of each 32-bit word with the shifts and masks that
``emulate_word_decode`` repeats in torch, then multiplies by ``bf16(block_scale * 2^119)``; these tests pin
that (a) every E2M1 code at every position of a word decodes to its canonical value, and (b) every
product with every finite E4M3 scale is exact in bf16 and a normal number (no flush, no rounding).
"""

from __future__ import annotations

import pytest
import torch

from moe_passes.kernels.nvfp4 import E2M1_VALUES, unpack_e2m1
from moe_passes.kernels.triton_layout import emulate_word_decode, from_triton_layout, to_triton_layout


def _all_codes_at_all_positions() -> torch.Tensor:
    """Words where each of the 8 positions takes each of the 16 codes, the other positions random."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for pos in range(8):
        for code in range(16):
            nib = torch.randint(0, 16, (8,), generator=g)
            nib[pos] = code
            rows.append((nib[0::2] | (nib[1::2] << 4)).to(torch.uint8))
    return torch.stack(rows)  # [128, 4] bytes = one word each


def test_every_code_at_every_position_decodes_to_its_value():
    canonical = _all_codes_at_all_positions()
    got = emulate_word_decode(to_triton_layout(canonical)).double() * 2.0 ** 126
    want = unpack_e2m1(canonical).double()
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0 stays -0


def test_round_trip_and_shape_on_random_expert_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, (3, 40, 72), dtype=torch.uint8, generator=g)
    kernel = to_triton_layout(w)
    assert kernel.shape == w.shape and kernel.dtype == torch.uint8
    assert not torch.equal(kernel, w)
    assert torch.equal(from_triton_layout(kernel), w)
    assert torch.equal(emulate_word_decode(kernel).double() * 2.0 ** 126, unpack_e2m1(w).double())


def test_non_contiguous_input_is_permuted_as_its_values():
    g = torch.Generator().manual_seed(2)
    w = torch.randint(0, 256, (16, 8), dtype=torch.uint8, generator=g)
    view = w.t()  # [8, 16], not contiguous
    assert torch.equal(to_triton_layout(view), to_triton_layout(view.contiguous()))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 6, dtype=torch.uint8), "multiple of 4"),
    (torch.zeros(4, 8, dtype=torch.int32), "uint8"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        to_triton_layout(bad)


def _bf16_exact(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double() == x


def test_scale_pair_and_products_are_exact_normal_bf16():
    """bf16(scale * 2^119) is exact for all 254 finite E4M3 bytes, and so is every e2m1 * that product."""
    scales = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    scales = scales[torch.isfinite(scales)]
    assert scales.numel() == 254
    scaled = scales * 2.0 ** 119
    assert bool(_bf16_exact(scaled).all())
    # the kernel's fp16 placement of the byte: s eeee mmm at bits 15 / 13..7 reads as scale * 2^-8
    b = torch.arange(256, dtype=torch.int32)
    f16 = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(torch.int16).view(torch.float16).double()
    ok = torch.isfinite(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double())
    assert torch.equal(f16[ok] * 2.0 ** 127, scaled)
    # weights as the kernel holds them (e2m1 * 2^-126, subnormal for 0.5) times the scale pair
    w = torch.tensor(E2M1_VALUES, dtype=torch.float64) * 2.0 ** -126
    assert bool(_bf16_exact(w).all())
    prod = w[:, None] * scaled[None, :]
    assert bool(_bf16_exact(prod).all())
    nonzero = prod[prod != 0].abs()
    assert float(nonzero.min()) >= torch.finfo(torch.bfloat16).tiny  # normal: nothing for a flush to lose
    assert torch.equal(prod * 2.0 ** 7, torch.tensor(E2M1_VALUES, dtype=torch.float64)[:, None] * scales[None, :])
