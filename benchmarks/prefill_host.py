"""Host time of a prefill in the default mode (no CUDA graphs), bf16 against the converted model, and where the
converted model's MoE calls spend it.

    python benchmarks/prefill_host.py --out DIR          # on a GPU: time, trace and summarize
    python benchmarks/prefill_host.py --analyze DIR      # anywhere: summarize traces captured before

Builds the Qwen3-30B-A3B preset with 8 layers as ``moe-nvfp4 bench --model`` does, compiles ``model.forward``
without a mode (bf16 under ``backend="inductor"``, then, after ``convert``, under ``backend="moe_nvfp4"``) and
runs a prefill of 2048 tokens at batch 1 (last-token logits): ``event_ms``, CUDA events around the call (what
the bench reports), and ``issue_ms``, the host's time inside the call; when the two are close, the GPU waits on
the host.  Then a ``torch.profiler`` trace of two prefills per variant (``trace_<variant>.json.gz``).

The summary (``prefill_host.json``) reads the nvfp4 trace: the host time of each MoE op call, its kernel
launches, the time before the first thing it does (dispatch, checks, planning) and the host time between one
launch and the next (Triton's Python launcher, allocations, views).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time

import torch

_MOE_OP = "moe_nvfp4::trtllm_nvfp4_moe"


def capture(out: str) -> dict:
    from moe_passes import bench_model as bm
    from moe_passes.integrations.transformers import convert

    dev = torch.device("cuda")
    config = bm.build_config("qwen3-30b-a3b", 8)
    model = bm.build_model("qwen3-30b-a3b", config, dev)
    vocab = config.get_text_config().vocab_size
    ids = bm._inputs(vocab, 1, 2048, 2).to(dev)
    timings = {}

    def run(label, backend):
        torch._dynamo.reset()
        f = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False)
        with torch.no_grad():
            for _ in range(4):
                f(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            events = []
            for _ in range(10):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                f(input_ids=ids, use_cache=False, logits_to_keep=1)
                e.record()
                e.synchronize()
                events.append(s.elapsed_time(e))
            issue = []
            for _ in range(10):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                f(input_ids=ids, use_cache=False, logits_to_keep=1)
                issue.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
            timings[label] = dict(event_ms=statistics.median(events), issue_ms=statistics.median(issue))
            print(label, timings[label], flush=True)
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as p:
                for _ in range(2):
                    f(input_ids=ids, use_cache=False, logits_to_keep=1)
                    torch.cuda.synchronize()
            path = os.path.join(out, f"trace_{label}.json")
            p.export_chrome_trace(path)
            with open(path, "rb") as a, gzip.open(path + ".gz", "wb") as b:
                b.write(a.read())
            os.remove(path)

    run("bf16", "inductor")
    with torch.no_grad():
        convert(model, calibration=bm._inputs(vocab, 4, 64, 3).to(dev))
    run("nvfp4", "moe_nvfp4")
    return timings


def analyze(out: str) -> dict:
    """Per MoE op call in the nvfp4 trace: host us, launches, us before its first child event, us between
    launches (medians over the calls)."""
    with gzip.open(os.path.join(out, "trace_nvfp4.json.gz")) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")]
    calls = sorted((e for e in events if e["name"] == _MOE_OP), key=lambda e: e["ts"])
    if not calls:
        raise SystemExit(f"no {_MOE_OP} call in the nvfp4 trace")
    per_call, launches, before_first, between = [], [], [], []
    for op in calls:
        t0, t1 = op["ts"], op["ts"] + op["dur"]
        inner = sorted((e for e in host if t0 <= e["ts"] <= t1 and e is not op), key=lambda e: e["ts"])
        starts = [e for e in inner if e["name"].startswith("cuLaunch")]
        per_call.append(op["dur"])
        launches.append(len(starts))
        before_first.append(inner[0]["ts"] - t0 if inner else op["dur"])
        between += [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(starts, starts[1:])]
    return dict(moe_calls=len(calls), host_us_per_call=statistics.median(per_call), launches_per_call=max(launches),
                us_before_first_child=statistics.median(before_first),
                us_between_launches=statistics.median(between) if between else None,
                note="profiled: the profiler adds its own host time to every event")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--analyze", metavar="DIR", default=None, help="summarize the traces in DIR, no GPU needed")
    args = parser.parse_args(argv)
    out = args.analyze or args.out
    os.makedirs(out, exist_ok=True)
    result = dict(command=" ".join(sys.argv))
    if args.analyze is None:
        if not torch.cuda.is_available():
            raise SystemExit("prefill_host.py needs a CUDA GPU to capture (--analyze DIR reads traces anywhere)")
        result.update(device=torch.cuda.get_device_name(), torch=torch.__version__, timings=capture(out))
    result["nvfp4_moe_calls"] = analyze(out)
    print(json.dumps(result["nvfp4_moe_calls"], indent=1))
    with open(os.path.join(out, "prefill_host.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
