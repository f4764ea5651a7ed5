"""The ``moe_nvfp4`` torch.compile backend: inductor's whole pipeline with our passes as its post-grad pass.

Found through the ``torch_dynamo_backends`` entry point, so ``torch.compile(m, backend="moe_nvfp4")``
works without importing this package first.  For the duration of one compile call the pass pipeline
(:func:`moe_passes.passes.default_pipeline`) is inductor's ``post_grad_custom_post_pass``, a
:class:`~torch._inductor.custom_graph_pass.CustomGraphPass` whose ``uuid()`` is the pass manager's, and the
graph goes through ``compile_fx`` exactly as for ``backend="inductor"``: ``mode=`` presets, CUDA graph trees
with parameters and buffers as static inputs, max-autotune and the FX graph cache all hold.

``mode``          ``torch.compile``'s ``mode=`` (``"reduce-overhead"``, ``"max-autotune"``, ...); since
                  ``torch.compile`` refuses ``mode=`` together with ``options=``, ``options={"mode": ...}``
                  works too
``inner``         ``"inductor"`` (default) or ``"eager"``: AOT autograd, the passes, then the ATen graph run
                  as is (debugging; no mode, no inductor options)
``extra_passes``  callables ``pass_(gm) -> PassResult | None`` run after the built-in rewrites and before
                  verification
``dump_dir``      write every graph (Dynamo's, each pass's before/after) there, also through depyf
``observers``     ``observer(stage, pass_name, gm)`` callbacks (the testing kit's recorder)
``parallel``      the ``ExpertParallel`` / ``TensorParallel`` the model's layers were sharded with: its rank,
                  world size and group go into the cache key, and a layer sharded over another process group is
                  an error (the combine follows each layer's own mode: expert or tensor parallel, data parallel)
any other key     an inductor config option, as ``torch.compile(..., backend="inductor", options=...)`` takes

Nothing process-wide is left installed: the inductor config is patched around the one compile call.  On an FX
graph cache hit the passes do not run again (their uuid, docs/passes.md, is part of the key); a pass that
records something each time it runs wants ``options={"fx_graph_cache": False}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from moe_passes.errors import MoEConfigError
from moe_passes.passes import PassManager, default_pipeline

__all__ = ["BackendOptions", "MoEPostGradPass", "moe_nvfp4_backend"]

_INNER = ("inductor", "eager")
_OWN_KEYS = ("mode", "inner", "extra_passes", "dump_dir", "observers", "parallel")


def _inductor_config_keys() -> set:
    from torch._inductor import config

    return set(config.get_config_copy())


def _modes() -> dict:
    from torch._inductor import list_mode_options

    return list_mode_options()


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    mode: Optional[str] = None
    inner: str = "inductor"
    extra_passes: tuple = ()
    dump_dir: Optional[str] = None
    # Observers the testing kit attaches to the pass manager (called as observer(stage, name, gm)).
    observers: tuple = ()
    # Inductor config options, passed on as torch.compile(backend="inductor", options=...) would.
    inductor: tuple = ()
    parallel: Optional[object] = None

    @classmethod
    def from_dict(cls, options: Optional[dict], mode: Optional[str] = None) -> "BackendOptions":
        options = dict(options or {})
        if mode is not None and options.get("mode") not in (None, mode):
            raise MoEConfigError(f"mode={mode!r} and options['mode']={options['mode']!r} disagree; give one")
        mode = options.pop("mode", None) or mode
        if mode == "default":
            mode = None
        if mode is not None and mode not in _modes():
            raise MoEConfigError(f"unknown mode {mode!r}; torch.compile's modes are {sorted(_modes())}")
        inner = options.get("inner", "inductor")
        if inner not in _INNER:
            raise MoEConfigError(f"option inner={inner!r} must be one of {_INNER}")
        inductor = {k.replace("-", "_"): v for k, v in options.items() if k not in _OWN_KEYS}
        if inductor:
            known = _inductor_config_keys()
            unknown = sorted(k for k in inductor if k not in known)
            if unknown:
                raise MoEConfigError(
                    f"unknown moe_nvfp4 backend option(s) {unknown}: the backend takes {list(_OWN_KEYS)} and "
                    f"inductor's config options (torch._inductor.config, e.g. 'max_autotune', 'triton.cudagraphs')")
            if "post_grad_custom_post_pass" in inductor:
                raise MoEConfigError("post_grad_custom_post_pass is where moe_nvfp4 runs its passes: give your "
                                     "pass as options={'extra_passes': [...]}")
            try:  # a value of the wrong type is the caller's error: inductor's own option check, run now
                torch._TorchCompileInductorWrapper(None, dict(inductor), dynamic=None)
            except (TypeError, RuntimeError, AssertionError) as exc:
                raise MoEConfigError(f"inductor options {inductor}: {exc}") from None
        if inner == "eager" and (mode is not None or inductor):
            raise MoEConfigError(f"inner='eager' runs the ATen graph without inductor: mode={mode!r} and inductor "
                                 f"options {sorted(inductor)} need inner='inductor'")
        passes = options.get("extra_passes") or ()
        passes = (passes,) if callable(passes) else tuple(passes)  # a generator is read once, here
        for p in passes:
            if not callable(p):
                raise MoEConfigError(f"extra_passes entries must be callables taking a GraphModule, got {p!r}")
        parallel = options.get("parallel")
        if parallel is not None:
            from moe_passes.parallel import ExpertParallel, TensorParallel

            if not isinstance(parallel, (ExpertParallel, TensorParallel)):
                raise MoEConfigError(f"options['parallel'] must be the ExpertParallel or TensorParallel the model's "
                                     f"layers were sharded with, got {parallel!r}")
        dump_dir = options.get("dump_dir")
        if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
            raise MoEConfigError(f"option dump_dir must be a path, got {dump_dir!r}")
        observers = options.get("observers") or ()
        observers = (observers,) if callable(observers) else tuple(observers)
        if not all(callable(o) for o in observers):
            raise MoEConfigError(f"observers must be callables observer(stage, pass_name, gm), got {observers!r}")
        return cls(mode=mode, inner=inner, extra_passes=passes,
                   dump_dir=None if dump_dir is None else os.fspath(dump_dir),
                   observers=observers,
                   inductor=tuple(sorted(inductor.items())),
                   parallel=parallel)

    @property
    def cudagraphs(self) -> bool:
        settings = {**(_modes().get(self.mode, {}) if self.mode else {}), **dict(self.inductor)}
        return bool(settings.get("triton.cudagraphs", False))


class MoEPostGradPass(CustomGraphPass):
    """The pass pipeline as inductor's post-grad custom pass.

    ``uuid()`` is the pass manager's (each pass's code), so inductor's FX graph cache keys on it.  A pass that
    was already configured runs first, where inductor would have run it, and enters the key too.
    """

    def __init__(self, manager: PassManager, previous: Optional[Callable] = None):
        self.manager = manager
        self.previous = previous

    def __call__(self, graph: torch.fx.Graph) -> None:
        for previous in self._previous():
            previous(graph)
        self.manager.run(graph.owning_module)

    def _previous(self) -> tuple:
        # inductor also takes a list of passes there
        return tuple(self.previous) if isinstance(self.previous, (list, tuple)) else (
            () if self.previous is None else (self.previous,))

    def uuid(self) -> Any:
        previous = []
        for p in self._previous():
            key = p.uuid() if hasattr(p, "uuid") else None
            if key is None:  # inductor cannot key an uncacheable pass: neither can we
                return None
            previous.append(key)
        ours = self.manager.uuid()
        return None if ours is None else (ours, tuple(previous))


def _dumper(dump_dir: Optional[str]):
    if dump_dir is None:
        return None
    os.makedirs(dump_dir, exist_ok=True)
    # numbered on from what the directory holds: a second graph (a graph break, a recompile) adds, not overwrites
    counter = itertools.count(sum(n.startswith("moe_nvfp4_") for n in os.listdir(dump_dir)))

    def dump(label: str, gm: torch.fx.GraphModule) -> None:
        path = os.path.join(dump_dir, f"moe_nvfp4_{next(counter):03d}_{label}.py")
        with open(path, "w") as f:
            f.write(gm.print_readable(print_output=False))

    return dump


def _check_inference(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions) -> None:
    """The MoE ops have no backward, and CUDA graphs here serve inference: refuse, clearly, a graph that
    would need a backward where it cannot have one."""
    from moe_passes.ops import FUSED_MOE

    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
    if not needs_grad:
        return
    moe_targets = (FUSED_MOE, FUSED_MOE.overloadpacket)
    if any(n.op == "call_function" and n.target in moe_targets for n in gm.graph.nodes):
        raise MoEConfigError(
            "moe_nvfp4 compiles inference graphs: the FusedMoE op has no backward, but this graph has inputs "
            "that require grad (e.g. router or shared-expert parameters). Run the model under torch.no_grad() or "
            "torch.inference_mode(), or call model.requires_grad_(False).")
    if opts.cudagraphs:
        raise MoEConfigError(
            f"moe_nvfp4 with mode={opts.mode!r} (CUDA graphs) compiles inference graphs, but this graph has inputs "
            "that require grad. Run it under torch.no_grad() or torch.inference_mode(), or compile the training "
            "model with backend='inductor'.")


def _compile_eager(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], manager: PassManager) -> Callable:
    """AOT autograd to an ATen graph, the passes, then the graph run as it is."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._inductor.decomposition import select_decomp_table

    def forward_compiler(aten_gm, aten_inputs):
        manager.run(aten_gm)
        return make_boxed_func(aten_gm.forward)

    def backward_compiler(aten_gm, aten_inputs):
        # The MoE ops have no autograd formula; backward graphs only hold the rest of the model.
        return make_boxed_func(aten_gm.forward)

    return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                                 inference_compiler=forward_compiler, decompositions=select_decomp_table())


