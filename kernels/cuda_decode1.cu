// One-token NVFP4 MoE decode in one persistent launch (SM90): routing, GEMM1 + activation, GEMM2 + routing
// weight + combine.  Compiled at run time by cuda_decode.py (NVRTC), which prepends the #defines below
// (layer shape, activation, routing, pipeline sizes).  See docs/kernels.md, "The one-launch CUDA decode".
//
// Why one launch: at one token the layer is ~5-8 us of weight bytes, and every kernel boundary drains the
// memory pipe.  Each CTA (one per SM) routes the token itself, then a producer warp streams the CTA's w13
// *and* w2 bytes into a ring of shared-memory stages as fast as the ring frees, so nearly all of a CTA's
// weights are requested the moment the routing is known.
//
// Work split: by the *intermediate*.  A CTA owns segments, each some consecutive 16-row bands [j0, j0+n) of
// one slot's intermediate.  It computes those intermediate rows (GEMM1 + activation, all of K = hidden), and
// then their whole contribution to the output: GEMM2 over every hidden row, but only K = its 16n
// intermediate columns.  So nothing a CTA multiplies comes from another CTA; the only grid-wide step is the
// last one, the sum of the CTAs' fp32 partial outputs (one barrier, then each CTA sums some hidden bands
// over all partials in a fixed order: the result does not depend on timing).  Splitting GEMM2 by hidden rows
// instead would need every CTA to see every slot's intermediate: that cross-CTA exchange measured 3.5-5 us
// per call.
//
// Weights are read in the Triton path's prepared layout (triton_layout: E2M1 bits re-placed in each word,
// 16-row bands of 64-element pieces), so no second copy of the weights exists.  A w13 band is contiguous
// (one bulk copy); a segment's columns of a w2 band lie in 1-3 piece blocks (16 rows x 4 groups, 512 code
// bytes and 64 scale bytes), copied whole: with W2TMA (every piece whole) by tensor copies of 16 bands, else
// one bulk copy per block (2x slower: a CTA's bytes in flight are bounded by its copies in flight).
//
// Required defines: H_ I_ E_ TOPK GATED ACT(0 silu,1 gelu,2 gelu_tanh,3 relu2) METHOD(0 default,
// 1 renormalize, 2 deepseek_v3, 3 llama4) NGROUP TOPKGROUP HAS_BIAS RSCALE LOGIT_KIND BIAS_KIND
// (0 f32, 1 bf16, 2 f16) NCW (consumer warps) NSTAGE STAGE_BYTES MAXU (bands per segment, at most) MAXSEG
// (segments per CTA, at most) W2TMA (0/1: w2 by tensor maps, passed as the last two parameters) PDL (0/1:
// launched as a programmatic dependent launch, see the kernel's start).
// Diagnostics: TRACE (phase stamps, below).
// Routing methods past 3 (sparsemixer, 4, of triton_route.METHOD_CODES) have no code here: refused at build.
#if METHOD < 0 || METHOD > 3
#error "METHOD: this decode routes default, renormalize, deepseek_v3 and llama4 only"
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
typedef unsigned char u8;
struct __align__(64) TensorMap { u64 opaque[16]; };  // a CUtensorMap, made by cuda_decode (W2TMA)

