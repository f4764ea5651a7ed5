"""How close to the weight floor can a one-token layer get on this GPU?  Four figures per shape, one run:

    python benchmarks/read_floor.py [--shapes nemotron-3-nano,qwen3-30b-a3b,...] [--out DIR]

* ``floor``: the NVFP4 weight-bandwidth floor (``moe_passes.bench.floor_seconds``: the selected experts'
  codes and scales at the read-only bandwidth ``moe_passes.bench.measure_read_bandwidth`` measures at the start
  of the run), as in ``moe-nvfp4 bench``; ``floor_copy`` the same at the copy bandwidth (the floor before
  issue 31).
* ``read``: a Triton kernel that only *reads* exactly the floor's bytes: the top-k experts' bytes, one
  contiguous block per expert, the expert ids read from device memory (as a layer gets them from its
  routing), an xor per program written out.  No routing, no arithmetic worth the name, no cross-SM sum.
  The best over a few grid sizes and block shapes.  This is what streaming the bytes costs as one launch
  among back-to-back captured launches: the practical floor of any one-token layer.
* ``empty``: a kernel of one CTA per SM that writes one word each: the per-launch cost in the chain.
* ``layer``: the layer as ``moe-nvfp4 bench`` times it at one token.

Everything is timed like the benchmark: CUDA-graph captured, 16 back-to-back calls on 16 input sets
(different experts) per graph, median per call over replays.  Prints a table (us, and each over the floor)
and writes ``read_floor.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

from moe_passes import bench

REPS, REPLAYS = 16, 20
# (programs per expert as a multiple of the SM count / top_k, words per loop step, warps)
READ_CONFIGS = [(m, block, warps) for m in (1, 2, 4, 8) for block in (1024, 2048) for warps in (4, 8)]


@triton.jit
def _read_kernel(ids_ptr, blob_ptr, out_ptr, words, chunk, BLOCK: tl.constexpr):
    slot = tl.program_id(0)
    part = tl.program_id(1)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    base = blob_ptr + expert * words
    start = part * chunk
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(start, start + chunk, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc ^= tl.load(base + offs, mask=offs < words, other=0)
    tl.store(out_ptr + slot * tl.num_programs(1) + part, tl.xor_sum(acc, 0))


@triton.jit
def _empty_kernel(out_ptr):
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, pid)


def expert_words(name: str) -> int:
    """32-bit words of one expert's NVFP4 codes and scales: what the floor counts per selected expert."""
    h, i, e, k, activation, _, _ = bench.SHAPES[name]
    per_expert = bench.floor_seconds(h, i, e, k, activation, 1, 1.0) / k  # at 1 byte/s: bytes; 1 token: k experts
    words = round(per_expert / 4)
    if abs(4 * words - per_expert) > 1e-9 * per_expert:  # touched = E (1 - (1 - k/E)) is k up to rounding
        raise SystemExit(f"{name}: {per_expert} bytes per expert is not a whole number of 32-bit words")
    return words


def xor_rows(t: torch.Tensor) -> torch.Tensor:
    """The xor of each row of an int32 matrix (a pairwise tree: torch has no xor reduction)."""
    while t.shape[1] > 1:
        if t.shape[1] % 2:
            t = torch.cat([t, torch.zeros_like(t[:, :1])], dim=1)
        t = t[:, 0::2] ^ t[:, 1::2]
    return t[:, 0]


def time_read(name: str, sms: int) -> tuple:
    """Best per-call seconds of the read kernel over READ_CONFIGS, and that config."""
    _, _, experts, top_k, _, _, _ = bench.SHAPES[name]
    words = expert_words(name)
    blob = torch.randint(-2**31, 2**31 - 1, (experts, words), dtype=torch.int32, device="cuda")
    ids = [torch.randperm(experts, device="cuda")[:top_k].to(torch.int32) for _ in range(REPS)]
    best = None
    for mult, block, warps in READ_CONFIGS:
        parts = max(1, -(-mult * sms // top_k))
        chunk = -(-words // parts // block) * block
        parts = -(-words // chunk)
        out = torch.empty(top_k * parts, dtype=torch.int32, device="cuda")

        def call(r, parts=parts, chunk=chunk, out=out, block=block, warps=warps, blob=blob):
            _read_kernel[(top_k, parts)](ids[r], blob, out, words, chunk, BLOCK=block, num_warps=warps)

        # the kernel must read what it claims: its xors against torch's, once
        call(0)
        ref = blob[ids[0].long()].view(top_k, -1)
        got = out.view(top_k, parts)
        for p in (0, parts - 1):
            if not torch.equal(got[:, p], xor_rows(ref[:, p * chunk:(p + 1) * chunk])):
                raise SystemExit(f"read kernel: wrong xor for {name}, config {(mult, block, warps)}")
        t = bench.time_graph(call, REPS, REPLAYS)
        if best is None or t < best[0]:
            best = (t, dict(programs=top_k * parts, block=block, warps=warps))
    del blob
    torch.cuda.empty_cache()
    return best


def time_empty(sms: int) -> float:
    out = torch.empty(sms, dtype=torch.int32, device="cuda")
    return bench.time_graph(lambda r: _empty_kernel[(sms,)](out), REPS, REPLAYS)


def time_layer(name: str) -> float:
    """Per-call seconds of the whole layer at one token."""
    spec, weights, args, bias, hidden = bench.triton_layer(name, "cuda")
    experts = bench.SHAPES[name][2]
    xs = [(torch.randn(1, hidden, device="cuda") / 10).to(torch.bfloat16) for _ in range(REPS)]
    ls = [torch.randn(1, experts, device="cuda") for _ in range(REPS)]

    def call(r):
        return spec.run(xs[r], ls[r], weights, None, None, bias, args)

    return bench.time_graph(call, REPS, REPLAYS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=bench.shape_list, default=",".join(bench.SHAPES))
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    shapes = args.shapes
    if not torch.cuda.is_available():
        raise SystemExit("read_floor.py measures on a CUDA GPU")
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bandwidth = bench.measure_copy_bandwidth()
    bandwidth = bench.measure_read_bandwidth()
    empty = time_empty(sms)
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs, read bandwidth {bandwidth / 1e12:.2f} TB/s, copy bandwidth "
          f"{copy_bandwidth / 1e12:.2f} TB/s, empty kernel {empty * 1e6:.2f} us per call", flush=True)
    rows = []
    for name in shapes:
        h, i, e, k, activation, _, _ = bench.SHAPES[name]
        row = dict(shape=name, floor_us=bench.floor_seconds(h, i, e, k, activation, 1, bandwidth) * 1e6,
                   floor_copy_us=bench.floor_seconds(h, i, e, k, activation, 1, copy_bandwidth) * 1e6,
                   empty_us=empty * 1e6)
        read, config = time_read(name, sms)
        row.update(read_us=read * 1e6, read_config=config)
        row.update(layer_us=time_layer(name) * 1e6)
        torch.cuda.empty_cache()
        for key in ("read", "layer"):
            row[f"{key}_over_floor"] = row[f"{key}_us"] / row["floor_us"]
        rows.append(row)
        print(f"{name:18s} floor {row['floor_us']:6.2f}  read {row['read_us']:6.2f} ({row['read_over_floor']:.2f}x, "
              f"{config})  layer {row['layer_us']:6.2f} ({row['layer_over_floor']:.2f}x)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "read_floor.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), sms=sms, read_bandwidth=bandwidth,
                       copy_bandwidth=copy_bandwidth, rows=rows), f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
