"""``moe_passes.compile``: torch.compile with the moe_nvfp4 backend and token-count-friendly shape settings."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["compile", "token_shape_config"]


@contextlib.contextmanager
def token_shape_config():
    """Shape settings under which one compiled graph serves every token count.

    Dynamo gives sizes 0 and 1 their own specialization and, by default, one symbol to equal sizes
    ("duck sizing"): a first call with as many tokens as experts then ties the token count to the expert
    count, which the MoE op checks, and every new token count recompiles.  ``backed_size_oblivious``
    lets a count of 1 share the graph; turning duck sizing off keeps tokens and experts apart.  Both
    are decided while Dynamo traces, before a backend is called, so they cannot live in the backend.
    """
    from torch.fx.experimental import _config as fx_config

    settings = {name: value for name, value in (("backed_size_oblivious", True), ("use_duck_shape", False))
                if hasattr(fx_config, name)}
    with fx_config.patch(**settings):
        yield


def compile(model: Callable, *, inner: str = "inductor", extra_passes: Iterable[Callable] = (),
            dump_dir: Optional[str] = None, **compile_kwargs: Any) -> Callable:
    """``torch.compile(model, backend="moe_nvfp4", dynamic=True, ...)`` whose calls run under
    :func:`token_shape_config`, so one compile serves token counts 1, 7, 64, 300, ...

    Extra keyword arguments go to ``torch.compile`` (``fullgraph``, ``mode`` is not accepted by custom
    backends).  The result is a plain callable; the model itself is unchanged.
    """
    options = {"inner": inner, "extra_passes": list(extra_passes)}
    if dump_dir is not None:
        options["dump_dir"] = dump_dir
    compile_kwargs.setdefault("dynamic", True)
    compiled = torch.compile(model, backend="moe_nvfp4", options=options, **compile_kwargs)

    @functools.wraps(getattr(model, "forward", model))
    def run(*args, **kwargs):
        with token_shape_config():
            return compiled(*args, **kwargs)

    run.compiled = compiled
    return run
