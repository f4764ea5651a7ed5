"""``moe-nvfp4``: demo, plan and bench.

    moe-nvfp4 demo [--tokens 64] [--inner inductor|eager] [--device cpu]
    moe-nvfp4 plan --hidden 2688 --intermediate 1856 --experts 128 --top-k 6 --tokens 4096 [--activation relu2]
                                 (per kernel: padded sizes, chunking, weight bytes; for the Hopper kernel the
                                 variant each token count takes and why)
    moe-nvfp4 bench [--shapes a,b] [--tokens sweep|1,16,...] [--peer-path DIR] [--budget-s S] [--out DIR]
                                 (GPU: the layer against triton_kernels' MXFP4 MoE, bf16 and the floor)
    moe-nvfp4 bench --merge a.json b.json --out DIR   (no GPU: join split runs, plot)
    moe-nvfp4 bench --model qwen3-30b-a3b [--layers 8] [--batches 1,16,64] [--prefill 2048] [--out ...]
                                 (a transformers model end to end, bf16 against NVFP4; see docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import math
import os
import sys
import time
import warnings

import torch
from torch import nn

from moe_passes.contract import ACTIVATIONS, ROUTING_METHODS

__all__ = ["main", "NemotronNanoBlock", "build_demo_block"]


class _ReLU2MLP(nn.Module):
    """A shared expert in Nemotron's style: up projection, ReLU squared, down projection."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)).square())


class NemotronNanoBlock(nn.Module):
    """A Nemotron-3-Nano-shaped MoE block: sigmoid router with correction bias, ReLU^2 experts, shared expert."""

    def __init__(self, experts_module: nn.Module, gate: nn.Linear):
        super().__init__()
        self.gate = gate
        self.experts = experts_module

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(hidden_states.float())
        return self.experts(hidden_states, router_logits)


def build_demo_block(*, hidden=2688, intermediate=464, experts=16, top_k=6, shared=928, seed=0, calibration_tokens=64):
    """Nemotron-3-Nano's hidden size and activation with experts and intermediate sizes scaled to a CPU.

    Returns ``(block, float_parts)`` where ``float_parts`` holds the unquantized weights for comparison.
    """
    from moe_passes.layer import FusedMoE

    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, intermediate, hidden, generator=g) / math.sqrt(hidden)
    w2 = torch.randn(experts, hidden, intermediate, generator=g) / math.sqrt(intermediate)
    bias = torch.randn(experts, generator=g) * 0.1
    gate = nn.Linear(hidden, experts, bias=False)
    shared_mlp = _ReLU2MLP(hidden, shared).to(torch.bfloat16)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(experts, hidden, generator=g) / math.sqrt(hidden))
        for p in shared_mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    calibration = torch.randn(calibration_tokens, hidden, generator=g)
    moe = FusedMoE.from_float(w13, w2, top_k=top_k, activation="relu2", routing="deepseek_v3",
                              shared_expert=shared_mlp, routing_bias=bias, n_group=1, topk_group=1,
                              routed_scaling_factor=2.5, calibration=calibration, name="nemotron_nano.moe")
    return NemotronNanoBlock(moe, gate), {"w13": w13, "w2": w2, "bias": bias}


def _float_block_output(block: NemotronNanoBlock, parts: dict, x: torch.Tensor) -> torch.Tensor:
    """The same block in fp32 without any quantization (what NVFP4 approximates)."""
    from moe_passes.kernels.reference import route

    moe = block.experts
    logits = block.gate(x.float())
    weights, ids = route(logits, moe.top_k, moe.routing, routing_bias=parts["bias"], n_group=moe.n_group,
                         topk_group=moe.topk_group, routed_scaling_factor=moe.routed_scaling_factor)
    xf = x.float()
    out = torch.zeros_like(xf)
    for slot in range(ids.shape[1]):
        w13 = parts["w13"][ids[:, slot]]
        w2 = parts["w2"][ids[:, slot]]
        h = torch.relu(torch.einsum("th,tih->ti", xf, w13)).square()
        out += weights[:, slot:slot + 1] * torch.einsum("ti,thi->th", h, w2)
    if moe.shared_expert is None:
        return out
    return out + copy.deepcopy(moe.shared_expert).float()(xf)  # a copy: .float() converts in place