def _compile_inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], manager: PassManager,
                      opts: BackendOptions) -> Callable:
    from torch._inductor import config

    # What torch.compile(backend="inductor", mode=..., options=...) builds: mode presets, option checks, and
    # its CUDA-graph-with-profiler workarounds.
    inductor = torch._TorchCompileInductorWrapper(opts.mode, dict(opts.inductor), dynamic=None)
    previous = config.post_grad_custom_post_pass
    for p in previous if isinstance(previous, (list, tuple)) else [previous]:
        if p is not None and "is_inference" in inspect.signature(p.__call__).parameters:
            raise MoEConfigError(f"the configured post_grad_custom_post_pass {p!r} takes is_inference, which "
                                 "moe_nvfp4 cannot pass on: give it as options={'extra_passes': [...]}")
    patches = {"post_grad_custom_post_pass": MoEPostGradPass(manager, previous)}
    if manager.observers or manager.dump_fn is not None:
        # A cache hit would skip the passes, and with them what the observers and the dump directory record.
        patches["fx_graph_cache"] = False
    with config.patch(patches):
        return inductor(gm, example_inputs)


def moe_nvfp4_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None,
                      mode: Optional[str] = None):
    """The torch.compile backend.  See the module docstring for ``mode`` and ``options``."""
    opts = BackendOptions.from_dict(options, mode=mode)
    _check_inference(gm, example_inputs, opts)
    manager = default_pipeline(opts.extra_passes, parallel=opts.parallel, dump_fn=_dumper(opts.dump_dir))
    manager.observers.extend(opts.observers)
    debug = contextlib.nullcontext()
    if opts.dump_dir is not None:
        import depyf

        debug = depyf.prepare_debug(opts.dump_dir)
    with debug:
        if opts.inner == "eager":
            return _compile_eager(gm, example_inputs, manager)
        return _compile_inductor(gm, example_inputs, manager, opts)
