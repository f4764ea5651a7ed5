// One-token NVFP4 MoE decode in one persistent launch (SM90): routing, GEMM1 + activation, GEMM2 + routing
// weight + combine.  Compiled at run time by cuda_decode.py (NVRTC), which prepends the #defines below
// (layer shape, activation, routing, pipeline sizes).  See docs/kernels.md, "The one-launch CUDA decode".
//
// Why one launch: at one token the layer is ~5-8 us of weight bytes, and every kernel boundary drains the
// memory pipe.  Here each CTA (one per SM) routes the token itself, then a producer warp streams the CTA's
// share of w13 *and* w2 into a ring of shared-memory stages with bulk copies (cp.async.bulk), so GEMM2's
// weights are already arriving while GEMM1 finishes on other SMs; GEMM2 waits only for the slots it
// multiplies (per-slot counters, no barrier kernel).
//
// Work: GEMM1 unit = (slot s, 16-row band j of the intermediate) = the gate and up bands (one band if not
// gated); GEMM2 item = some slots of one 16-row band b of the hidden size.  A CTA owns whole hidden bands, so
// it finishes their combine itself: no partial sums cross CTAs and the result does not depend on timing.
// cuda_decode.py writes each CTA's schedule (``sched``): GEMM1 units go out in rounds, slot-major, so the
// first slots are complete early, and a CTA's GEMM2 items come one round after their slots complete, between
// its GEMM1 units: GEMM2's decode runs while GEMM1's weights are still streaming.  Per-slot counters say when
// a slot's intermediate is complete.  Consumers never touch global memory until the output: a publisher warp
// stores their intermediate rows and counts them, a poller warp copies complete slots into shared memory.
// Weights are read in the Triton path's prepared layout (triton_layout: E2M1 bits re-placed in each word,
// 16-row bands of 64-element pieces), so no second copy of the weights exists.
//
// Required defines: H_ I_ E_ TOPK GATED ACT(0 silu,1 gelu,2 gelu_tanh,3 relu2) METHOD(0 default,
// 1 renormalize, 2 deepseek_v3, 3 llama4) NGROUP TOPKGROUP HAS_BIAS RSCALE LOGIT_KIND BIAS_KIND
// (0 f32, 1 bf16, 2 f16) NCW (consumer warps) NSTAGE STAGE_BYTES S2 (slots per GEMM2 stage) MAXOPS (ops per
// CTA, at most) MAXB (hidden bands per CTA, at most).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
typedef unsigned char u8;

#define NT ((NCW + 3) * 32)  // consumer warps, then the producer, publisher and poller warps
#define NC (NCW * 32)
#define KG1 (H_ / 16)        // NVFP4 groups per w13 row
#define KG2 (I_ / 16)        // per w2 row
#define P1 ((KG1 + 3) / 4)   // 64-element pieces per row (the last one may be narrower)
#define P2 ((KG2 + 3) / 4)
#define NB1 (I_ / 16)        // GEMM1 bands per slot
#define N1 ((GATED + 1) * I_)
#define CODE1 (8 * H_)       // bytes of one w13 band's codes (16 rows x H/2)
#define CODE2 (8 * I_)
#define UNIT2 (CODE2 + I_)   // one w2 band of one expert: codes then scales
#define ITEM1 ((GATED + 1) * (CODE1 + H_))
#define EPAD ((E_ + 3) / 4 * 4)
#define NACC 3                          // independent MMA chains per warp in GEMM1
#define PPW1 ((P1 + NCW - 1) / NCW)     // GEMM1 pieces per warp and unit
#define F2 ((S2 * P2 + NCW - 1) / NCW)  // GEMM2 pieces per warp and stage, at most
#define PAIR_MASK 0x81C081C0u

// ---- diagnostics (TRACE builds: decode_one_token(trace=...), benchmarks/cuda_decode_timeline.py) --------
// Per CTA, 16 u64 slots: cycle stamps of the phases (slot 0 the start's %globaltimer), and in slot 15 the
// site of a wait that spun too long before the kernel trapped (a hang becomes an error with a location).
#ifdef TRACE
__device__ __forceinline__ u64 clock_now() { u64 t; asm volatile("mov.u64 %0, %%clock64;" : "=l"(t)); return t; }
__device__ __forceinline__ u64 global_now() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
#define STAMP(k) do { trace[blockIdx.x * 16 + (k)] = clock_now() - t_start; } while (0)
#define SPIN_GUARD(site) do { if (++spins > (1u << 22)) { trace[blockIdx.x * 16 + 15] = (site); __threadfence(); asm volatile("trap;"); } } while (0)
#else
#define STAMP(k) do { } while (0)
#define SPIN_GUARD(site) do { } while (0)
#endif