def _graph_listing(gm: torch.fx.GraphModule, highlight=("constant_pad_nd", "trtllm_nvfp4_moe", "fused_moe",
                                                         "slice", "add")) -> str:
    lines = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        shape = "x".join(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else ""
        target = str(node.target).replace("aten.", "").replace(".default", "").replace(".Tensor", "")
        mark = "  <-- MoE" if any(h in target for h in highlight[:3]) or (
            "slice" in target and any(i.target is not None and "trtllm" in str(i.target) for i in node.all_input_nodes)) else ""
        lines.append(f"    {node.name:<28} {target:<34} [{shape}]{mark}")
    return "\n".join(lines)


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def demo(args) -> int:
    from moe_passes.kernels.reference import fused_moe_reference

    warnings.simplefilter("ignore", category=UserWarning)
    device = torch.device(args.device)
    print("moe-nvfp4 demo: a Nemotron-3-Nano-shaped MoE block (hidden 2688, ReLU^2 experts, sigmoid routing with "
          "correction bias, shared expert) with experts and intermediate size scaled down for a CPU.\n")
    block, parts = build_demo_block(seed=args.seed)
    block = block.to(device)
    parts = {k: v.to(device) for k, v in parts.items()}  # the fp32 comparison runs beside the block
    moe = block.experts
    s = moe.kernel_shape
    print(f"layer: {moe}\n")
    print(f"kernel {moe.kernel!r} needs hidden % {s.alignment.hidden} == 0, so hidden {s.hidden} is padded to "
          f"{s.hidden_padded}: the compiled graph pads the activations, runs the kernel, and slices back to "
          f"{s.hidden} *before* the shared-expert add.\n")

    graphs = {}

    def observer(stage, name, gm):
        # the first compile's: the graph that serves --tokens (later calls compile a one-token graph)
        if (stage, name) in (("before", "lower_fused_moe"), ("after", "verify_moe_shapes")):
            graphs.setdefault(stage, _graph_listing(gm))

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="moe_nvfp4", dynamic=True,
                             options={"inner": args.inner, "observers": [observer]})
    # Inputs from their own stream: the weights' generator starts at args.seed.
    data = torch.Generator().manual_seed(args.seed + 1_000_003)
    x = torch.randn(args.tokens, s.hidden, generator=data).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        start = time.perf_counter()
        y_compiled = compiled(x)
        compile_s = time.perf_counter() - start
        y_eager = block(x)
        logits = block.gate(x.float())
        w = moe.canonical_weights()
        y_ref = fused_moe_reference(x, logits, *w, top_k=moe.top_k, activation=moe.activation, routing=moe.routing,
                                    input_global_scale=moe.input_global_scale,
                                    intermediate_global_scale=moe.intermediate_global_scale,
                                    routing_bias=moe.routing_bias, n_group=moe.n_group, topk_group=moe.topk_group,
                                    routed_scaling_factor=moe.routed_scaling_factor).float()
        y_ref = y_ref + moe.shared_expert(x).float()
        y_float = _float_block_output(block, parts, x)
        other_tokens = [1, 7, 300]
        for t in other_tokens:
            compiled(torch.randn(t, s.hidden, generator=data).to(device=device, dtype=torch.bfloat16))
        eager_s = _time(lambda: block(x), args.repeats)
        compiled_s = _time(lambda: compiled(x), args.repeats)

    print("ATen graph before the passes (call_function nodes):")
    print(graphs.get("before", "    <not captured>"))
    print("\nATen graph after lowering and verification:")
    print(graphs.get("after", "    <not captured>"))

    def err(a, b):
        a, b = a.float(), b.float()
        return (a - b).abs().max().item(), ((a - b).norm() / b.norm()).item()

    print(f"\nnumerics on {args.tokens} tokens (max abs error, relative Frobenius error):")
    for label, (a, b) in {"compiled vs eager": (y_compiled, y_eager),
                          "compiled vs reference (plain-torch TRTLLM semantics)": (y_compiled, y_ref),
                          "compiled vs unquantized fp32 block (NVFP4 error)": (y_compiled, y_float)}.items():
        mx, rel = err(a, b)
        print(f"    {label:<55} {mx:.3e}   {rel:.3e}")
    print("    (the first two check the compiler: bf16 rounding only. The third is the price of 4-bit weights and\n"
          "     activations; ReLU^2 squares the activation error, so ~10-20% is expected for this block.)")
    print(f"\ntimings on {device} ({args.inner} inner compiler, {args.tokens} tokens):")
    print(f"    first call (trace + passes + compile):  {compile_s:8.2f} s")
    print(f"    eager forward:                          {eager_s * 1e3:8.2f} ms")
    print(f"    compiled forward:                       {compiled_s * 1e3:8.2f} ms")
    print(f"    also ran token counts {other_tokens}: one graph serves every count from 2 up, one token gets its own")
    print("\nThe CPU kernel is the reference emulation of the TRTLLM kernel: it shows the graph and the numerics, "
          "not speed. On Hopper the Triton kernel runs (one token: a one-launch CUDA decode); on Blackwell "
          "FlashInfer's TRTLLM-gen kernel.")
    return 0


