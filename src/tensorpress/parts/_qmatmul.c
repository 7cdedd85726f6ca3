/* Weight-only 4- and 8-bit matmul for few tokens (decode), float32 activations, AVX2 + FMA.
 *
 * y[t, o] = sum_g s[o, g] * (sum_{i in g} q[o, i] * x[t, i]) + c[o, g] * xsum[t, g]
 *
 * with W = s * (q - z) per group, c = -s * z, and xsum[t, g] the sum of x[t, i] over group g.
 * 8-bit codes are read as they are stored (one byte per weight, row-major). 4-bit codes are
 * packed by tp_pack4 in runs of 64 inputs: 32 bytes read as eight 32-bit lanes,
 * lane j holding inputs j, j+8, ..., j+56 of the run in nibbles 0..7. Shifting the whole vector
 * right by 4k and masking then gives inputs 8k..8k+7 of the run, one per lane, with no shuffles:
 * per 8 weights one shift, one and, one int->float conversion and one FMA. in_features and the
 * group size must be multiples of 64 (the last group of a row may be shorter than the others if
 * it is a multiple of 64 too). Rows are split over the OpenMP threads; the library links the same
 * libgomp as torch, so both share one thread pool.
 *
 * A plain C library loaded with ctypes (no Python API). tp_qmatmul_supported() tells whether this
 * build and CPU can run the kernel (x86-64 with AVX2 and FMA); the caller falls back otherwise.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define RUN 64 /* inputs per packed run (32 bytes) */
#define TILE 4 /* tokens computed together: one unpacking of the codes feeds TILE tokens */
#define PARALLEL_MIN ((size_t)1 << 17) /* multiply-adds below which one thread runs the call */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

int tp_qmatmul_supported(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return known;
}

__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row against nt <= TILE tokens; always inlined with a constant nt, so the accumulators
 * stay in registers. Several accumulators per token hide the FMA latency (a single chain would
 * wait ~4 cycles per FMA). */
__attribute__((target("avx2,fma"), always_inline)) static inline void row_tile(const uint8_t *codes, const float *s,
                                                                          const float *c, const float *x,
                                                                          const float *xsum, float *y, int nt,
                                                                          int bits, int in_f, int group,
                                                                          int n_groups, int out_f, int o) {
    enum { CHAINS = 4 };
    const int chains = nt == 1 ? 4 : 2; /* 4 x 1 or 2 x nt accumulators: at most 8 registers */
    __m256 total[TILE];
    float shift[TILE];
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    for (int t = 0; t < TILE; t++) {
        total[t] = _mm256_setzero_ps();
        shift[t] = 0.0f;
    }
    for (int g = 0; g < n_groups; g++) {
        const int begin = g * group;
        const int end = begin + group < in_f ? begin + group : in_f;
        __m256 acc[TILE][CHAINS];
        for (int t = 0; t < TILE; t++)
            for (int k = 0; k < CHAINS; k++) acc[t][k] = _mm256_setzero_ps();
        for (int i = begin; i < end; i += RUN) {
            const __m256i v = bits == 4 ? _mm256_loadu_si256((const __m256i *)(codes + i / 2)) : _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {
                const __m256i q = bits == 4 ? _mm256_and_si256(_mm256_srli_epi32(v, 4 * k), low4)
                                            : _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i + 8 * k)));
                const __m256 w = _mm256_cvtepi32_ps(q);
                for (int t = 0; t < nt; t++)
                    acc[t][k % chains] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (size_t)t * in_f + i + 8 * k), acc[t][k % chains]);
            }
        }
        const __m256 sg = _mm256_set1_ps(s[g]);
        for (int t = 0; t < nt; t++) {
            __m256 sum = acc[t][0];
            for (int k = 1; k < chains; k++) sum = _mm256_add_ps(sum, acc[t][k]);
            total[t] = _mm256_fmadd_ps(sum, sg, total[t]);
            shift[t] += c[g] * xsum[(size_t)t * n_groups + g];
        }
    }
    for (int t = 0; t < nt; t++) y[(size_t)t * out_f + o] = hsum(total[t]) + shift[t];
}

