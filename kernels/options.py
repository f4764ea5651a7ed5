"""Every knob of the kernels in one frozen object, passed per call instead of patched into module globals.

A call takes its options from ``RunArgs.options`` (the registry's ``run``) or the kernel entry's ``options=``
keyword; where neither gives them, :func:`current` does: the options of the innermost :func:`use` block, else
the process default built once by :meth:`KernelOptions.from_env`, the one place that reads the environment.
Options are hashable, so plans can be cached per (shape, tokens, device, options).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Iterator, Mapping, Optional

from moe_passes.errors import MoEConfigError

__all__ = ["KernelOptions", "current", "use", "TRITON_INTERPRET"]

# Triton's own switch for its CPU interpreter, under which bf16 dots are mishandled (the tiles upcast there).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Knobs of the Hopper path (Triton kernels and the one-token CUDA decode) and of the TRTLLM chunking.

    The defaults are what the benchmarks measured best; the others exist for A/B runs and escape hatches.
    """

    # Programmatic dependent launch (SM90+) for the Triton kernels: a decode call's launches chained, and a tile
    # call's where its plan says so (TileConfig.chains, .overlap).
    pdl: bool = True
    # One token on SM90 takes the one-launch CUDA decode (cuda_decode) instead of the Triton path.
    cuda_decode: bool = True
    # The CUDA decode's own programmatic dependent launch (it may start while the previous kernel drains).
    cuda_decode_pdl: bool = True
    # CUDA decode: warps that decode and multiply (one more streams the weights); 12 measured best.
    cuda_decode_warps: int = 12
    # CUDA decode: the most intermediate bands in one segment (its sums stay in shared memory until GEMM2).
    cuda_decode_max_units: int = 8
    # CUDA decode: a cap on the shared-memory ring's stages (None: as many as fit).
    cuda_decode_stage_cap: Optional[int] = None
    # CUDA decode: w2 by tensor copies where every piece is whole (one bulk copy per block measured 2x slower).
    cuda_decode_w2_tma: bool = True
    # Up to this many pairs (and 16-row blocks) the expert grouping is one program instead of three launches.
    one_program_pairs: int = 1024
    # A/B experiments: ``((field, value), ...)`` replacing fields of the config the planner picks, for the
    # tensor-core decode (``DecodeConfig``) and for the tiles (``TileConfig``); a caller's own config is kept.
    decode_overrides: tuple = ()
    tile_overrides: tuple = ()
    # A/B experiments: the Triton variant (``triton_plan.VARIANTS``, not the CUDA decode) every call takes
    # instead of the table's; "" keeps the table.
    variant: str = ""
    # Calls of at most their kernel's ``graph_tokens`` replay a CUDA graph the kernel captured, larger ones their
    # recorded launches (kernels.graphed); False: every call runs the kernel's Python entry.
    call_graphs: bool = True
    # TRTLLM: most tokens per launch (None: the kernel's limit, ``contract.trtllm_chunk_size``); tests lower it.
    trtllm_chunk_size: Optional[int] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            want = {"bool": bool, "int": int, "Optional[int]": (int, type(None))}.get(field.type)
            if want is not None and (not isinstance(value, want) or (want is not bool and isinstance(value, bool))):
                raise MoEConfigError(f"KernelOptions.{field.name} must be {field.type}, got {value!r}")
        if not 1 <= self.cuda_decode_warps <= 31:
            raise MoEConfigError(f"cuda_decode_warps must be 1..31, got {self.cuda_decode_warps}")
        if self.cuda_decode_max_units < 1:
            raise MoEConfigError(f"cuda_decode_max_units must be positive, got {self.cuda_decode_max_units}")
        if self.cuda_decode_stage_cap is not None and self.cuda_decode_stage_cap < 2:
            raise MoEConfigError(f"cuda_decode_stage_cap must be at least 2, got {self.cuda_decode_stage_cap}")
        if self.one_program_pairs < 0:
            raise MoEConfigError(f"one_program_pairs must not be negative, got {self.one_program_pairs}")
        if self.trtllm_chunk_size is not None and self.trtllm_chunk_size <= 0:
            raise MoEConfigError(f"trtllm_chunk_size must be positive, got {self.trtllm_chunk_size}")
        if not isinstance(self.variant, str):
            raise MoEConfigError(f"variant must be a variant name or '', got {self.variant!r}")
        for name in ("decode_overrides", "tile_overrides"):
            pairs = getattr(self, name)
            if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                                       for p in pairs):
                raise MoEConfigError(f"{name} must be a tuple of (field, value) pairs, got {pairs!r}")
            try:
                hash(pairs)  # options key the plan cache
            except TypeError:
                raise MoEConfigError(f"{name} values must be hashable (ints, bools), got {pairs!r}") from None

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "KernelOptions":
        """The defaults with the environment's switches: ``MOE_NVFP4_PDL=0`` (no chained Triton launches) and
        ``MOE_NVFP4_CUDA_DECODE=0`` (one token takes the Triton path)."""
        env = os.environ if environ is None else environ
        return cls(pdl=env.get("MOE_NVFP4_PDL", "1").strip() != "0",
                   cuda_decode=env.get("MOE_NVFP4_CUDA_DECODE", "1").strip() != "0")


@functools.lru_cache(maxsize=1)
def _process_default() -> KernelOptions:
    return KernelOptions.from_env()


_SCOPED: contextvars.ContextVar = contextvars.ContextVar("moe_nvfp4_kernel_options", default=None)


def current(options: Optional[KernelOptions] = None) -> KernelOptions:
    """``options`` when given, else those of the innermost :func:`use` block, else the process default."""
    if options is not None:
        return options
    scoped = _SCOPED.get()
    return scoped if scoped is not None else _process_default()


@contextlib.contextmanager
def use(options: KernelOptions) -> Iterator[KernelOptions]:
    """Calls inside the block that name no options of their own take these (a layer called through the op,
    a compiled model), in this thread or task only."""
    if not isinstance(options, KernelOptions):
        raise MoEConfigError(f"use() takes a KernelOptions, got {type(options).__name__}")
    token = _SCOPED.set(options)
    try:
        yield options
    finally:
        _SCOPED.reset(token)