def plan(args) -> int:
    from moe_passes.contract import MoEShape
    from moe_passes.errors import MoEError
    from moe_passes.kernels import registry

    # A layer no kernel could ever run is an error of the command, not a line in its report.
    try:
        MoEShape(hidden=args.hidden, intermediate=args.intermediate, experts=args.experts, top_k=args.top_k,
                 activation=args.activation)
        registry.check_routing(args.routing, args.top_k, args.experts)
    except MoEError as exc:
        print(f"moe-nvfp4 plan: error: impossible MoE layer: {exc}", file=sys.stderr)
        return 2
    runnable = 0
    print(f"MoE layer: hidden={args.hidden} intermediate={args.intermediate} experts={args.experts} "
          f"top_k={args.top_k} activation={args.activation} routing={args.routing} tokens={args.tokens}\n")
    for name in registry.names():
        spec = registry.get(name)
        print(f"kernel {name!r}: {spec.description}")
        warnings_ = []
        try:
            shape = MoEShape(hidden=args.hidden, intermediate=args.intermediate, experts=args.experts,
                             top_k=args.top_k, activation=args.activation, alignment=spec.alignment)
            registry.check_supported(spec, activation=args.activation, routing=args.routing)
        except MoEError as exc:
            print(f"    cannot run this layer: {exc}\n")
            continue
        print(f"    hidden        {shape.hidden} -> {shape.hidden_padded} (alignment {spec.alignment.hidden})")
        print(f"    intermediate  {shape.intermediate} -> {shape.intermediate_padded} "
              f"(alignment {spec.alignment.intermediate(args.activation)})")
        limit = spec.max_tokens(args.experts, args.top_k) if spec.max_tokens else None
        chunks = math.ceil(args.tokens / limit) if limit else 1
        print(f"    chunking      {'no limit' if limit is None else f'{limit} tokens per launch'}; "
              f"{args.tokens} tokens -> {chunks} launch(es)")
        unpadded = MoEShape(hidden=args.hidden, intermediate=args.intermediate, experts=args.experts,
                            top_k=args.top_k, activation=args.activation,
                            alignment=type(spec.alignment)(16, 16, 16))
        print(f"    weight bytes  {shape.weight_bytes() / 2**20:.1f} MiB "
              f"({shape.weight_bytes() / unpadded.weight_bytes() - 1:+.1%} from padding)")
        if name == "triton":
            _print_hopper_plan(args, shape)
        if shape.needs_hidden_pad:
            warnings_.append(f"hidden is padded by {shape.hidden_padded - shape.hidden}: activations move "
                             f"{shape.hidden_padded / shape.hidden - 1:.1%} more bytes per call")
        if not spec.available(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
            warnings_.append("not available on this machine")
        for w in warnings_:
            print(f"    warning       {w}")
        print()
        runnable += 1
    if not runnable:
        print("moe-nvfp4 plan: error: no registered kernel can run this layer (reasons above)", file=sys.stderr)
        return 1
    return 0


PLAN_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)