#define NT ((NCW + 1) * 32)  // consumer warps, then the producer warp
#define NC (NCW * 32)
#define KG1 (H_ / 16)        // NVFP4 groups per w13 row
#define KG2 (I_ / 16)        // per w2 row
#define P1 ((KG1 + 3) / 4)   // 64-element pieces per row (the last one may be narrower)
#define NBH (H_ / 16)        // hidden bands
#define N1 ((GATED + 1) * I_)
#define CODE1 (8 * H_)       // bytes of one w13 band's codes (16 rows x H/2)
#define BAND1 (9 * H_)       // one w13 band: codes, then scales
#define BLOCK2 576           // a stage's slot for one w2 piece block: 512 code bytes, then 64 scale bytes
#define EPAD ((E_ + 3) / 4 * 4)
#define PPW1 ((P1 + NCW - 1) / NCW)     // GEMM1 pieces per warp and band
#define SEGW (1 + 3 * MAXSEG)           // a CTA's row of the segment table
#define PAIR_MASK 0x81C081C0u
#define BOXB 16              // hidden bands per GEMM2 tensor copy (W2TMA), and the unit of a GEMM2 stage
// dynamic shared memory after the ring (cuda_decode.plan_decode computes the same size)
#define OFF_X (NSTAGE * STAGE_BYTES)           // the token's activations, bf16 [H]
#define OFF_PART (OFF_X + 2 * H_)              // this CTA's partial output, fp32 [H]
#define OFF_ACT (OFF_PART + 4 * H_)            // a segment's intermediate, bf16 [16 MAXU]
#define OFF_RED (OFF_ACT + 32 * MAXU)          // GEMM1 per-warp sums, fp32 [(GATED + 1) MAXU][NCW][16]
#define SMEM_END (OFF_RED + 64 * (GATED + 1) * MAXU * NCW)

// ---- diagnostics (TRACE builds: decode_one_token(trace=...), benchmarks/cuda_decode_timeline.py) --------
// Per CTA, 16 u64 slots: cycle stamps of the phases (slot 0 the start's %globaltimer), and in slot 15 the
// site of a wait that spun too long before the kernel trapped (a hang becomes an error with a location).
#ifdef TRACE
__device__ __forceinline__ u64 clock_now() { u64 t; asm volatile("mov.u64 %0, %%clock64;" : "=l"(t)); return t; }
__device__ __forceinline__ u64 global_now() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
#define STAMP(k) do { trace[blockIdx.x * 16 + (k)] = clock_now() - t_start; } while (0)
// count, in slot k, the stages whose bytes were not in yet when warp 0 came to them
#define TRACE_STALL(st, k) \
    do { \
        if (tid == 0 && !mbar_test(smem_u32(&full_bar[st]), (it / NSTAGE) & 1)) trace[blockIdx.x * 16 + (k)] += 1; \
    } while (0)
#define SPIN_GUARD(site) \
    do { \
        if (++spins > (1u << 22)) { trace[blockIdx.x * 16 + 15] = (site); __threadfence(); asm volatile("trap;"); } \
    } while (0)
