"""Host time of one Triton kernel launch, by launch path: where a MoE call's launches spend the host's time.

    python benchmarks/launch_cost.py [--out DIR]

A kernel with our kernels' argument mix (8 tensors, 8 integers, 8 constexprs; an empty body, so the GPU never
holds the host back) launched ``--launches`` times per path:

- ``jit``: ``fn[grid](...)``, Triton's own path (its binder, cache key, launch metadata, hooks, then its C
  launcher), which ``triton_launch.launch`` takes on a miss or with hooks installed;
- ``bound``: the ``CompiledKernel``'s launcher called directly with no launch hooks, as ``triton_launch.launch``
  does once a specialization is bound;
- ``inductor_static``: inductor's C++ launcher for compiled Triton kernels (``StaticallyLaunchedCudaKernel``,
  a private torch API; skipped where this torch lacks it or refuses the kernel). It has no programmatic
  dependent launch.

Also ``torch.empty`` on the GPU, for the allocations between launches.  Writes ``launch_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _args24(a, b, c, d, e, f, g, h, n1, n2, n3, n4, n5, n6, n7, n8, C1: tl.constexpr, C2: tl.constexpr,
            C3: tl.constexpr, C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr,
            C8: tl.constexpr):
    pass


def _static_launcher(kernel, folder: str):
    """Inductor's static launcher of ``kernel`` (its module moved between torch releases), or the reason not.
    It loads the cubin from a file, as inductor's own kernels keep theirs."""
    try:
        from torch._inductor.runtime.static_triton_launcher import StaticallyLaunchedCudaKernel
    except ImportError:
        try:
            from torch._inductor.runtime.static_cuda_launcher import StaticallyLaunchedCudaKernel
        except ImportError:
            return None, "this torch has no static Triton launcher"
    kernel._cubin_path = os.path.join(folder, "args24.cubin")
    with open(kernel._cubin_path, "wb") as f:
        f.write(kernel.asm["cubin"])
    try:
        launcher = StaticallyLaunchedCudaKernel(kernel)
        launcher.load_kernel(torch.cuda.current_device())
    except (NotImplementedError, RuntimeError, AttributeError) as e:
        return None, f"refused: {e}"
    return launcher, None


def _per_call_us(fn, n: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the host time per call of ``n`` calls in a row."""
    times = []
    for _ in range(repeats):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=2000)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    tensors = [torch.empty(1024, device=dev) for _ in range(8)]
    ints = [2048, 768, 128, 16384, 3, 5, 4096, 8]  # none is 1: every one stays a runtime argument
    consts = dict(C1=64, C2=128, C3=True, C4=False, C5=1, C6=2, C7=3, C8=0)
    grid = (64, 2, 1)
    kernel = _args24[grid](*tensors, *ints, **consts, num_warps=4, num_stages=3)
    values = (*tensors, *ints, *consts.values())
    from triton.runtime import driver
    stream_of = driver.active.get_current_stream  # what Triton's own launch reads: each path pays the same
    index = torch.cuda.current_device()

    def jit():
        _args24[grid](*tensors, *ints, **consts, num_warps=4, num_stages=3)

    def bound():
        kernel.run(*grid, stream_of(index), kernel.function, kernel.packed_metadata, None, None, None, *values)

    paths = {"jit": jit, "bound": bound}
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="launch_cost_") as cubins:  # the launcher reads it once, at load
        static, why = _static_launcher(kernel, cubins)
    if static is not None:
        paths["inductor_static"] = lambda: static.run(*grid, stream_of(index), *tensors, *ints)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "launches": args.launches, "us_per_launch": {}, "inductor_static": why or "ran"}
    for name, fn in paths.items():
        result["us_per_launch"][name] = round(_per_call_us(fn, args.launches), 2)
    result["us_per_torch_empty"] = round(_per_call_us(lambda: torch.empty(100, device=dev), args.launches), 2)
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.out, "launch_cost.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
