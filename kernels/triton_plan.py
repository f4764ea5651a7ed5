"""The Hopper path's planner: which kernel variant runs a call, with which config, and why.

:func:`plan` is a pure function of the problem (:class:`Problem`), the device's properties
(:class:`DeviceInfo`) and the options (:class:`KernelOptions`); it makes no CUDA call and needs no Triton,
so it runs on a CPU (tests, ``moe-nvfp4 plan``).  The entry point (:func:`triton_moe.fused_moe_triton`)
validates, plans, allocates and launches.

The choice is a table (:data:`REGIMES`): one token on SM90 goes to the one-launch CUDA decode where it takes
the call; otherwise the first row whose token range, rows per expert (``rows = pairs / touched``, the
expected experts touched ``E (1 - (1 - k/E)^T)``) and hidden size hold.  The measurements behind each row are in
docs/architecture.md ("Dispatch") and the results JSON it links.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Union

from moe_passes.errors import MoEConfigError
from moe_passes.kernels.options import KernelOptions

__all__ = ["DecodeConfig", "TileConfig", "Problem", "DeviceInfo", "H200", "Plan", "Regime", "REGIMES", "VARIANTS",
           "plan", "cached_plan", "k_split", "doubled_split", "one_program_grouping", "rows_per_expert"]

# The tensor-core decode steps K in 128-element chunks (8 NVFP4 groups): its splits start on chunks.
DECODE_CHUNK = 128
# The tiles address the banded weights (triton_layout) a 64-element piece at a time.
PIECE = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def k_split(k: int, split: int, step: int) -> tuple:
    """``(elements per split, splits used)``: ``k`` cut into ``split`` parts rounded up to whole ``step``s
    (the last part may be shorter; fewer parts when rounding leaves one empty)."""
    per = _cdiv(_cdiv(k, split), step) * step
    return per, _cdiv(k, per)


def doubled_split(units: int, target: int, k: int, most: int) -> int:
    """A K split doubled while ``units`` programs (or warps) times the split stay under ``target`` and each part
    keeps at least 256 elements of ``k``, up to ``most``."""
    split = 1
    while split < most and units * split < target and k // (256 * split) >= 2:
        split *= 2
    return split


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """The tensor-core decode (:mod:`triton_tc_decode`): one warp per 16 weight rows, inline ``mma.sync``.

    ``grouped``: pairs grouped by expert into blocks of ``8 * cols`` tokens, else one program per (token,
    expert) pair.  ``cols`` (grouped): 8-token column tiles per program (1 or 2); each weight chunk is
    dequantized once and multiplied with both tiles, so a 16-token block costs little more than an 8-token one.
    ``warps1``/``warps2``: warps (16-row tiles) per program; ``split1``/``split2``: K splits of GEMM1 / GEMM2
    over the grid (GEMM1's partial sums then meet in an activation launch).  ``prefetch``: the next chunk
    loaded before this one's MMAs.  ``vec1``/``vec2``: 16-byte loads where sizes and addresses allow.
    ``early2``: GEMM2 loads its first ``early2`` chunks before its PDL wait (0, 1 or 2).  ``ks1`` > 1
    (per pair, no prefetch): GEMM1 programs of ``ks1`` warps splitting one tile's K among themselves.
    """

    grouped: bool
    warps1: int = 1
    warps2: int = 1
    split1: int = 1
    split2: int = 1
    prefetch: bool = False
    vec1: bool = False
    vec2: bool = False
    early2: int = 0
    ks1: int = 1
    cols: int = 1

    def __post_init__(self):
        if min(self.warps1, self.warps2, self.split1, self.split2) < 1:
            raise MoEConfigError(f"DecodeConfig warps and splits must be positive: {self}")
        if self.early2 not in (0, 1, 2):
            raise MoEConfigError(f"DecodeConfig early2={self.early2}: GEMM2 loads 0, 1 or 2 chunks before its wait")
        if self.cols not in (1, 2) or (self.cols > 1 and not self.grouped):
            # 4 tiles (32-token blocks) measured slower than 2 everywhere, also with the MMAs of a block's empty
            # tiles skipped: 150-200 registers a thread
            raise MoEConfigError(f"DecodeConfig cols={self.cols}: 1 or 2 column tiles of 8 tokens, 2 only for the "
                                 "grouped decode (grouped=True)")
        if self.ks1 != 1 and not (not self.grouped and not self.prefetch and self.ks1 in (2, 4, 8, 16)):
            raise MoEConfigError(f"DecodeConfig ks1={self.ks1}: GEMM1's in-program K split is a power of two up to "
                                 "16 warps, for the per-pair decode (grouped=False) without prefetch")

    @property
    def bm(self) -> int:
        """Rows (tokens) per program: the grouping's block size, 1 per pair."""
        return 8 * self.cols if self.grouped else 1

    chains = True  # its launches are chained by programmatic dependent launch
    bf16_rows = False  # fp32 pair rows: the decode's GEMM2 K splits are partial sums that the combine adds
    k_step2 = DECODE_CHUNK  # GEMM2's K split starts on whole chunks


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """The tensor-core tiles (:mod:`triton_tiles`): pairs grouped by expert into ``bm``-row blocks, ``tl.dot``.

    ``bn*``/``bk*``/``warps*``/``stages*``: each GEMM's column tile, K step (whole 64-element pieces), warps and
    pipeline stages.  ``split2``: GEMM2's K split.  ``swap``: the weights as the MMA's register operand (tokens
    as N).  ``wprefetch``: weight words loaded one K step ahead.  ``nfirst``: column tiles on grid axis 0,
    so the programs resident together share activation rows in L2.  ``tail`` (16, 32 or 64; 0 off): an
    expert's last rows, when at most ``tail`` remain past its whole blocks, go to a tail block run by a second
    launch of smaller tiles (:meth:`tail_tiles`): a program costs what its weight tiles cost, not its rows.
    ``wgmma``: the Gluon kernels of :mod:`gluon_tiles` (weights as wgmma's register operand) instead of
    ``tl.dot``'s; ``bn*`` 64 or 128 with 4 warps, 128 with 8, ``bk*`` 64, ``stages*`` the slots (2-4) of the
    shared-memory ring that carries each K step's token tile and weight pieces; ``swap`` and ``wprefetch`` do not
    apply.  ``overlap`` (wgmma with tails, where programmatic dependent launch is on): each tail launch starts
    while its main launch still runs (it reads nothing that launch writes) and ends after it.  ``chains``: the
    call's launches chained by programmatic dependent launch (where it is on): each kernel's programs start as
    the one before drains.  ``bf16_rows``: GEMM2 writes each pair's weighted row in bf16 (one rounding before the
    combine's fp32 sum, numerics.md) instead of fp32; needs an unsplit GEMM2.
    """

    bm: int
    bn1: int
    bk1: int
    warps1: int
    stages1: int
    bn2: int
    bk2: int
    warps2: int
    stages2: int
    split2: int = 1
    swap: bool = False
    wprefetch: bool = False
    nfirst: bool = False
    tail: int = 0
    wgmma: bool = False
    overlap: bool = False
    chains: bool = False
    bf16_rows: bool = False

    def __post_init__(self):
        if min(self.bm, self.bn1, self.bn2, self.warps1, self.warps2, self.split2) < 1 or min(self.stages1,
                                                                                          self.stages2) < 2:
            raise MoEConfigError(f"TileConfig block sizes, warps and splits must be positive and stages at least 2: "
                                 f"{self}")
        if self.bf16_rows and self.split2 != 1:
            raise MoEConfigError(f"TileConfig bf16_rows: GEMM2's K split sums fp32 partial rows, so bf16 rows need "
                                 f"split2=1 (got {self.split2})")
        if self.bk1 % PIECE or self.bk2 % PIECE or self.bk1 <= 0 or self.bk2 <= 0:
            raise MoEConfigError(f"TileConfig bk1={self.bk1}, bk2={self.bk2}: the tensor-core tiles need K steps that "
                                 "are positive multiples of 64 (one piece of the banded weight layout)")
        if self.tail and not (self.bm >= 64 and self.tail in (16, 32, 64) and self.tail < self.bm
                              and self.split2 == 1):
            raise MoEConfigError(f"TileConfig tail={self.tail}: tail blocks of 16, 32 or 64 rows, fewer than bm, go "
                                 f"with tiles of 64 rows or more and no GEMM2 K split (got bm={self.bm}, "
                                 f"split2={self.split2})")
        if self.wgmma and not (self.split2 == 1 and self.bm % 16 == 0 and 16 <= self.bm <= 256
                               and self.bk1 == self.bk2 == 64
                               and all(bn in ((64, 128) if w == 4 else (128,)) and w in (4, 8)
                                       for bn, w in ((self.bn1, self.warps1), (self.bn2, self.warps2)))
                               and 2 <= self.stages1 <= 4 and 2 <= self.stages2 <= 4):
            raise MoEConfigError(f"TileConfig wgmma: blocks of 16-256 rows (a multiple of 16), K steps of 64, column "
                                 f"tiles of 64 or 128 with 4 warps or 128 with 8, 2-4 stages and no GEMM2 K "
                                 f"split (got {self})")

    @property
    def k_step2(self) -> int:
        return self.bk2

    def tail_tiles(self) -> "TileConfig":
        """The tail blocks' tiles: the 16-row tiles' shapes for tails of 16 or 32 rows, the 64-row tiles' for
        64 (the wgmma tiles: the main tiles with ``tail`` rows); warps, stages, prefetch and grid order as the
        main blocks'."""
        if self.wgmma:  # any row count is one wgmma N: the same tiles, fewer rows
            return dataclasses.replace(self, bm=self.tail, tail=0)
        shape = _SWAPPED_TILES if self.tail <= 32 else _TILES_64
        return dataclasses.replace(self, bm=self.tail if self.tail <= 32 else 64, tail=0, **shape)


# Column tiles and K steps of the 16-row tiles (weights as the MMA's A operand) and of the 64-row tiles.
_SWAPPED_TILES = dict(bn1=64, bk1=128, bn2=64, bk2=128, swap=True)
_TILES_64 = dict(bn1=128, bk1=64, bn2=128, bk2=64, swap=False)
_PREFILL = dict(warps1=4, stages1=3, warps2=4, stages2=3, wprefetch=True, nfirst=True)

Config = Union[DecodeConfig, TileConfig]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One call as the planner sees it (sizes as the weights hold them: padded, this rank's experts)."""

    tokens: int
    top_k: int
    experts: int
    hidden: int
    inter: int
    gated: bool
    routing: str = "renormalize"
    n_group: Optional[int] = None
    topk_group: Optional[int] = None
    # expert parallel: the experts the router scores when the weights hold a slice of them (None: all)
    routed_experts: Optional[int] = None
    biases: bool = False  # expert biases in the GEMM epilogues (gpt-oss)
    activation_params: bool = False  # a parametric activation (swiglu_oai)

    @property
    def pairs(self) -> int:
        return self.tokens * self.top_k

    @property
    def local(self) -> bool:
        return self.routed_experts is not None

    @property
    def rows(self) -> float:
        """Expected pairs per touched expert, over the experts the router scores: an expert-parallel rank's
        experts get their share of the pairs, not all of them."""
        return rows_per_expert(self.tokens, self.top_k, self.routed_experts or self.experts)

    @property
    def local_pairs(self) -> int:
        """Expected pairs of this rank's experts (all pairs without expert parallelism)."""
        return self.pairs if self.routed_experts is None else _cdiv(self.pairs * self.experts, self.routed_experts)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the planner needs of the GPU: SM count, compute capability, per-block opt-in shared memory (None:
    unknown, so the CUDA decode's shared-memory fit is left to the call), and whether Gluon's Hopper API is there
    (None: as in this process; planning for another machine, e.g. ``moe-nvfp4 plan`` without a GPU, says so)."""

    sm_count: int = 132
    capability: tuple = (9, 0)
    smem_optin: Optional[int] = None
    gluon: Optional[bool] = None


H200 = DeviceInfo(sm_count=132, capability=(9, 0), smem_optin=232448)


@dataclasses.dataclass(frozen=True)
class Regime:
    """A row of the table: the variant a call takes when its tokens lie in ``tokens`` (inclusive), its rows
    per expert are at most ``max_rows`` (gated, ungated), its hidden size is at most ``max_hidden`` and, for a
    ``wgmma`` row, the register-operand wgmma tiles can take it (:func:`_wgmma_fits`); ``why`` is the
    measurement that chose it.  ``min_hidden``: the hidden size above which the row applies."""

    variant: str
    tokens: tuple
    max_rows: tuple
    why: str
    max_hidden: float = math.inf
    wgmma: bool = False
    min_hidden: int = 0

    def takes(self, tokens: int, rows: float, gated: bool, hidden: int, wgmma: bool = False) -> bool:
        lo, hi = self.tokens
        return (lo <= tokens <= hi and rows <= self.max_rows[0 if gated else 1]
                and self.min_hidden < hidden <= self.max_hidden and wgmma >= self.wgmma)


_ANY = (1, math.inf)
# First match wins.  Figures: H200, whole layer, CUDA-graph captured (docs/architecture.md, "Dispatch").
REGIMES = (
    Regime("tiles16", (64, 64), (0, 4),
           "SM90, ungated, 64 tokens: the 16-row wgmma tiles (Nemotron-3-Nano 167 us against 193 for the decode "
           "blocks; gated layers of hidden <= 4096 measured slower: Qwen3-30B-A3B 146 against 139, H100)",
           wgmma=True),
    Regime("tiles16", (16, 64), (4, 4),
           "SM90, a hidden over 4096, 16-64 tokens: the 16-row wgmma tiles (DeepSeek-V3 16 / 32 / 48 tokens: 541 / "
           "752 / 881 us against 624 / 839 / 1001 for the 8-token decode blocks on an H200, 648 / 857 / 997 against "
           "657 / 897 / 1058 on an H100; 64 tokens: 1117 against 1185, H100)", wgmma=True, min_hidden=4096),
    Regime("grouped_decode", (16, 64), (8, 8),
           "pairs grouped into 8-token expert blocks, each expert's weights read once: 1.13-1.42x the 16-row tiles "
           "at 16-64 tokens, slower from 128 (two blocks per expert)"),
    Regime("pair_decode", _ANY, (1.15, 1.15),
           "about one pair per expert: one program per pair, no grouping launch; the routing keeps its own launch "
           "(routing in GEMM1's programs measured slower)"),
    Regime("pair_decode", (1, 16), (2.0, 1.3),
           "few tokens: per-pair programs still beat the 16-row tiles up to 2 rows per expert (1.3 ungated, whose "
           "tiles win sooner)"),
    Regime("tiles16", (65, math.inf), (8.5, 4),
           "SM90: the 16-row wgmma tiles (weights through a cp.async ring), gated up to 8 rows per expert "
           "(Qwen3-30B-A3B and Gemma-4, 128 tokens: 150 / 189 against 176 / 208 us for the 16-token decode "
           "blocks, 155 / 196 for the 32-row tiles, H100)", max_hidden=4096, wgmma=True),
    Regime("tiles16", (65, math.inf), (5, 4),
           "SM90: the 16-row wgmma tiles up to 5 rows per expert gated, 4 ungated (DeepSeek-V3 128 tokens: 1342 "
           "against 1422 us for the 32-row tiles; 64 tokens: 1117 against 1143, Nemotron-3-Nano 167 against 179, "
           "H100)", wgmma=True),
    Regime("tiles32", (16, math.inf), (32.5, 32.5),
           "SM90: the 32-row wgmma tiles up to 32 rows per expert, 1.2-1.6x the decode blocks and 64-row tiles they "
           "replace (Qwen3-30B-A3B 256 / 384 / 512 tokens: 163 / 179 / 212 against 242 / 286 / 280 us; "
           "Nemotron-3-Nano 128: 199 against 281, H100)", max_hidden=4096, wgmma=True),
    Regime("tiles32", (16, math.inf), (24.5, 24.5),
           "SM90, a hidden over 4096: the 32-row wgmma tiles up to 24 rows per expert (DeepSeek-V3 256 / 512 tokens: "
           "1583 / 2077 against 2048 / 2337 us); at 32 rows (1024 tokens) the 64-row ones were measured, 2835 us",
           wgmma=True),
    Regime("grouped_decode", (65, 128), (7, 7),
           "8-token blocks still at 65-128 tokens where experts average at most 7 rows (Qwen3-30B-A3B, 96 tokens: "
           "149 against 173 us with 16-token blocks, H100); from a hidden size of 4096 the 16-token blocks win "
           "(DeepSeek-V3, 96 / 128 tokens: 1418 / 1592 against 1457 / 1694 us)", max_hidden=4096),
    Regime("grouped_decode16", (16, 384), (20, 8),
           "16-token blocks (two column tiles per dequantized weight chunk), gated: 1.17-1.36x the 16-row tiles "
           "at 128-256 tokens on the three gated benchmark layers (H100); past 20 rows (Qwen3-30B-A3B and Gemma-4 "
           "at 384 tokens) the 64-row tiles with 8-warp GEMM1 programs are 1.05-1.14x faster; ungated, the 64-row "
           "tiles win from 9 rows per expert", max_hidden=4096),
    Regime("grouped_decode16", (16, 384), (10, 8),
           "a hidden size over 4096: 16-token blocks up to about 8 rows per expert (DeepSeek-V3, 256 tokens: 2124 "
           "against 2365 us for the 64-row tiles), the 64-row tiles from 12 (384 tokens: 2659 against 2803 us, "
           "H100)"),
    Regime("tiles16", _ANY, (16, 8),
           "16-row tiles, weights as the MMA's register operand and loaded a K step ahead: faster than either "
           "alone at 32-128 tokens, every 32-row variant slower; ungated, the 64-row tiles win from 9 rows; over "
           "a hidden of 4096 the 64-row tiles win (DeepSeek-V3, 192-384 tokens: 1.19-1.39x faster)",
           max_hidden=4096),
    Regime("tiles64", _ANY, (56, 48),
           "64-row prefill tiles up to 56 rows per expert (48 ungated), column tiles first (4-10% at 1024-4096 "
           "tokens), 16-row tail blocks; past that an expert's rows fill one 128-row block better than a 64-row "
           "block and a tail (1536 tokens: Qwen3-30B-A3B 436 against 582 us, Gemma-4 549 against 760, H100); on SM90 "
           "the register-operand wgmma tiles (Nemotron-3-Nano 1024 tokens: 476 us, tl.dot 632 in another run, H100)"),
    Regime("tiles128", _ANY, (math.inf, math.inf),
           "128-row prefill tiles, tails of 32 rows (64 on hidden > 4096, where swapped 32-row tails are slower); on "
           "SM90 the register-operand wgmma tiles (Qwen3-30B-A3B 4096 tokens: 772 us, tl.dot 952 in another run)"),
)
CUDA_DECODE_WHY = ("one token on SM90: the whole layer in one persistent CUDA launch, at least as fast as the "
                   "Triton decode on the four benchmark layers (Qwen3 16.0 against 16.9 us)")


def rows_per_expert(tokens: int, top_k: int, experts: int) -> float:
    """Expected pairs per touched expert: ``tokens * top_k`` over ``E (1 - (1 - k/E)^T)``."""
    touched = experts * (1.0 - (1.0 - top_k / experts) ** tokens)
    return tokens * top_k / max(1.0, touched)


def _decode(p: Problem, d: DeviceInfo, grouped: bool, cols: int = 1) -> DecodeConfig:
    # K split until ~8 (grouped) / ~16 (per pair) warps per SM are launched; the register prefetch pays on the
    # 8-token blocks only (on 16-token blocks it measured 1-4% slower: twice the activation registers);
    # 16-byte loads in both GEMMs and GEMM2's early first chunk measured never slower.
    # grouped programs of two warps (two 16-row tiles of the same block): 1-6% faster than one warp at 16-256
    # tokens on the four benchmark layers (H100)
    blocks = min(p.local_pairs, p.experts) if grouped else p.local_pairs
    target = (8 if grouped else 16) * d.sm_count
    split1 = doubled_split(blocks * _cdiv(p.inter, 16), target, p.hidden, 8)
    split2 = doubled_split(blocks * _cdiv(p.hidden, 16), target, p.inter, 8)
    warps = 2 if grouped else 1
    cfg = DecodeConfig(grouped=grouped, split1=split1, split2=split2, prefetch=grouped and cols == 1, vec1=True,
                       vec2=True, early2=1, cols=cols, warps1=warps, warps2=warps)
    if not grouped and p.hidden > 4096 and p.tokens <= 4:
        # a long hidden at 1-4 tokens: GEMM1's K split among one program's warps (no partial sums in memory,
        # no activation launch); equal or slower on the small layers
        cfg = dataclasses.replace(cfg, ks1=8 if p.tokens == 1 else 4, split1=1)
    return cfg


def _wgmma_fits(p: Problem, d: DeviceInfo) -> bool:
    """Can the register-operand wgmma tiles (:mod:`gluon_tiles`) take this problem: an SM90 GPU, Gluon's
    Hopper API, whole 64-element pieces in both GEMMs and no expert biases."""
    from moe_passes.kernels import gluon_tiles

    gluon = gluon_tiles.AVAILABLE if d.gluon is None else d.gluon
    return gluon and d.capability[0] == 9 and gluon_tiles.fits(p.hidden, p.inter, p.biases)


def _wgmma(cfg: TileConfig, p: Problem) -> TileConfig:
    # a 4-slot ring: 1.01-1.03x the 3-slot one at 1024-4096 tokens on the four benchmark layers (H100).
    # Tail launches overlapping their main launches: 1.02-1.05x at 1024-4096 tokens on the gated layers, and on
    # Nemotron-3-Nano 1.02-1.08x the tails in the main launch, whose 249-253-register programs hold two tail
    # programs an SM where a launch of their own holds four (H100)
    return dataclasses.replace(cfg, wgmma=True, stages1=4, stages2=4, wprefetch=False, swap=False, split2=1,
                               overlap=bool(cfg.tail))


def _tiles16(p: Problem, d: DeviceInfo) -> TileConfig:
    if _wgmma_fits(p, d):
        # GEMM2 programs of 128 columns (two 64-row halves): half the token-tile copies a weight byte, 1.03-1.05x
        # where they were measured apart (DeepSeek-V3 64-128 tokens, Nemotron-3-Nano 64, Qwen3-30B-A3B and
        # Gemma-4 128), never slower (H200); 0.98-1.03x at 64-128 tokens on the four layers (H100)
        return _wgmma(TileConfig(bm=16, bn1=64, bk1=64, bn2=128, bk2=64, chains=True, **_PREFILL), p)
    # GEMM2's K split until two column tiles per SM (at most 4)
    split2 = doubled_split(min(p.experts, p.local_pairs) * ((p.hidden + 63) // 64), 2 * d.sm_count, p.inter, 4)
    return TileConfig(bm=16, split2=split2, chains=True, **_PREFILL, **_SWAPPED_TILES)


def _tiles32(p: Problem, d: DeviceInfo) -> TileConfig:
    cfg = TileConfig(bm=32, **_PREFILL, **_TILES_64)  # tl.dot where the wgmma tiles do not fit (forced variant)
    if not _wgmma_fits(p, d):
        return cfg
    # gated: GEMM1 programs of 64 weight rows (115 registers, four programs an SM, against 187 and two for 128):
    # 1.01-1.06x at 192-384 tokens on Qwen3-30B-A3B and Gemma-4, 1.00-1.03x on DeepSeek-V3; ungated 1.02-1.04x
    # slower (H100)
    return _wgmma(dataclasses.replace(cfg, bn1=64) if p.gated else cfg, p)


def _tiles64(p: Problem, d: DeviceInfo) -> TileConfig:
    cfg = TileConfig(bm=64, tail=16, **_PREFILL, **_TILES_64)
    if _wgmma_fits(p, d):
        # Nemotron-3-Nano 1024 tokens: 476 us; the tl.dot tiles 632 (another run, H100)
        return _wgmma(cfg, p)
    if p.gated and p.hidden <= 4096 and p.rows <= 56:
        # half-filled blocks (384-768 tokens on 128 experts, top-8): GEMM1 programs of 8 warps dequantize each
        # weight tile in half the time; 1.05-1.14x the 4-warp ones on Qwen3-30B-A3B and Gemma-4, and slower
        # from 64 rows, on the ungated Nemotron-3-Nano and on DeepSeek-V3's hidden of 7168 (H100)
        return dataclasses.replace(cfg, warps1=8)
    return cfg


def _tiles128(p: Problem, d: DeviceInfo) -> TileConfig:
    cfg = TileConfig(bm=128, bn1=64 if p.gated else 128, bk1=64, bn2=128, bk2=64, **_PREFILL,
                     tail=64 if p.hidden > 4096 else 32)
    # the wgmma tiles, 4096 tokens: 772-7299 us against 952-9200 for the tl.dot tiles on the four benchmark layers
    # (two runs, H100)
    return _wgmma(cfg, p) if _wgmma_fits(p, d) else cfg


_BUILD = {
    "grouped_decode": lambda p, d: _decode(p, d, grouped=True),
    "grouped_decode16": lambda p, d: _decode(p, d, grouped=True, cols=2),
    "pair_decode": lambda p, d: _decode(p, d, grouped=False),
    "tiles16": _tiles16,
    "tiles32": _tiles32,
    "tiles64": _tiles64,
    "tiles128": _tiles128,
}
# Every variant a plan can name: the CUDA decode, then the Triton ones (the table's, and any a caller forces
# through ``KernelOptions.variant``).
VARIANTS = ("cuda_decode",) + tuple(_BUILD)


# GEMM2 writes bf16 pair rows only where their fp32 buffer would reach this many elements (16 MB): there the
# traffic is 5-10% of a call; below it bf16 rows save nothing measurable and still cost a rounding per pair.
BF16_ROWS_MIN_ELEMENTS = 1 << 22


def _pair_rows(cfg: Config, p: Problem) -> Config:
    """bf16 pair rows (``TileConfig.bf16_rows``) for the prefill tiles (64- and 128-row blocks) without a GEMM2
    K split, on a pair buffer of at least :data:`BF16_ROWS_MIN_ELEMENTS` (at 2048 tokens it is 100-200 MB,
    written once and read once)."""
    big = p.pairs * p.hidden >= BF16_ROWS_MIN_ELEMENTS
    if isinstance(cfg, TileConfig) and cfg.bm >= 64 and cfg.split2 == 1 and big:
        return dataclasses.replace(cfg, bf16_rows=True)
    return cfg


def one_program_grouping(pairs: int, bm: int, tail: int, options: KernelOptions) -> bool:
    """The expert grouping in one program (``triton_group``) rather than three launches: up to
    ``options.one_program_pairs`` pairs in blocks of at most 16 rows, without tails (2.4-4 us a call faster at
    16-128 tokens on Qwen3 and Gemma-4).  False where nothing is grouped (one program per pair, ``bm`` 1)."""
    return 1 < bm <= 16 and pairs <= options.one_program_pairs and not tail


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one call runs: ``variant`` (one of :data:`VARIANTS`), its ``config`` (None for the CUDA decode),
    ``why`` in a line, whether the grouping is one program, and for the CUDA decode the Triton plan taken
    where it refuses the call at run time (``fallback``: dtypes, alignment, no NVRTC, a refused launch)."""

    variant: str
    config: Optional[Config]
    why: str
    one_program_grouping: bool = False
    fallback: Optional["Plan"] = None

    def knobs(self) -> str:
        """The config's fields that differ from their defaults, ``name=value`` (a true flag by its name)."""
        if self.config is None:
            return ""
        out = []
        for f in dataclasses.fields(self.config):
            value = getattr(self.config, f.name)
            if f.name in ("grouped", "bm") or value == f.default:
                continue
            out.append(f.name if value is True else f"{f.name}={value}")
        return " ".join(out)

    def describe(self) -> str:
        """``variant [knobs]: why`` in one line (``moe-nvfp4 plan``)."""
        if self.config is None:
            return f"{self.variant} (else {self.fallback.variant} [{self.fallback.knobs()}]): {self.why}"
        return f"{self.variant} [{self.knobs()}]: {self.why}"


def _with_overrides(cfg: Config, options: KernelOptions) -> Config:
    overrides = dict(options.decode_overrides if isinstance(cfg, DecodeConfig) else options.tile_overrides)
    if not overrides:
        return cfg
    known = {f.name for f in dataclasses.fields(cfg)}
    if set(overrides) - known:
        raise MoEConfigError(f"{type(cfg).__name__} has no fields {sorted(set(overrides) - known)}")
    return dataclasses.replace(cfg, **overrides)


def plan_config(config: Config, problem: Problem, options: KernelOptions) -> Plan:
    """The plan of a caller's own config (tests, experiments): run as given, never the CUDA decode."""
    variant = ("grouped_decode" if config.grouped else "pair_decode") if isinstance(config, DecodeConfig) else (
        f"tiles{config.bm}")
    return Plan(variant, config, "the caller's config",
                one_program_grouping(problem.pairs, config.bm, getattr(config, "tail", 0), options))


def plan(problem: Problem, device: DeviceInfo, options: Optional[KernelOptions] = None) -> Plan:
    """The variant, config and reason for ``problem`` on ``device`` (see the module docstring)."""
    options = options if options is not None else KernelOptions()
    p = problem
    if min(p.tokens, p.top_k, p.experts, p.hidden, p.inter) < 1 or p.top_k > (p.routed_experts or p.experts):
        raise MoEConfigError(f"no plan for an empty or impossible problem (positive sizes, top_k <= experts): {p}")
    rows = p.rows
    if options.variant:
        if options.variant not in _BUILD:
            raise MoEConfigError(f"KernelOptions.variant={options.variant!r}: the Triton variants are "
                                 f"{', '.join(_BUILD)} ('' for the planner's table)")
        regime = Regime(options.variant, _ANY, (math.inf, math.inf), "KernelOptions.variant")
    else:
        wgmma = _wgmma_fits(p, device)
        regime = next(r for r in REGIMES if r.takes(p.tokens, rows, p.gated, p.hidden, wgmma))
    cfg = _with_overrides(_pair_rows(_BUILD[regime.variant](p, device), p), options)
    triton = Plan(regime.variant, cfg, f"{rows:.2f} rows per expert; {regime.why}",
                  one_program_grouping(p.pairs, cfg.bm, getattr(cfg, "tail", 0), options))
    if not options.variant and _cuda_decode_refusal(p, device, options) is None:
        return Plan("cuda_decode", None, CUDA_DECODE_WHY, fallback=triton)
    return triton


@functools.lru_cache(maxsize=4096)
def cached_plan(problem: Problem, device: DeviceInfo, options: KernelOptions) -> Plan:
    """:func:`plan`, made once per (problem, device, options): the call path does not pay it again."""
    return plan(problem, device, options)


def _cuda_decode_refusal(p: Problem, d: DeviceInfo, options: KernelOptions) -> Optional[str]:
    """Why the one-launch CUDA decode cannot take this problem whatever the tensors, or None (it may still
    refuse at run time: dtypes, alignment, NVRTC)."""
    if not options.cuda_decode:
        return "turned off"
    if p.tokens != 1 or p.local or d.capability[0] != 9:
        return "one token, all experts, on a compute capability 9.x GPU"
    from moe_passes.kernels import cuda_decode

    return cuda_decode.static_refusal(p.hidden, p.inter, p.experts, p.top_k, p.gated, p.routing, p.n_group,
                                      p.topk_group, d.sm_count, d.smem_optin, options, biases=p.biases,
                                      activation_params=p.activation_params)