#else
#define STAMP(k) do { } while (0)
#define SPIN_GUARD(site) do { } while (0)
#define TRACE_STALL(st, k) do { } while (0)
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
__device__ __forceinline__ u32 mbar_test(u32 bar, u32 parity) {
    u32 done;
    asm volatile("{ .reg .pred p; mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    return done;
}
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// a box of a 3-D tensor map (a __grid_constant__ kernel parameter) at coordinates (x, y, z)
__device__ __forceinline__ void tensor_load3(u32 dst, const void* map, int x, int y, int z, u32 bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];"
                 ::"r"(dst), "l"((u64)map), "r"(x), "r"(y), "r"(z), "r"(bar) : "memory");
}
// barrier 1: the consumer warps only (the producer, publisher and poller warps never join it)
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(NC) : "memory"); }
__device__ __forceinline__ u64 ld_relaxed64(const u64* p) {
    u64 v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
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
// A weight word (8 E2M1 codes in the Triton layout, bits re-placed) cuts into four bf16x2 pairs that read
// ``e2m1 * 2^-126`` (exact; the 0.5 codes are bf16 subnormals, which the tensor cores keep: checked on the
// H200 with every code against a float64 product).  They go to the MMA as they are, against activations
// carried as ``x * 2^64`` (exact), so every product is a normal fp32 number.  B is block-diagonal: lane
// column c holds its activations only in column c of B (lanes g == c; zeros elsewhere), so D's column c
// holds the dot product of lane column c's K slots alone, one group of one row, and its E4M3 block scale
// multiplies it in fp32 after the MMA: four FFMA per lane and group.  (Scaling the A fragments before the
// MMA, the Triton decode's way, costs sixteen bf16x2 multiplies and a bf16 scale conversion: measured
// 0.5-3 us slower per call.)  ``2^62 / global scale`` undoes the powers of two.
#define XSCALE 0x1p64f
#define POST_FACTOR 0x1p62f
__device__ __forceinline__ void mma16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// pair k of a word (pair 3's bits are spread over it)
__device__ __forceinline__ u32 pair_k(u32 w, int k) {
    return k == 0 ? w & PAIR_MASK
         : k == 1 ? (w << 3) & PAIR_MASK
         : k == 2 ? (w << 6) & PAIR_MASK
                  : ((w >> 4) & 0x00C000C0u) | ((w >> 5) & 0x01000100u) | ((w << 1) & 0x80008000u);
}
// Word ``wa`` of row g and ``wb`` of row g+8 (the same 8 K elements), against their activations ``xq``: the
// dot product visits K in any order A and B agree on, so pairs 0/1 fill this thread's K slots of the first
// MMA and pairs 2/3 those of the second.
__device__ __forceinline__ void word_mma(float (&d)[4], u32 wa, u32 wb, uint4 xq) {
    mma16816(d, pair_k(wa, 0), pair_k(wb, 0), pair_k(wa, 1), pair_k(wb, 1), xq.x, xq.y);
    mma16816(d, pair_k(wa, 2), pair_k(wb, 2), pair_k(wa, 3), pair_k(wb, 3), xq.z, xq.w);
}
// E4M3 bytes 0 and 1 of ``v`` -> floats (exact)
__device__ __forceinline__ void e4m3x2_f32(u32 v, float& lo, float& hi) {
    u32 h;
    asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.rn.f16x2.e4m3x2 %0, t; }" : "=r"(h) : "r"(v));
    asm("{ .reg .f16 a, b; mov.b32 {a, b}, %2; cvt.f32.f16 %0, a; cvt.f32.f16 %1, b; }" : "=f"(lo), "=f"(hi) : "r"(h));
}
// One 16-element group of rows g and g+8 (``wa`` / ``wb``) against this lane's B fragment ``x0`` / ``x1``:
// four MMAs into a fresh D, then ``acc += D * scale`` over this lane's D fragment, whose columns 2(c&1) and
// 2(c&1) + 1 have their E4M3 scales in bytes 0 / 1 of ``s0`` (row g) and ``s8`` (row g+8).  Lanes c >= 2
// hold D columns 4-7, which are zero (B is zero there).
__device__ __forceinline__ void group_mma(float (&acc)[4], uint2 wa, uint2 wb, uint4 x0, uint4 x1, u32 s0, u32 s8) {
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    word_mma(d, wa.x, wb.x, x0);
    word_mma(d, wa.y, wb.y, x1);
    float a, b, e, f;
    e4m3x2_f32(s0, a, b);
    e4m3x2_f32(s8, e, f);
    acc[0] = fmaf(d[0], a, acc[0]);
    acc[1] = fmaf(d[1], b, acc[1]);
    acc[2] = fmaf(d[2], e, acc[2]);
    acc[3] = fmaf(d[3], f, acc[3]);
}
// One 64-element piece of a 16-row w13 band: this lane's A rows are group c of rows g and g+8 (band layout:
// the piece's 16 rows contiguous, ``width`` groups each), its B the group's activations ``xg`` (16 bf16, x
// 2^64) on the diagonal; so D column j is group j of the piece.
template <int KG>
__device__ __forceinline__ void piece_mma(float (&acc)[4], const u8* codes, const u8* scales, const u16* xg, int p,
                                          int g, int c) {
    constexpr int FULL = KG / 4;
    const int width = (KG % 4 == 0 || p < FULL) ? 4 : (KG - 4 * FULL);  // compile-time 4 on whole pieces
    uint2 wa = make_uint2(0u, 0u), wb = make_uint2(0u, 0u);
    uint4 x0 = make_uint4(0u, 0u, 0u, 0u), x1 = x0;
    // Lanes past a narrow last piece multiply zeros: mma.sync is warp-synchronous, so every lane must reach
    // the same MMA instructions (a divergent one hung the GPU).
    if (KG % 4 == 0 || c < width) {
        const int og = p * 64 + g * width + c;  // groups from the band's start (triton_layout.band_offset)
        wa = *(const uint2*)(codes + 8 * og);
        wb = *(const uint2*)(codes + 8 * (og + 8 * width));
        if (g == c) {
            x0 = *(const uint4*)(xg);
            x1 = *(const uint4*)(xg + 8);
        }
    }
    const int c2 = 2 * (c & 1), os = p * 64 + g * width + c2;  // groups c2, c2 + 1 of rows g and g+8
    u32 s0 = 0, s8 = 0;
    if (KG % 4 == 0 || p < FULL) {
        s0 = *(const u16*)(scales + os);
        s8 = *(const u16*)(scales + os + 32);
    } else {  // a narrow piece: its missing groups' columns are zero, their scales must be finite (zero)
        if (c2 < width) {
            s0 = scales[os];
            s8 = scales[os + 8 * width];
        }
        if (c2 + 1 < width) {
            s0 |= (u32)scales[os + 1] << 8;
            s8 |= (u32)scales[os + 8 * width + 1] << 8;
        }
    }
    group_mma(acc, wa, wb, x0, x1, s0, s8);
}
// One 16-element group of 16 w2 rows in a GEMM2 stage: this lane's A rows g and g+8 (of band 4 qd + c) have
// their 8 code bytes at ``stage + ca`` / ``stage + cb``; ``sq`` / ``sq8`` are the scales of rows g / g+8 of
// band 4 qd + 2(c&1), the band of this lane's D column 2(c&1) (the next band's are 64 bytes on).
__device__ __forceinline__ void quad_mma(float (&acc)[4], const u8* stage, int ca, int cb, int sq, int sq8, bool live,
                                         uint4 x0, uint4 x1) {
    uint2 wa = make_uint2(0u, 0u), wb = make_uint2(0u, 0u);
    if (live) {  // divergent loads only: every lane reaches the MMAs (see piece_mma)
        wa = *(const uint2*)(stage + ca);
        wb = *(const uint2*)(stage + cb);
    }
    const u32 s0 = (u32)stage[sq] | ((u32)stage[sq + 64] << 8), s8 = (u32)stage[sq8] | ((u32)stage[sq8 + 64] << 8);
    group_mma(acc, wa, wb, x0, x1, s0, s8);
}

