"""The ``moe_nvfp4`` torch.compile backend: Dynamo graph -> AOT (ATen) -> passes -> inner compiler.

Found through the ``torch_dynamo_backends`` entry point, so ``torch.compile(m, backend="moe_nvfp4")``
works without importing this package first.  Options (``torch.compile(..., options={...})``):

``inner``         ``"inductor"`` (default) or ``"eager"`` (run the rewritten ATen graph as is; debugging)
``extra_passes``  callables ``pass_(gm) -> PassResult | None`` run on the ATen graph after the built-in
                  rewrites and before verification
``dump_dir``      write every graph (Dynamo's, each pass's before/after, the final one) there via depyf
``parallel``      the ``ExpertParallel`` / ``TensorParallel`` the model's layers were sharded with: its rank,
                  world size and group go into the cache key, and a layer sharded otherwise is an error

Everything is scoped to the compile call: no process-wide inductor hook is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx

from moe_passes.errors import MoEConfigError
from moe_passes.passes import PassManager, default_pipeline

__all__ = ["BackendOptions", "moe_nvfp4_backend", "compile_aten_graph"]

_INNER = ("inductor", "eager")


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    inner: str = "inductor"
    extra_passes: tuple = ()
    dump_dir: Optional[str] = None
    # Observers the testing kit attaches to the pass manager (called as observer(stage, name, gm)).
    observers: tuple = ()
    parallel: Optional[object] = None

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "BackendOptions":
        options = dict(options or {})
        unknown = set(options) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MoEConfigError(f"unknown moe_nvfp4 backend option(s) {sorted(unknown)}; "
                                 f"known: {[f.name for f in dataclasses.fields(cls)]}")
        inner = options.get("inner", "inductor")
        if inner not in _INNER:
            raise MoEConfigError(f"option inner={inner!r} must be one of {_INNER}")
        passes = options.get("extra_passes") or ()
        if callable(passes):
            passes = (passes,)
        for p in passes:
            if not callable(p):
                raise MoEConfigError(f"extra_passes entries must be callables taking a GraphModule, got {p!r}")
        dump_dir = options.get("dump_dir")
        return cls(inner=inner, extra_passes=tuple(passes), dump_dir=None if dump_dir is None else os.fspath(dump_dir),
                   observers=tuple(options.get("observers") or ()), parallel=options.get("parallel"))


def _inner_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], inner: str) -> Callable:
    from torch._functorch.aot_autograd import make_boxed_func

    if inner == "eager":
        return make_boxed_func(gm.forward)
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, example_inputs)


def _dumper(dump_dir: Optional[str]):
    if dump_dir is None:
        return None
    os.makedirs(dump_dir, exist_ok=True)
    counter = iter(range(1_000_000))

    def dump(label: str, gm: torch.fx.GraphModule) -> None:
        path = os.path.join(dump_dir, f"moe_nvfp4_{next(counter):03d}_{label}.py")
        with open(path, "w") as f:
            f.write(gm.print_readable(print_output=False))

    return dump


def compile_aten_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], manager: PassManager,
                       inner: str = "inductor") -> Callable:
    """Run the pass pipeline on an ATen graph, then hand it to the inner compiler."""
    manager.run(gm)
    return _inner_compile(gm, example_inputs, inner)


def _check_inference(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """The MoE ops have no backward: refuse, clearly, a graph that would need one."""
    from moe_passes.ops import FUSED_MOE

    moe_targets = (FUSED_MOE, FUSED_MOE.overloadpacket)
    moe_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in moe_targets]
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    if moe_nodes and needs_grad:
        raise MoEConfigError(
            "moe_nvfp4 compiles inference graphs: the FusedMoE op has no backward, but this graph has inputs "
            "that require grad (e.g. router or shared-expert parameters). Run the model under torch.no_grad() or "
            "torch.inference_mode(), or call model.requires_grad_(False).")


def moe_nvfp4_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None):
    """The torch.compile backend.  See the module docstring for ``options``."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.decomposition import select_decomp_table

    opts = BackendOptions.from_dict(options)
    _check_inference(gm, example_inputs)
    manager = default_pipeline(opts.extra_passes, parallel=opts.parallel, dump_fn=_dumper(opts.dump_dir))
    manager.observers.extend(opts.observers)

    def forward_compiler(aten_gm, aten_inputs):
        return compile_aten_graph(aten_gm, aten_inputs, manager, opts.inner)

    def backward_compiler(aten_gm, aten_inputs):
        # The MoE ops have no autograd formula; backward graphs only hold the rest of the model.
        return _inner_compile(aten_gm, aten_inputs, opts.inner)

    debug = contextlib.nullcontext()
    if opts.dump_dir is not None:
        import depyf

        debug = depyf.prepare_debug(opts.dump_dir)
    with debug:
        return aot_module_simplified(
            gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
            inference_compiler=forward_compiler, decompositions=select_decomp_table())