def _print_hopper_plan(args, shape) -> None:
    """The Hopper planner's variant, config and reason for each token count (``kernels/triton_plan.py``)."""
    from moe_passes.contract import PARAMETRIC_ACTIVATIONS, is_gated
    from moe_passes.kernels.options import current
    from moe_passes.kernels.triton_moe import device_info
    from moe_passes.kernels.triton_plan import H200, Problem, plan

    if torch.cuda.is_available():
        device, where = device_info("cuda"), torch.cuda.get_device_name()
    else:  # the plan an H200 with the project's Triton (3.6, Gluon's Hopper API) runs, whatever Triton is here
        device, where = dataclasses.replace(H200, gluon=True), "an H200 (no GPU here: 132 SMs, SM90, Triton with Gluon)"
    print(f"    plan          per token count on {where}: variant [config]: why")
    for tokens in sorted({*PLAN_TOKENS, args.tokens}):
        problem = Problem(tokens, args.top_k, args.experts, shape.hidden_padded, shape.intermediate_padded,
                          is_gated(args.activation), args.routing,
                          activation_params=args.activation in PARAMETRIC_ACTIVATIONS)
        print(f"    {tokens:>13}  {plan(problem, device, current()).describe()}")


def bench(argv) -> int:
    try:
        from moe_passes import bench as bench_module
    except ImportError:
        print("moe-nvfp4 bench: the benchmark module is not available in this install", file=sys.stderr)
        return 2
    return bench_module.main(argv)


def _device_problem(name: str):
    """Why ``--device name`` cannot run the demo here, or None."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        return f"--device {name!r} is not a device: {exc}"
    if device.type == "meta":
        return "--device meta holds no data: the demo compares real outputs; use cpu or cuda"
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        return f"--device {name}: {why} (torch {torch.__version__}); run with --device cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        return f"--device {name} cannot be used here: {exc}"
    return None


def main(argv=None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # inside the try: a reader that left early fails this flush, not the exit's
        return status
    except BrokenPipeError:
        # `moe-nvfp4 plan | head`: the reader went away, which is not an error worth a traceback.  Point
        # stdout at devnull so the interpreter's final flush does not raise again (Python's documented way).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="moe-nvfp4", description="NVFP4 MoE torch.compile backend tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="compile a Nemotron-3-Nano-shaped MoE block and show the passes")
    p_demo.add_argument("--tokens", type=int, default=64)
    p_demo.add_argument("--inner", choices=("inductor", "eager"), default="inductor")
    p_demo.add_argument("--device", default="cpu")
    p_demo.add_argument("--repeats", type=int, default=3)
    p_demo.add_argument("--seed", type=int, default=0)
    p_plan = sub.add_parser("plan", help="padded sizes, chunking and weight bytes of a layer for each kernel, and "
                                         "the Hopper kernel's variant per token count")
    p_plan.add_argument("--hidden", type=int, required=True)
    p_plan.add_argument("--intermediate", type=int, required=True)
    p_plan.add_argument("--experts", type=int, required=True)
    p_plan.add_argument("--top-k", type=int, required=True)
    p_plan.add_argument("--tokens", type=int, default=1)
    p_plan.add_argument("--activation", default="silu", choices=ACTIVATIONS)
    p_plan.add_argument("--routing", default="renormalize", choices=ROUTING_METHODS)
    sub.add_parser("bench", help="GPU benchmarks (see benchmarks/)", add_help=False)
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    args = parser.parse_args(argv)
    if args.tokens <= 0:
        parser.error("--tokens must be positive")
    if args.command == "demo":
        problem = _device_problem(args.device)
        if problem:
            p_demo.error(problem)
        if args.repeats < 1:
            p_demo.error("--repeats must be at least 1")
    return demo(args) if args.command == "demo" else plan(args)


if __name__ == "__main__":
    sys.exit(main())