// ---- PTX helpers -------------------------------------------------------------------------------------
__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("{ .reg .b64 st; mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1; }" ::"r"(bar), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{ .reg .b64 st; mbarrier.arrive.shared::cta.b64 st, [%0]; }" ::"r"(bar) : "memory");
}
#ifdef TRACE
#define MBAR_WAIT(bar, parity, site) mbar_wait(bar, parity, trace, site)
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity, u64* trace, u32 site) {
    u32 spins = 0;
#else
#define MBAR_WAIT(bar, parity, site) mbar_wait(bar, parity)
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
#endif
    u32 done = 0;
    while (!done) {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
        if (!done) SPIN_GUARD(site);
    }
}
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// barrier 1: the consumer warps only (the producer, publisher and poller warps never join it)
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(NC) : "memory"); }
__device__ __forceinline__ u32 ld_relaxed(const u32* p) {
    u32 v;
    asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u16 to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float from_bf16(u16 v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ float from_f16(u16 v) {
    float f;
    asm("{ .reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(v));
    return f;
}
template <int KIND> __device__ __forceinline__ float load_float(const void* p, int i) {
    if (KIND == 0) return ((const float*)p)[i];
    if (KIND == 1) return from_bf16(((const u16*)p)[i]);
    return from_f16(((const u16*)p)[i]);
}

// ---- NVFP4 decode on the tensor cores ----------------------------------------------------------------
// A weight word (8 E2M1 codes in the Triton layout) cut into four bf16x2 pairs ``e2m1 * 2^-126``, each
// multiplied by ``bf16(block_scale * 2^119)`` (exact: 2 + 3 significant bits) -> ``e2m1 * scale * 2^-7``.
__device__ __forceinline__ u32 bscale(u32 pair, u32 s) {
    u32 d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(pair), "r"(s), "r"(0x80008000u));
    return d;
}
__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Word ``wa`` of row g and ``wb`` of row g+8 (same 8 K elements), scales ``sa`` / ``sb``, activations of
// those 8 elements in ``xq``: the dot product visits K in any order A and B agree on, so pairs 0/1 fill this
// thread's K slots of the first MMA and pairs 2/3 those of the second.
__device__ __forceinline__ void word_mma(float (&d)[4], u32 wa, u32 wb, u32 sa, u32 sb, uint4 xq) {
    u32 a0 = bscale(wa & PAIR_MASK, sa), a1 = bscale((wa << 3) & PAIR_MASK, sa);
    u32 a2 = bscale((wa << 6) & PAIR_MASK, sa);
    u32 a3 = bscale(((wa >> 4) & 0x00C000C0u) | ((wa >> 5) & 0x01000100u) | ((wa << 1) & 0x80008000u), sa);
    u32 b0 = bscale(wb & PAIR_MASK, sb), b1 = bscale((wb << 3) & PAIR_MASK, sb);
    u32 b2 = bscale((wb << 6) & PAIR_MASK, sb);
    u32 b3 = bscale(((wb >> 4) & 0x00C000C0u) | ((wb >> 5) & 0x01000100u) | ((wb << 1) & 0x80008000u), sb);
    mma16816(d, a0, b0, a1, b1, xq.x, xq.y);
    mma16816(d, a2, b2, a3, b3, xq.z, xq.w);
}
// Two E4M3 bytes (bits 0-7: row g, 16-23: row g+8) -> ``bf16(scale * 2^119)`` in both halves of each result:
// the E4M3 bits placed as an f16 read 2^-8 times the scale, and 2^127 brings it to 2^119.
__device__ __forceinline__ void scale_pair(u32 s, u32& sa, u32& sb) {
    u32 h = ((s & 0x007F007Fu) << 7) | ((s & 0x00800080u) << 8);
    float fl, fh;
    asm("{ .reg .f16 a, b; mov.b32 {a, b}, %2; cvt.f32.f16 %0, a; cvt.f32.f16 %1, b; }" : "=f"(fl), "=f"(fh) : "r"(h));
    const float two127 = __uint_as_float(0x7F000000u);
    u32 p;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(p) : "f"(fh * two127), "f"(fl * two127));
    sa = __byte_perm(p, 0, 0x1010);
    sb = __byte_perm(p, 0, 0x3232);
}
// One 64-element piece of a 16-row band tile: this thread's group ``c`` of rows g and g+8 (band layout:
// the piece's 16 rows contiguous, ``width`` groups each), against activations ``xg`` (16 bf16 of the group).
template <int KG>
__device__ __forceinline__ void piece_mma(float (&d)[4], const u8* codes, const u8* scales, const u16* xg, int p,
                                          int g, int c) {
    constexpr int FULL = KG / 4;
    const int width = (KG % 4 == 0 || p < FULL) ? 4 : (KG - 4 * FULL);  // compile-time 4 on whole pieces
    uint2 wa = make_uint2(0u, 0u), wb = make_uint2(0u, 0u);
    uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = x0;
    u32 s2 = 0;
    // Lanes past a narrow last piece multiply zeros: mma.sync is warp-synchronous, so every lane must reach
    // the same MMA instructions (a divergent one hung the GPU).
    if (KG % 4 == 0 || c < width) {
        const int og = p * 64 + g * width + c;  // groups from the band's start (triton_layout.band_offset)
        const int og8 = og + 8 * width;
        wa = *(const uint2*)(codes + 8 * og);
        wb = *(const uint2*)(codes + 8 * og8);
        s2 = (u32)scales[og] | ((u32)scales[og8] << 16);
        x0 = *(const uint4*)(xg);
        x1 = *(const uint4*)(xg + 8);
    }
    u32 sa, sb;
    scale_pair(s2, sa, sb);
    word_mma(d, wa.x, wb.x, sa, sb, x0);
    word_mma(d, wa.y, wb.y, sa, sb, x1);
}

__device__ __forceinline__ float activation(float gt, float up) {
#if ACT == 0
    return gt / (1.0f + expf(-gt)) * up;
#elif ACT == 1
    return 0.5f * gt * (1.0f + erff(gt * 0.7071067811865476f)) * up;
#elif ACT == 2
    const float z = 0.7978845608028654f * (gt + 0.044715f * gt * gt * gt);
    return 0.5f * gt * (1.0f + tanhf(z)) * up;
#else
    const float r = fmaxf(gt, 0.0f);
    return r * r;
#endif
}

__device__ __forceinline__ float warp_fsum(float v) {  // the same order in every lane
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(NT, 1)
moe_nvfp4_decode1(const u16* __restrict__ x, const void* __restrict__ logits, const void* __restrict__ bias,
                  const u8* __restrict__ w13, const u8* __restrict__ s13, const float* __restrict__ g13,
                  const u8* __restrict__ w2, const u8* __restrict__ s2, const float* __restrict__ g2,
                  u16* act, const int* sched, u32* sync, u16* out, int* ids_out, float* w_out, u64* trace) {
#ifdef TRACE
    const u64 t_start = clock_now();
    if (threadIdx.x == 0) trace[blockIdx.x * 16] = global_now();
#endif
    extern __shared__ __align__(128) u8 smem[];
    u16* xs = (u16*)(smem + NSTAGE * STAGE_BYTES);  // the token's activations
    u16* acts = xs + H_;                            // the intermediate, [TOPK][I_]
    __shared__ __align__(8) u64 full_bar[NSTAGE];
    __shared__ __align__(8) u64 empty_bar[NSTAGE];
    __shared__ __align__(8) u64 x_bar;
    __shared__ __align__(8) u64 slot_bar[TOPK];  // a slot's intermediate is in `acts`
    __shared__ float s_band[MAXB][16];           // running sums of this CTA's hidden bands
    __shared__ __align__(8) u64 row_bar[MAXOPS]; // GEMM1 op i's intermediate rows are in s_rows[i]
    __shared__ u16 s_rows[MAXOPS][16];
    __shared__ float red[2][NCW][32];
    __shared__ __align__(16) float s_key[EPAD];  // ranking keys, padded with -inf
#if METHOD == 2
    __shared__ float s_score[E_];
#endif
    __shared__ float s_inv1[E_];  // 2^7 / global scale, of w13 and of w2
    __shared__ float s_inv2[E_];
#if METHOD == 2 && HAS_BIAS
    __shared__ float s_bias[E_];
#endif
    __shared__ int s_sel[TOPK];
    __shared__ float s_fac1[TOPK];
    __shared__ float s_fac2[TOPK];
#if METHOD == 2 && NGROUP > 1
    __shared__ float s_group[NGROUP];
#endif

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int grid = gridDim.x, cta = blockIdx.x;
    constexpr int EPT = (E_ + NT - 1) / NT;  // experts per thread

    // The global loads first, none waiting on another: this CTA's ranges, the logits (and bias), and every
    // expert's global scales, so that nothing after the routing waits on a dependent load.
    float lg[EPT];
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
        const int e = tid + q * NT;
        if (e < E_) {
            lg[q] = load_float<LOGIT_KIND>(logits, e);
#if METHOD == 2 && HAS_BIAS
            s_bias[e] = load_float<BIAS_KIND>(bias, e);
#endif
            s_inv1[e] = 128.0f / g13[e];  // 2^7: the dequantized A fragments carry 2^-7
            s_inv2[e] = 128.0f / g2[e];
        }
    }
    if (tid == 0) {
        for (int s = 0; s < NSTAGE; ++s) {
            mbar_init(smem_u32(&full_bar[s]), 1);
            mbar_init(smem_u32(&empty_bar[s]), NCW);
        }
        mbar_init(smem_u32(&x_bar), 1);
        for (int s = 0; s < TOPK; ++s) mbar_init(smem_u32(&slot_bar[s]), 32);
        for (int s = 0; s < MAXOPS; ++s) mbar_init(smem_u32(&row_bar[s]), 16);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (tid == 0) STAMP(14);
    if (tid == NC) {  // the producer lane: the token's activations first, they do not depend on the routing
        mbar_expect_tx(smem_u32(&x_bar), H_ * 2);
        bulk_load(smem_u32(xs), x, H_ * 2, smem_u32(&x_bar));
    }

    // ---- routing (every CTA, redundantly: E_ logits from L2 cost less than another launch) --------------
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
        const int e = tid + q * NT;
        if (e < E_) {
#if METHOD == 2
            const float sc = 1.0f / (1.0f + expf(-lg[q]));
            s_score[e] = sc;
#if HAS_BIAS
            s_key[e] = sc + s_bias[e];
#else
            s_key[e] = sc;
#endif
#else
            s_key[e] = lg[q];
#endif
        }
    }
    if (tid < EPAD - E_) s_key[E_ + tid] = __uint_as_float(0xFF800000u);
    __syncthreads();
#if METHOD == 2 && NGROUP > 1
    constexpr int EG = E_ / NGROUP;
    for (int gi = tid; gi < NGROUP; gi += NT) {  // a group's score: its two best biased scores
        float t1 = __uint_as_float(0xFF800000u), t2 = t1;
        for (int m = 0; m < EG; ++m) {
            const float v = s_key[gi * EG + m];
            if (v > t1) { t2 = t1; t1 = v; } else if (v > t2) { t2 = v; }
        }
        s_group[gi] = EG >= 2 ? t1 + t2 : t1;
    }
    __syncthreads();
    float masked[(E_ + NT - 1) / NT];
    for (int e = tid, q = 0; e < E_; e += NT, ++q) {
        const int gi = e / EG;
        const float v = s_group[gi];
        int rank = 0;
        for (int o = 0; o < NGROUP; ++o) {
            const float w = s_group[o];
            rank += (w > v) || (w == v && o < gi);
        }
        masked[q] = rank < TOPKGROUP ? s_key[e] : __uint_as_float(0xFF800000u);
    }
    __syncthreads();
    for (int e = tid, q = 0; e < E_; e += NT, ++q) s_key[e] = masked[q];
    __syncthreads();
#endif
    if (tid == 0) STAMP(13);
    // rank = experts ahead of e (ties: lower index first, as topk), each thread scanning every key
    for (int e = tid; e < E_; e += NT) {
        const float v = s_key[e];
        u32 ahead = 0;
#pragma unroll 8
        for (int o = 0; o < EPAD; o += 4) {
            const float4 w = *(const float4*)(s_key + o);
            ahead += (w.x > v) | ((w.x == v) & (o < e));
            ahead += (w.y > v) | ((w.y == v) & (o + 1 < e));
            ahead += (w.z > v) | ((w.z == v) & (o + 2 < e));
            ahead += (w.w > v) | ((w.w == v) & (o + 3 < e));
        }
        if (ahead < TOPK) s_sel[ahead] = e;
    }
    __syncthreads();
    if (tid == 0) STAMP(1);
    // ---- this CTA's schedule: ops in order, each one stage of the ring -----------------------------------
    // op >= 0: GEMM1 unit (slot * NB1 + band of the intermediate); op < 0: GEMM2 item, -1 - (b << 10 | s0 << 5
    // | n - 1): slots s0 .. s0 + n - 1 of hidden band b.  Row header: op count, first hidden band.
    const int* my = sched + cta * (MAXOPS + 2);
    const int nops = my[0], band0 = my[1];

    // ---- producer: one lane streams the weights of the ops through the stages ----------------------------
    if (warp == NCW) {
        if (lane != 0) return;
        STAMP(8);
        for (int i = 0; i < nops; ++i) {
            const int st = i % NSTAGE, op = my[2 + i];
            if (i >= NSTAGE) MBAR_WAIT(smem_u32(&empty_bar[st]), ((i / NSTAGE) + 1) & 1, 100 + i);
            const u32 bar = smem_u32(&full_bar[st]), dst = smem_u32(smem + st * STAGE_BYTES);
            if (op >= 0) {
                const int s = op / NB1, j = op - s * NB1;
                const size_t row = (size_t)s_sel[s] * N1 + 16 * j;
                const u8* codes = w13 + row * (H_ / 2);
                const u8* scales = s13 + row * (H_ / 16);
                mbar_expect_tx(bar, ITEM1);
                bulk_load(dst, codes, CODE1, bar);
#if GATED
                bulk_load(dst + CODE1, codes + (size_t)I_ * (H_ / 2), CODE1, bar);
                bulk_load(dst + 2 * CODE1, scales, H_, bar);
                bulk_load(dst + 2 * CODE1 + H_, scales + (size_t)I_ * (H_ / 16), H_, bar);
#else
                bulk_load(dst + CODE1, scales, H_, bar);
#endif
            } else {
                const int code = -1 - op, b = code >> 10, s0 = (code >> 5) & 31, n = (code & 31) + 1;
                mbar_expect_tx(bar, n * UNIT2);
                for (int q = 0; q < n; ++q) {
                    const size_t row = (size_t)s_sel[s0 + q] * H_ + 16 * b;
                    bulk_load(dst + q * UNIT2, w2 + row * (I_ / 2), CODE2, bar);
                    bulk_load(dst + q * UNIT2 + CODE2, s2 + row * (I_ / 16), I_, bar);
                }
            }
        }
        STAMP(9);
        return;
    }

    // ---- publisher: stores this CTA's intermediate rows and counts them, so that consumers never fence -------
    if (warp == NCW + 1) {
        for (int i = 0; i < nops; ++i) {
            const int op = my[2 + i];
            if (op < 0) continue;
            MBAR_WAIT(smem_u32(&row_bar[i]), 0, 500 + i);
            const int s = op / NB1, j = op - s * NB1;
            if (lane < 16) {
                act[s * I_ + 16 * j + lane] = s_rows[i][lane];
                asm volatile("fence.acq_rel.gpu;" ::: "memory");  // the row, then the count (release)
            }
            __syncwarp();
            if (lane == 0) asm volatile("red.relaxed.gpu.global.add.u32 [%0], 1;" ::"l"(&sync[s]) : "memory");
        }
        return;
    }

    // ---- poller: brings each slot's intermediate into shared memory once every CTA has written it ---------
    if (warp == NCW + 2) {
        bool needs = false;
        for (int i = 0; i < nops; ++i) needs |= my[2 + i] < 0;
        if (!needs) return;
        // Lane s watches slot s's count (one warp-wide L2 read per poll); every slot found complete is copied
        // at once with cp.async, then its barrier released.  Polls back off so that 132 pollers leave the
        // line to the writers.
        u32 pending = TOPK == 32 ? 0xFFFFFFFFu : (1u << TOPK) - 1u;
#ifdef TRACE
        u32 spins = 0;
#endif
        while (pending) {
            const u32 count = lane < TOPK ? ld_relaxed(&sync[lane]) : 0u;
            const u32 ready = __ballot_sync(0xFFFFFFFFu, lane < TOPK && count >= (u32)NB1) & pending;
            if (!ready) {
                __nanosleep(32);
                SPIN_GUARD(2);
                continue;
            }
            asm volatile("fence.acq_rel.gpu;" ::: "memory");  // acquire what the counts promise
            for (u32 m = ready; m; m &= m - 1) {
                const int sl = __ffs(m) - 1;
                for (int q = lane; q < I_ / 8; q += 32)
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                                 ::"r"(smem_u32(acts + sl * I_ + 8 * q)), "l"(act + sl * I_ + 8 * q) : "memory");
            }
            asm volatile("cp.async.wait_all;" ::: "memory");
            for (u32 m = ready; m; m &= m - 1) mbar_arrive(smem_u32(&slot_bar[__ffs(m) - 1]));  // 32 arrivals
            pending &= ~ready;
        }
        if (lane == 0) STAMP(12);
        return;
    }

    // ---- consumers ----------------------------------------------------------------------------------
    // the routing weights (warp 0): the producer did not need to wait for them
    if (warp == 0) {  // lane r: slot r
        const int e = s_sel[lane < TOPK ? lane : 0];
#if METHOD == 0
        // softmax over all experts, then the top k of it (the max is the first selected logit)
        const float m = s_key[s_sel[0]];
        float t = 0.0f;
        for (int o = lane; o < E_; o += 32) t += expf(s_key[o] - m);
        const float w = expf(s_key[e] - m) / warp_fsum(t);
#elif METHOD == 1
        // softmax over the top k logits
        const float t = lane < TOPK ? expf(s_key[e] - s_key[s_sel[0]]) : 0.0f;
        const float w = t / warp_fsum(t);
#elif METHOD == 2
        const float t = lane < TOPK ? s_score[e] : 0.0f;
        const float w = t / fmaxf(warp_fsum(t), 1e-20f) * RSCALE;
#else
        const float w = 1.0f / (1.0f + expf(-s_key[e]));
#endif
        if (lane < TOPK) {
            s_fac1[lane] = s_inv1[e];
            s_fac2[lane] = w * s_inv2[e];
            if (cta == 0) {  // the routing, for the caller (every CTA computed the same)
                ids_out[lane] = e;
                w_out[lane] = w;
            }
        }
    }
    consumers_sync();
    const int g = lane >> 2, c = lane & 3;
    // reductions alternate between the two `red` buffers: reduction k + 2 may overwrite buffer k % 2 only
    // after every consumer passed reduction k + 1's barrier, i.e. after warp 0 finished reading it
    int rx = 0;
    MBAR_WAIT(smem_u32(&x_bar), 0, 1);  // always, so that no CTA exits with the copy in flight
    if (tid == 0) STAMP(2);
    for (int i = 0; i < nops; ++i) {
        const int st = i % NSTAGE, op = my[2 + i];
        const u8* stage = smem + st * STAGE_BYTES;
        if (op >= 0) {  // GEMM1 unit: 16 intermediate rows of one slot
            MBAR_WAIT(smem_u32(&full_bar[st]), (i / NSTAGE) & 1, 200 + i);
            if (tid == 0 && i == 0) STAMP(3);
            if (tid == 0) STAMP(4);  // the last GEMM1 unit's start
            // independent accumulators for successive pieces: the MMAs of one chain wait on each other
            float dg[NACC][4], du[NACC][4];
#pragma unroll
            for (int a = 0; a < NACC; ++a)
#pragma unroll
                for (int r = 0; r < 4; ++r) dg[a][r] = du[a][r] = 0.f;
#pragma unroll
            for (int k = 0; k < PPW1; ++k) {
                const int p = warp + k * NCW;
                if (p < P1) {  // warp-uniform
                    const u16* xg = xs + 16 * (4 * p + c);
#if GATED
                    piece_mma<KG1>(dg[k % NACC], stage, stage + 2 * CODE1, xg, p, g, c);
                    piece_mma<KG1>(du[k % NACC], stage + CODE1, stage + 2 * CODE1 + H_, xg, p, g, c);
#else
                    piece_mma<KG1>(dg[k % NACC], stage, stage + CODE1, xg, p, g, c);
#endif
                }
            }
#pragma unroll
            for (int a = 1; a < NACC; ++a) {
                dg[0][0] += dg[a][0];
                dg[0][2] += dg[a][2];
                du[0][0] += du[a][0];
                du[0][2] += du[a][2];
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(smem_u32(&empty_bar[st]));
            if (c == 0) {  // column 0 of rows g / g+8 (every column holds the same sums)
                red[rx][warp][g] = dg[0][0];
                red[rx][warp][g + 8] = dg[0][2];
#if GATED
                red[rx][warp][16 + g] = du[0][0];
                red[rx][warp][24 + g] = du[0][2];
#endif
            }
            consumers_sync();
            if (warp == 0) {
                const int s = op / NB1;
                if (lane < 16) {
                    float gt = 0.f, up = 0.f;
                    for (int w = 0; w < NCW; ++w) {
                        gt += red[rx][w][lane];
#if GATED
                        up += red[rx][w][16 + lane];
#endif
                    }
                    const float f = s_fac1[s];
                    s_rows[i][lane] = to_bf16(activation(gt * f, up * f));
                    mbar_arrive(smem_u32(&row_bar[i]));  // count 16: the publisher stores and counts it
                }
            }
            rx ^= 1;
        } else {  // GEMM2 item: slots s0 .. s0+n-1 of hidden band b
            const int code = -1 - op, b = code >> 10, s0 = (code >> 5) & 31, n = (code & 31) + 1;
            for (int q = 0; q < n; ++q) MBAR_WAIT(smem_u32(&slot_bar[s0 + q]), 0, 400 + i);
            MBAR_WAIT(smem_u32(&full_bar[st]), (i / NSTAGE) & 1, 300 + i);
#ifdef TRACE
            if (tid == 0 && trace[blockIdx.x * 16 + 5] == 0) STAMP(5);  // the first GEMM2 item's start
            if (tid == 0) STAMP(6);                                     // the last one's
#endif
            float acc0 = 0.f, acc2 = 0.f;
#pragma unroll
            for (int k = 0; k < F2; ++k) {
                const int f = warp + k * NCW;
                if (f < n * P2) {  // warp-uniform
                    const int q = f / P2, p = f - q * P2;
                    const u8* unit = stage + q * UNIT2;
                    float d[4] = {0.f, 0.f, 0.f, 0.f};
                    piece_mma<KG2>(d, unit, unit + CODE2, acts + (s0 + q) * I_ + 16 * (4 * p + c), p, g, c);
                    const float f2 = s_fac2[s0 + q];
                    acc0 += f2 * d[0];
                    acc2 += f2 * d[2];
                }
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(smem_u32(&empty_bar[st]));
            if (c == 0) {
                red[rx][warp][g] = acc0;
                red[rx][warp][g + 8] = acc2;
            }
            consumers_sync();
            if (warp == 0 && lane < 16) {  // the band's running sum, over this CTA's items in slot order
                float y = s0 == 0 ? 0.f : s_band[b - band0][lane];
                for (int w = 0; w < NCW; ++w) y += red[rx][w][lane];
                if (s0 + n == TOPK) out[16 * b + lane] = to_bf16(y);
                else s_band[b - band0][lane] = y;
            }
            rx ^= 1;
        }
    }

    consumers_sync();
    if (tid == 0) STAMP(7);
    if (tid == 0) {  // the last CTA out zeroes the counters for the next call
        __threadfence();
        const u32 old = atomicAdd(&sync[TOPK], 1u);
        if (old == (u32)grid - 1) {
            for (int s = 0; s <= TOPK; ++s) atomicExch(&sync[s], 0u);
        }
        STAMP(10);
#ifdef TRACE
        trace[blockIdx.x * 16 + 11] = global_now();
#endif
    }
}
