"""Scale-out of a FusedMoE layer over a ``torch.distributed`` process group.

Two ways to shard a layer when it is prepared (``FusedMoE(..., parallel=...)``):

* :class:`ExpertParallel`: each rank keeps a contiguous block of whole experts (``local_expert_offset``,
  ``local_num_experts``, as FlashInfer's TRTLLM call takes them).  Every rank routes on the global router
  logits; its kernel computes only the pairs whose expert it holds, so its output is a *partial* sum.
  With ``data_parallel=True`` every rank brings its own tokens (the same count on every rank): the layer
  gathers all ranks' tokens, runs its experts on them and reduce-scatters the partial outputs back.
* :class:`TensorParallel`: each rank keeps a slice of every expert's intermediate dimension, taken in whole
  NVFP4 blocks from the gate and the up halves separately (each half then padded to the kernel's alignment
  on its own).  The GEMM2 outputs are partial sums over the intermediate dimension.

Either way the partial outputs are summed by functional collectives (``_c10d_functional``) that the
``combine_parallel_moe`` pass inserts into the compiled graph right after the slice back to ``H`` (and
before any shared-expert add); the eager FusedMoE op calls the same collectives, so eager and compiled
agree.  Sharding slices the canonical NVFP4 bytes of the unsharded layer (same global and block scales),
so a sharded layer computes exactly the unsharded layer's terms and only the summation order differs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from moe_passes.contract import NVFP4_BLOCK, is_gated
from moe_passes.errors import MoEConfigError

__all__ = ["ExpertParallel", "TensorParallel", "ParallelConfig", "expert_block", "intermediate_block",
           "shard_weights"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise MoEConfigError("parallel MoE layers need an initialized torch.distributed process group "
                             "(torch.distributed.init_process_group)")
    return dist


@dataclasses.dataclass(frozen=True)
class _Parallel:
    """Common part: the process group (None = the default group) and what it says about this rank."""

    group: Optional[object] = None

    mode = ""

    @property
    def process_group(self):
        dist = _dist()
        return self.group if self.group is not None else dist.group.WORLD

    @property
    def rank(self) -> int:
        return _dist().get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        return _dist().get_world_size(self.process_group)

    @property
    def group_name(self) -> str:
        """The name the functional collectives take (``_c10d_functional.all_reduce(x, "sum", name)``)."""
        return self.process_group.group_name

    def describe(self) -> str:
        """Mode, rank, world size and group: part of the combine pass's cache key."""
        return f"{self.mode}(rank={self.rank}, world_size={self.world_size}, group={self.group_name!r})"


@dataclasses.dataclass(frozen=True)
class ExpertParallel(_Parallel):
    """Shard whole experts over ``group``; ``data_parallel``: the ranks also split the tokens."""

    data_parallel: bool = False

    mode = "ep"

    def describe(self) -> str:
        return super().describe()[:-1] + f", data_parallel={self.data_parallel})"


@dataclasses.dataclass(frozen=True)
class TensorParallel(_Parallel):
    """Shard every expert's intermediate dimension over ``group``."""

    mode = "tp"


ParallelConfig = Union[ExpertParallel, TensorParallel]


def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    # Balanced contiguous split: the first n % parts pieces get one more.
    if not 0 <= index < parts:  # get_rank gives -1 to a process outside the group
        raise MoEConfigError(f"rank {index} is not one of the {parts} ranks of the process group (is this process "
                             f"a member of the group the layer is sharded over?)")
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (index < extra)


def expert_block(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(local_expert_offset, local_num_experts)`` of ``rank``: a contiguous block of the global experts."""
    if num_experts < world_size:
        raise MoEConfigError(f"expert parallelism over {world_size} ranks needs at least as many experts, "
                             f"got {num_experts}")
    return _split(num_experts, world_size, rank)


def intermediate_block(intermediate: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, size)`` of ``rank``'s slice of the intermediate dimension, in whole NVFP4 blocks (GEMM2
    reduces over it and its block scales cover 16 elements, so a slice must not cut a block)."""
    blocks = -(-intermediate // NVFP4_BLOCK)
    if blocks < world_size:
        raise MoEConfigError(f"tensor parallelism over {world_size} ranks needs an intermediate size of at least "
                             f"{world_size} NVFP4 blocks ({world_size * NVFP4_BLOCK}), got {intermediate}")
    start, size = _split(blocks, world_size, rank)
    return start * NVFP4_BLOCK, size * NVFP4_BLOCK


def shard_weights(weights, parallel: ParallelConfig, *, activation: str, intermediate: int, rank: int,
                  world_size: int):
    """``(local weights, info)`` for ``rank``: canonical NVFP4 weights sliced (contiguous copies, so the
    unsharded tensors are not kept alive).  ``info`` holds ``local_expert_offset``, ``global_num_experts``
    and ``intermediate`` (the rank's intermediate size before kernel padding)."""
    from moe_passes.kernels import registry

    if not isinstance(parallel, (ExpertParallel, TensorParallel)):
        raise MoEConfigError(f"parallel must be ExpertParallel or TensorParallel, got {parallel!r}")
    w13, s13, g13, w2, s2, g2 = weights
    experts = w13.shape[0]
    if isinstance(parallel, ExpertParallel):
        offset, count = expert_block(experts, world_size, rank)
        local = [t[offset:offset + count].contiguous() for t in weights]
        return registry.MoEWeights(*local), dict(local_expert_offset=offset, global_num_experts=experts,
                                                  intermediate=intermediate)
    # Canonical rows are the gate half then the up half, each padded to the NVFP4 block on its own.
    half = w2.shape[2] * 2
    start, size = intermediate_block(half, world_size, rank)
    if is_gated(activation):
        rows = torch.cat([torch.arange(start, start + size), torch.arange(half + start, half + start + size)])
    else:
        rows = torch.arange(start, start + size)
    rows = rows.to(w13.device)
    local = registry.MoEWeights(
        w13.index_select(1, rows).contiguous(), s13.view(torch.uint8).index_select(1, rows).view(s13.dtype).contiguous(),
        g13.clone(), w2[:, :, start // 2:(start + size) // 2].contiguous(),
        s2[:, :, start // NVFP4_BLOCK:(start + size) // NVFP4_BLOCK].contiguous(), g2.clone())
    true_size = max(0, min(intermediate, start + size) - start)
    return local, dict(local_expert_offset=0, global_num_experts=None, intermediate=true_size)


# -- the collectives (the same ops eagerly and in the compiled graph) ----------------------------------

def group_size(group_name: str) -> int:
    """World size of the process group the functional collectives know as ``group_name``."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).size()


def all_gather(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """Every rank's ``t`` (equal shapes) stacked along dim 0, rank order."""
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_gather_into_tensor(t.contiguous(), group_size(group_name), group_name))


def combine(partial: torch.Tensor, group_name: str, data_parallel: bool = False) -> torch.Tensor:
    """The sum over the group of every rank's partial output; with ``data_parallel`` each rank keeps its own
    tokens' rows (a reduce-scatter of the gathered tokens)."""
    c10d = torch.ops._c10d_functional
    if data_parallel:
        return c10d.wait_tensor(c10d.reduce_scatter_tensor(partial.contiguous(), "sum", group_size(group_name),
                                                           group_name))
    return c10d.wait_tensor(c10d.all_reduce(partial.contiguous(), "sum", group_name))
