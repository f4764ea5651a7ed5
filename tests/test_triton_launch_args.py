"""Every Triton launch of the Hopper path binds to its kernel's signature, for every variant and option the
planner or a caller can pick, checked on a CPU: a subprocess swaps in a stand-in ``triton``
(tests/fake_triton.py) whose kernels record their launches instead of running."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = r'''
import importlib, sys
sys.path[:0] = [ROOT, ROOT + "/tests"]
import torch
import moe_passes  # torch's inductor probes triton at import: load it before the stand-in
from moe_passes.kernels import registry, triton_moe  # noqa: F401
import fake_triton
fake_triton.install()
for name in [m for m in sys.modules if m.startswith("moe_passes.kernels.triton_") or m.endswith("cuda_decode")]:
    if not name.endswith("triton_plan"):
        del sys.modules[name]
registry._REGISTRY.pop("triton")
tm = importlib.import_module("moe_passes.kernels.triton_moe")
from moe_passes.kernels.options import KernelOptions
from moe_passes.kernels.triton_plan import DecodeConfig, TileConfig
from nvfp4_layers import make_layer

configs = [None, DecodeConfig(grouped=False, ks1=4), DecodeConfig(grouped=False, split1=3, split2=2, early2=2),
           DecodeConfig(grouped=True, split1=2, split2=3, prefetch=True, warps1=2, warps2=2, vec1=True, vec2=True),
           DecodeConfig(grouped=True, cols=2, prefetch=True, early2=1), DecodeConfig(grouped=True, cols=2, split1=2),
           TileConfig(bm=128, bn1=64, bk1=64, warps1=4, stages1=3, bn2=128, bk2=64, warps2=4, stages2=3, tail=32),
           TileConfig(bm=16, bn1=64, bk1=128, warps1=4, stages1=3, bn2=64, bk2=128, warps2=4, stages2=3, split2=3,
                      swap=True)]
seen = set()
for hidden, inter, experts, top_k, act in [(720, 208, 16, 4, "silu"), (4608, 256, 12, 3, "relu2")]:
    weights = tm.prepare_weights(make_layer(hidden, inter, experts, act, torch.device("cpu"), 0))
    for routing, kw in [("renormalize", {}), ("deepseek_v3", dict(n_group=4, topk_group=2)),
                        ("deepseek_v3", dict(n_group=3, topk_group=1))]:
        if experts % kw.get("n_group", 1):
            continue
        bias = torch.randn(experts) if routing == "deepseek_v3" else None
        for tokens in (1, 3, 16, 100, 700):
            x, logits = torch.randn(tokens, hidden).bfloat16(), torch.randn(tokens, experts)
            for cfg in configs:
                for opts in (KernelOptions(), KernelOptions(one_program_pairs=0)):
                    fake_triton.CALLS.clear()
                    tm.fused_moe_triton(x, logits, weights, top_k=top_k, activation=act, routing=routing,
                                        routing_bias=bias, config=cfg, options=opts, **kw)
                    names = [c[0] for c in fake_triton.CALLS]
                    assert names[-1] == "combine_kernel", names
                    seen.update(names)
            half = tm.prepare_weights(make_layer(hidden, inter, experts // 2, act, torch.device("cpu"), 1))
            tm.fused_moe_triton(x, logits, half, top_k=top_k, activation=act, routing=routing, routing_bias=bias,
                                local_expert_offset=experts // 2, global_num_experts=experts, **kw)
print(" ".join(sorted(seen)))
'''


def test_every_launch_binds_to_its_kernel():
    result = subprocess.run([sys.executable, "-c", SCRIPT.replace("ROOT", repr(str(ROOT)))], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    launched = set(result.stdout.split())
    assert launched == {"_route_kernel", "_group_kernel", "_rank_kernel", "_starts_kernel", "_scatter_kernel",
                        "_tgemv1_kernel", "_tgemv2_kernel", "act_kernel", "_gemm1_kernel", "_gemm2_kernel",
                        "combine_kernel"}, launched