// A GEMM2 stage of a segment whose columns touch ``np`` pieces of a w2 row: codes [np][bands][512 B] (whole
// piece blocks; a narrow last piece is shorter, its slot the same), then scales [np][bands][64 B].  Bands per
// stage: a multiple of BOXB (the tensor copies' box).  The producer and the consumers must agree on it.
__device__ __forceinline__ int bands_per_stage(int np) { return STAGE_BYTES / (np * BLOCK2) / BOXB * BOXB; }

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

// rows i and i+8 of a GEMM2 band: added to the running sums, or (the last segment, ``sum``) stored with them
__device__ __forceinline__ void add_rows(float* s_part, float* sum, int i, float y0, float y8) {
    if (sum) {
        sum[i] = s_part[i] + y0;
        sum[i + 8] = s_part[i + 8] + y8;
    } else {
        s_part[i] += y0;
        s_part[i + 8] += y8;
    }
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
                  const int* __restrict__ segs, float* partials, u64* sync, u16* out, int* ids_out, float* w_out,
                  u64* trace, const __grid_constant__ TensorMap tm_c2, const __grid_constant__ TensorMap tm_s2) {
#ifdef TRACE
    const u64 t_start = clock_now();
    if (threadIdx.x == 0) trace[blockIdx.x * 16] = global_now();
#endif
    extern __shared__ __align__(128) u8 smem[];
    u16* xs = (u16*)(smem + OFF_X);
    float* s_part = (float*)(smem + OFF_PART);
    u16* s_act = (u16*)(smem + OFF_ACT);
    float* red1 = (float*)(smem + OFF_RED);
    __shared__ __align__(8) u64 full_bar[NSTAGE];
    __shared__ __align__(8) u64 empty_bar[NSTAGE];
    __shared__ __align__(8) u64 x_bar;
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
#if PDL
    // A programmatic dependent launch may start while the stream's previous kernel still runs: wait for it to
    // finish (and its writes to be visible) before any memory it may write or read is touched.  Then let the
    // next launch start as early: its CTAs take SMs only as this kernel's CTAs leave them, and wait the same
    // way, so what overlaps is the launch itself.
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif

    // The global loads first, none waiting on another: the logits (and bias), and every expert's global
    // scales, so that nothing after the routing waits on a dependent load.
    float lg[EPT];
#pragma unroll
    for (int q = 0; q < EPT; ++q) {
        const int e = tid + q * NT;
        if (e < E_) {
            lg[q] = load_float<LOGIT_KIND>(logits, e);
#if METHOD == 2 && HAS_BIAS
            s_bias[e] = load_float<BIAS_KIND>(bias, e);
#endif
            s_inv1[e] = POST_FACTOR / g13[e];
            s_inv2[e] = POST_FACTOR / g2[e];
        }
    }
    if (tid == 0) {
        for (int s = 0; s < NSTAGE; ++s) {
            mbar_init(smem_u32(&full_bar[s]), 1);
            mbar_init(smem_u32(&empty_bar[s]), NCW);
        }
        mbar_init(smem_u32(&x_bar), 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
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

    // ---- this CTA's segments: (slot, first band j0, bands n) of the intermediate -------------------------
    const int* my = segs + cta * SEGW;
    const int nseg = my[0];

    // ---- producer: streams every stage in the consumers' order, as far ahead as the ring allows -----------
    // Per segment: its n (gate, up) band pairs of w13 (one band per stage), then its w2 piece blocks of every
    // hidden band, as many bands per stage as fit.
    if (warp == NCW) {
        u32 it = 0;
        for (int sg = 0; sg < nseg; ++sg) {
            const int slot = my[1 + 3 * sg], j0 = my[2 + 3 * sg], n = my[3 + 3 * sg];
            const size_t e = (size_t)s_sel[slot];
            for (int u = 0; u < n; ++u) {
#pragma unroll
                for (int h = 0; h <= GATED; ++h, ++it) {
                    const int st = it % NSTAGE;
                    const u32 bar = smem_u32(&full_bar[st]), dst = smem_u32(smem + st * STAGE_BYTES);
                    if (lane == 0) {
                        if (it >= NSTAGE) MBAR_WAIT(smem_u32(&empty_bar[st]), ((it / NSTAGE) + 1) & 1, 100);
                        const size_t row = e * N1 + (size_t)h * I_ + 16 * (j0 + u);
                        mbar_expect_tx(bar, BAND1);
                        bulk_load(dst, w13 + row * (H_ / 2), CODE1, bar);
                        bulk_load(dst + CODE1, s13 + row * (H_ / 16), H_, bar);
                    }
                }
            }
            const int p0 = j0 >> 2, np = ((j0 + n + 3) >> 2) - p0, per = bands_per_stage(np);
            const int creg = 512 * np * per;  // the scales' offset in a stage
            // a stage: codes [np][per][512 B], then scales [np][per][64 B] (a band's narrow last piece is
            // shorter, its slot the same)
            for (int b0 = 0; b0 < NBH; b0 += per, ++it) {
                const int cnt = min(per, NBH - b0), st = it % NSTAGE;
                const u32 bar = smem_u32(&full_bar[st]), dst = smem_u32(smem + st * STAGE_BYTES);
#if W2TMA
                // one tensor copy per piece and 16 bands (8 KB of codes, 1 KB of scales).  Per-block bulk copies of
                // 512 bytes measured 2x slower: a CTA's bytes in flight are bounded by its copies in flight.
                if (lane == 0) {
                    if (it >= NSTAGE) MBAR_WAIT(smem_u32(&empty_bar[st]), ((it / NSTAGE) + 1) & 1, 101);
                    const int boxes = (cnt + BOXB - 1) / BOXB;  // past the layer's last band: zero fill
                    mbar_expect_tx(bar, np * boxes * BOXB * BLOCK2);
                    for (int q = 0; q < np; ++q)
                        for (int k = 0; k < boxes; ++k) {
                            const int z = (int)e * NBH + b0 + k * BOXB, o = q * per + k * BOXB;
                            tensor_load3(dst + 512 * o, &tm_c2, 0, p0 + q, z, bar);
                            tensor_load3(dst + creg + 64 * o, &tm_s2, 0, p0 + q, z, bar);
                        }
                }
#else
                if (lane == 0) {
                    if (it >= NSTAGE) MBAR_WAIT(smem_u32(&empty_bar[st]), ((it / NSTAGE) + 1) & 1, 101);
                    u32 band_bytes = 0;  // the segment's piece blocks of one hidden band (a narrow one is shorter)
                    for (int q = 0; q < np; ++q) band_bytes += 144 * min(4, KG2 - 4 * (p0 + q));
                    mbar_expect_tx(bar, cnt * band_bytes);
                }
                __syncwarp();
                for (int k = lane; k < cnt * np; k += 32) {  // every lane issues copies: they are small
                    const int bl = k / np, q = k - bl * np, p = p0 + q, width = min(4, KG2 - 4 * p);
                    const size_t row = e * H_ + 16 * (size_t)(b0 + bl);
                    bulk_load(dst + 512 * (q * per + bl), w2 + row * (I_ / 2) + 512 * p, 128 * width, bar);
                    bulk_load(dst + creg + 64 * (q * per + bl), s2 + row * (I_ / 16) + 64 * p, 16 * width, bar);
                }
#endif
            }
        }
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
    for (int i = tid; i < H_; i += NC) s_part[i] = 0.0f;
    consumers_sync();
    const int g = lane >> 2, c = lane & 3;
    MBAR_WAIT(smem_u32(&x_bar), 0, 1);  // always, so that no CTA exits with the copy in flight
    for (int i = tid; i < H_ / 2; i += NC) {  // the token x 2^64 (exact), the decode's B operand
        u32* q = (u32*)xs + i;
        asm("mul.rn.bf16x2 %0, %0, %1;" : "+r"(*q) : "r"(0x5F805F80u));
    }
    consumers_sync();
    u32 it = 0;
    for (int sg = 0; sg < nseg; ++sg) {
        const int slot = my[1 + 3 * sg], j0 = my[2 + 3 * sg], n = my[3 + 3 * sg];
        // GEMM1: band (u, h) -> this warp's share of K (pieces dealt round-robin, rotated by stage so that
        // no warp always gets the extra piece), summed over warps once the segment's bands are done
        for (int u = 0; u < n; ++u) {
#pragma unroll
            for (int h = 0; h <= GATED; ++h, ++it) {
                const int st = it % NSTAGE;
                const u8* stage = smem + st * STAGE_BYTES;
                TRACE_STALL(st, 12);
                MBAR_WAIT(smem_u32(&full_bar[st]), (it / NSTAGE) & 1, 200);
                if (tid == 0 && it == 0) STAMP(3);
                const int w0 = (warp + it) % NCW;
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int k = 0; k < PPW1; ++k) {
                    const int p = w0 + k * NCW;
                    if (p < P1)  // warp-uniform
                        piece_mma<KG1>(acc, stage, stage + CODE1, xs + 16 * (4 * p + c), p, g, c);
                }
                __syncwarp();
                if (lane == 0) mbar_arrive(smem_u32(&empty_bar[st]));
                // rows g / g+8: lanes c = 0 and 1 hold groups 0-1 and 2-3 of every piece
                float r0 = acc[0] + acc[1], r8 = acc[2] + acc[3];
                r0 += __shfl_xor_sync(0xFFFFFFFFu, r0, 1);
                r8 += __shfl_xor_sync(0xFFFFFFFFu, r8, 1);
                if (c == 0) {
                    float* r = red1 + ((h * MAXU + u) * NCW + warp) * 16;
                    r[g] = r0;
                    r[g + 8] = r8;
                }
            }
        }
        consumers_sync();
        {  // the activation of the segment's 16n intermediate rows, rounded to bf16 like the reference's
            const float f1 = s_fac1[slot];
            for (int t = tid; t < 16 * n; t += NC) {
                const int u = t >> 4, r = t & 15;
                float gt = 0.f, up = 0.f;
                for (int w = 0; w < NCW; ++w) {
                    gt += red1[(u * NCW + w) * 16 + r];
#if GATED
                    up += red1[((MAXU + u) * NCW + w) * 16 + r];
#endif
                }
                // rounded first, then carried x 2^64 like the token (exact)
                s_act[t] = to_bf16(from_bf16(to_bf16(activation(gt * f1, up * f1))) * XSCALE);
            }
        }
        if (tid == 0 && sg == nseg - 1) STAMP(4);
        consumers_sync();
        // GEMM2: every hidden band, K = the segment's columns.  Lane column c takes hidden band 4 qd + c of a
        // quad, the MMA's B is block-diagonal (column c holds the activations in lane c's K slots only), so
        // D's column c is band 4 qd + c: four bands per MMA whatever the segment's width (n groups), instead
        // of a piece with most of its groups masked.  One warp owns a quad's sums, so it adds its
        // routing-weighted result into s_part itself.
        const float f2 = s_fac2[slot];
        // the CTA's last segment stores its sums straight to its partial in global memory, as they finish, so
        // that little is left in flight when the CTA reaches the grid barrier
        float* sum = sg == nseg - 1 ? partials + (size_t)cta * H_ : nullptr;
        const int p0 = j0 >> 2, np = ((j0 + n + 3) >> 2) - p0, per = bands_per_stage(np);
        const int creg = 512 * np * per;
        // Per group, where this lane's rows of a stage's first quad lie, and its B fragment: the same in every
        // stage, so worked out once (a stage's quad k is 4 bands, 2048 code and 256 scale bytes, further on).
        int ca[MAXU], w8[MAXU], sq[MAXU];  // sq: the scales of this lane's D columns, bands 2(c&1), +1
        uint4 xa[MAXU], xb[MAXU];
#pragma unroll
        for (int gi = 0; gi < MAXU; ++gi) {
            const int col = j0 + gi, p = col >> 2, width = KG2 % 4 == 0 ? 4 : min(4, KG2 - 4 * p);
            const int o = (p - p0) * per + c;  // the piece block of band c (its A rows): group col & 3
            ca[gi] = 512 * o + 8 * (col & 3) + 8 * width * g;
            w8[gi] = 8 * width;  // rows g+8: 8 rows further on
            sq[gi] = creg + 64 * ((p - p0) * per + 2 * (c & 1)) + (col & 3) + width * g;
            const bool on = gi < n && g == c;
            const uint4 z = make_uint4(0u, 0u, 0u, 0u);
            xa[gi] = on ? *(const uint4*)(s_act + 16 * gi) : z;
            xb[gi] = on ? *(const uint4*)(s_act + 16 * gi + 8) : z;
        }
        for (int b0 = 0; b0 < NBH; b0 += per, ++it) {
            const int cnt = min(per, NBH - b0), st = it % NSTAGE;
            const u8* stage = smem + st * STAGE_BYTES;
            TRACE_STALL(st, 13);
            MBAR_WAIT(smem_u32(&full_bar[st]), (it / NSTAGE) & 1, 300);
            if (tid == 0) STAMP(9);  // the last GEMM2 stage's bytes are in
            // the segment's quads dealt round-robin over the warps, across stages: a stage with fewer quads
            // than warps leaves some warps to the next stage, not idle (a warp still waits for every stage
            // before releasing it, so no release runs ahead of the ring)
            for (int qd = (warp - (b0 >> 2) % NCW + NCW) % NCW; 4 * qd < cnt; qd += NCW) {  // warp-uniform
                // a quad's four bands are all in the stage unless the layer's band count is not a multiple of 4
                const bool live = NBH % 4 == 0 || 4 * qd + c < cnt;
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int gi = 0; gi < MAXU; ++gi) {
                    if (gi < n) {  // warp-uniform
                        const int oc = ca[gi] + 2048 * qd, os = sq[gi] + 256 * qd;
                        quad_mma(acc, stage, oc, oc + 8 * w8[gi], os, os + w8[gi], live, xa[gi], xb[gi]);
                    }
                }
                const int b = b0 + 4 * qd + 2 * c;  // lanes c < 2 hold D's columns 2c and 2c + 1
                if (c < 2 && 4 * qd + 2 * c < cnt) {
                    add_rows(s_part, sum, 16 * b + g, f2 * acc[0], f2 * acc[2]);
                }
                if (c < 2 && 4 * qd + 2 * c + 1 < cnt) {
                    add_rows(s_part, sum, 16 * (b + 1) + g, f2 * acc[1], f2 * acc[3]);
                }
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(smem_u32(&empty_bar[st]));
        }
    }
    consumers_sync();
    if (tid == 0) STAMP(5);

    // ---- the sum over CTAs: publish this CTA's partial, meet every CTA once, sum some hidden bands ---------
    if (nseg == 0) {  // a CTA without work still has a partial: zero
        float4* mine = (float4*)(partials + (size_t)cta * H_);
        for (int i = tid; i < H_ / 4; i += NC) mine[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    consumers_sync();
    if (tid == 0) {
        // The counter only grows, by `grid` per call (cuda_decode keeps one per stream and grid size), so the
        // call's target is the next multiple of grid: no reset, no second atomic on the way out.
        STAMP(6);
        asm volatile("fence.acq_rel.gpu;" ::: "memory");  // the CTA's partial (bar.sync above), then the count
        const u64 old = atomicAdd(sync, 1ull);
        const u64 target = old - old % (u64)grid + (u64)grid;
        STAMP(8);
#ifdef TRACE
        u32 spins = 0;
#endif
        while (ld_relaxed64(sync) < target) SPIN_GUARD(3);
        asm volatile("fence.acq_rel.gpu;" ::: "memory");  // acquire every partial
        STAMP(7);
    }
    consumers_sync();
    {
        // hidden bands [bb0, bb1), 4 float4 columns each; the grid's partials cut into `splits` runs, each summed
        // in order by one thread, then the runs summed in order: a fixed tree for a given grid
        const int bb0 = NBH * cta / grid, bb1 = NBH * (cta + 1) / grid, cols = 4 * (bb1 - bb0);
        if (cols > 0) {
            float4* runs = (float4*)smem;  // the ring is free: every stage was waited for
            // 16 runs at most: the second level is a serial sum in shared memory
            const int cap = min(NC, NSTAGE * STAGE_BYTES / 16) / cols;
            const int splits = max(1, min(min(grid, 16), cap));
            for (int idx = tid; idx < splits * cols; idx += NC) {  // several columns each on small grids
                const int col = idx % cols, sp = idx / cols;
                const int r0 = grid * sp / splits, r1 = grid * (sp + 1) / splits;
                const float4* src = (const float4*)(partials + 16 * bb0) + col;
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
                for (int r = r0; r < r1; ++r) {
                    const float4 p = __ldcg(src + (size_t)r * (H_ / 4));  // L2: other SMs wrote it
                    v.x += p.x; v.y += p.y; v.z += p.z; v.w += p.w;
                }
                runs[sp * cols + col] = v;
            }
            consumers_sync();
            for (int i = tid; i < 4 * cols; i += NC) {
                const float* rf = (const float*)runs;
                float y = 0.f;
                for (int s = 0; s < splits; ++s) y += rf[4 * cols * s + i];
                out[16 * bb0 + i] = to_bf16(y);
            }
        }
    }
    if (tid == 0) {
        STAMP(10);
#ifdef TRACE
        trace[blockIdx.x * 16 + 11] = global_now();
#endif
    }
}
