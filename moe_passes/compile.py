"""``moe_passes.compile``: ``torch.compile`` with the moe_nvfp4 backend and a dynamic token count."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from moe_passes.errors import MoEConfigError

__all__ = ["compile"]


def compile(model: Callable, *, inner: str = "inductor", extra_passes: Iterable[Callable] = (),
            dump_dir: Optional[str] = None, parallel: Any = None, **compile_kwargs: Any) -> Callable:
    """``torch.compile(model, backend="moe_nvfp4", dynamic=True, ...)`` with the backend's options as
    keywords; the result is torch.compile's own (the model itself is unchanged).

    Sizes start symbolic, so the first compile serves every token count of 2 or more.  Dynamo's shape
    rules are left as they are: a size of 1 (one token, a decode step) gets a graph of its own, as under
    plain ``torch.compile``; the MoE ops add no guard on the token count.  Other keyword arguments
    (``fullgraph``, ``mode``, ``dynamic``, ``options``, ...) go to ``torch.compile``.  ``parallel``: the
    ``ExpertParallel`` / ``TensorParallel`` the model's layers were sharded with (the backend's ``parallel``
    option: it inserts and checks the collectives).

    ``model.generate`` calls the module, not the object returned here: for generation compile the
    forward, ``model.forward = moe_passes.compile(model.forward)``.
    """
    options = dict(compile_kwargs.pop("options", None) or {})
    if inner != "inductor":
        options["inner"] = inner
    if extra_passes:
        options["extra_passes"] = list(extra_passes)
    if dump_dir is not None:
        options["dump_dir"] = dump_dir
    if parallel is not None:
        options["parallel"] = parallel
    compile_kwargs.setdefault("dynamic", True)
    if options and compile_kwargs.get("mode") is not None:
        # torch.compile refuses mode= together with options=; the backend reads the mode from its options too
        mode = compile_kwargs.pop("mode")
        if options.get("mode", mode) != mode:
            raise MoEConfigError(f"mode={mode!r} and options['mode']={options['mode']!r} disagree; give one")
        options["mode"] = mode
    return torch.compile(model, backend="moe_nvfp4", options=options or None, **compile_kwargs)