__attribute__((target("avx2,fma"))) static void matmul_avx2(const uint8_t *packed, const float *scales,
                                                            const float *shifts, const float *x, float *xsum,
                                                            float *y, int tokens, int bits, int out_f, int in_f,
                                                            int group) {
    const int n_groups = (in_f + group - 1) / group;
    for (int t = 0; t < tokens; t++)
        for (int g = 0; g < n_groups; g++) {
            const int begin = g * group, end = begin + group < in_f ? begin + group : in_f;
            float sum = 0.0f;
            for (int i = begin; i < end; i++) sum += x[(size_t)t * in_f + i];
            xsum[(size_t)t * n_groups + g] = sum;
        }
    /* A team only pays off for enough work: below PARALLEL_MIN multiply-adds one thread is as
     * fast, and on a busy machine every fork/join may wait a whole time slice for a descheduled
     * worker (measured: ~8 ms per call instead of ~40 us beside another 2-thread process). */
    const int parallel = (size_t)out_f * in_f * tokens >= PARALLEL_MIN;
#pragma omp parallel for schedule(static) if (parallel)
    for (int o = 0; o < out_f; o++) {
        const uint8_t *codes = packed + (size_t)o * (in_f / 8 * bits);
        for (int t0 = 0; t0 < tokens; t0 += TILE) {
            const int nt = tokens - t0 < TILE ? tokens - t0 : TILE;
            const float *so = scales + (size_t)o * n_groups, *co = shifts + (size_t)o * n_groups;
            const float *xt = x + (size_t)t0 * in_f, *st = xsum + (size_t)t0 * n_groups;
            float *yt = y + (size_t)t0 * out_f;
            /* constant token counts and widths: each case compiles to its own unrolled loop */
#define TP_TILE(NT, BITS) row_tile(codes, so, co, xt, st, yt, NT, BITS, in_f, group, n_groups, out_f, o)
            if (bits == 4) {
                switch (nt) {
                case 1: TP_TILE(1, 4); break;
                case 2: TP_TILE(2, 4); break;
                case 3: TP_TILE(3, 4); break;
                default: TP_TILE(TILE, 4); break;
                }
            } else {
                switch (nt) {
                case 1: TP_TILE(1, 8); break;
                case 2: TP_TILE(2, 8); break;
                case 3: TP_TILE(3, 8); break;
                default: TP_TILE(TILE, 8); break;
                }
            }
#undef TP_TILE
        }
    }
}

#else
int tp_qmatmul_supported(void) { return 0; }
#endif

/* codes: (out_f, in_f) values 0..15, one per byte -> packed: (out_f, in_f / 2) in the layout
 * above (lanes stored little-endian). in_f must be a multiple of RUN. */
void tp_pack4(const uint8_t *codes, uint8_t *packed, int out_f, int in_f) {
    for (int o = 0; o < out_f; o++) {
        const uint8_t *row = codes + (size_t)o * in_f;
        uint8_t *dst = packed + (size_t)o * (in_f / 2);
        for (int i = 0; i < in_f; i += RUN)
            for (int j = 0; j < 8; j++) {
                uint32_t lane = 0;
                for (int k = 0; k < 8; k++) lane |= (uint32_t)(row[i + 8 * k + j] & 0x0F) << (4 * k);
                for (int b = 0; b < 4; b++) dst[i / 2 + 4 * j + b] = (uint8_t)(lane >> (8 * b));
            }
    }
}

/* codes: 4-bit packed by tp_pack4, or 8-bit one byte per weight; x: (tokens, in_f) float32;
 * scales, shifts: (out_f, n_groups) float32; y: (tokens, out_f) float32. Returns 0, or -1 when
 * the shapes break the contract above, memory runs out or the kernel cannot run here. */
int tp_qmatmul(const uint8_t *codes, const float *scales, const float *shifts, const float *x, float *y, int tokens,
               int bits, int out_f, int in_f, int group) {
    if (tokens < 0 || out_f <= 0 || in_f <= 0 || group <= 0 || in_f % RUN || group % RUN) return -1;
    if (bits != 4 && bits != 8) return -1;
#if defined(__x86_64__) && defined(__GNUC__)
    if (!tp_qmatmul_supported()) return -1;
    /* per-token group sums of x: on the stack for decode-sized calls */
    float local[1024];
    const size_t need = (size_t)tokens * ((in_f + group - 1) / group);
    float *xsum = need <= 1024 ? local : malloc(need * sizeof(float));
    if (xsum == NULL) return -1;
    matmul_avx2(codes, scales, shifts, x, xsum, y, tokens, bits, out_f, in_f, group);
    if (xsum != local) free(xsum);
    return 0;
#else
    (void)codes; (void)scales; (void)shifts; (void)x; (void)y; (void)bits;
    return -1;
#endif
}
