/* q4.c: y = x @ W.T for a 4-bit matrix W in bitsandbytes' portable layout, on the CPU.

   What it is: the kernel behind offload.kernels.cpu4, compiled on first use by the system C
   compiler into a per-user cache and loaded with ctypes. It reads the very bytes of a record
   (the ones a GPU's bitsandbytes kernel reads): codes [Out*In/2] uint8, two consecutive codes of
   the row-major [Out, In] matrix per byte, high nibble first; one fp32 absmax per block of 64
   consecutive weights, or bitsandbytes' double quantization of those (uint8 codes, an fp32
   absmax per 256 of them, a 256-entry fp32 map and an fp32 offset); a 16-entry fp32 quant map.

   Paths (the caller picks one that q4_supported_paths() lists; nothing here executes an
   instruction the CPU lacks unless the caller ignores that):
     generic  portable C, any shape, fp32 arithmetic on the dequantized weights (float exact up
              to summation order);
     avx2     AVX2 + FMA, In % 64 == 0: each row of x rounded to int16 per block of 64 (one
              fp32 scale per block), the 16 codes mapped to int16 (two vpshufb on a table of
              13-bit values), exact integer dot products per block (vpmaddwd), each block's
              int32 sums scaled by absmax x the activation's scale and summed in fp32;
     avx512   AVX-512 VL + VNNI (F, BW too), In % 64 == 0: the same arithmetic with vpdpwssd
              on 256-bit vectors, so its results equal avx2's bit for bit.
   Double quantization on the SIMD paths: each row runs in spans of one nested block (256
   blocks of 64), the span's nested absmax and the offset held in registers, so a block's
   absmax costs a byte load, a map load and one fma (computed per block in the loop, with every
   operand reloaded and a division, it had made nf4-dq 7-10% slower per token than nf4 although
   nf4-dq reads 8% fewer bytes).
   Threads: OpenMP over output rows, 64 at a time to whichever thread is free (a core slowed by
   other work, or an efficiency core, takes fewer); each output is computed by one thread in a
   fixed order, so results depend neither on the thread count nor on the batch it came in.

   What it is not: a GEMM for large batches (the caller dequantizes and multiplies there), a
   quantizer, or anything that allocates more than the activations' int16 copy.

   Shape legend: N = rows of x, In = in features, Out = out features, B = blocks of 64. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define Q4_X86 1
#include <immintrin.h>
#if defined(__clang__)
#define Q4_HAVE_AVX2 (__clang_major__ >= 4)
#define Q4_HAVE_AVX512 (__clang_major__ >= 8)
#elif defined(__GNUC__)
#define Q4_HAVE_AVX2 (__GNUC__ >= 5)
#define Q4_HAVE_AVX512 (__GNUC__ >= 9)
#else
#define Q4_HAVE_AVX2 0
#define Q4_HAVE_AVX512 0
#endif
#else
#define Q4_HAVE_AVX2 0
#define Q4_HAVE_AVX512 0
#endif

#define Q4_ABI 1
#define BLOCK 64
#define NESTED 256
#define NCHUNK 4      /* rows of x per pass over a weight row (registers) */
#define PREFETCH 4096 /* bytes of codes ahead that the SIMD paths prefetch into L2 (a core's own
                         stream runs 1.3-2x faster with it, measured on Zen 4; into L1 instead,
                         the codes evict a wide row's int16 activations (28 KiB for In = 14336)
                         and w2 ran 15-20% slower; a prefetch never faults) */

enum { PATH_GENERIC = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
enum { Q4_OK = 0, Q4_EPATH = -1, Q4_ESHAPE = -2, Q4_ENOMEM = -3 };

typedef struct {
    const uint8_t *data;          /* [Out*In/2] codes, high nibble first */
    const float *absmax;          /* [B] fp32, or NULL with double quantization */
    const uint8_t *absmax_codes;  /* [B] uint8 (double quantization) */
    const float *nested_absmax;   /* [ceil(B/256)] fp32 */
    const float *nested_map;      /* [256] fp32 */
    const float *quant_map;       /* [16] fp32 */
    float nested_offset;
    int64_t out, in;
} q4_weight;

int q4_abi(void) { return Q4_ABI; }

int q4_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int q4_compiled_paths(void) {
    return (1 << PATH_GENERIC) | (Q4_HAVE_AVX2 ? 1 << PATH_AVX2 : 0) | (Q4_HAVE_AVX512 ? 1 << PATH_AVX512 : 0);
}

int q4_supported_paths(void) {
    int paths = 1 << PATH_GENERIC;
#if Q4_HAVE_AVX2 || Q4_HAVE_AVX512
    __builtin_cpu_init();
#endif
#if Q4_HAVE_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) paths |= 1 << PATH_AVX2;
#endif
#if Q4_HAVE_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        paths |= 1 << PATH_AVX512;
#endif
    return paths;
}

static inline float block_absmax(const q4_weight *w, int64_t b) {
    if (w->absmax) return w->absmax[b];
    /* bitsandbytes: dequantize_blockwise (map[code] * nested absmax), then + offset */
    return w->nested_map[w->absmax_codes[b]] * w->nested_absmax[b / NESTED] + w->nested_offset;
}

/* ---- generic: fp32 on the dequantized weights, any shape --------------------------------- */

static void rows_generic(const q4_weight *w, const float *x, int64_t n, float *y, int64_t o0, int64_t o1) {
    const int64_t in = w->in, out = w->out;
    float wb[BLOCK];
    for (int64_t o = o0; o < o1; o++) {
        for (int64_t k0 = 0; k0 < n; k0 += NCHUNK) {
            const int64_t nk = n - k0 < NCHUNK ? n - k0 : NCHUNK;
            float acc[NCHUNK] = {0};
            int64_t j = 0;
            while (j < in) {
                const int64_t idx = o * in + j, b = idx / BLOCK;
                int64_t len = (b + 1) * BLOCK - idx; /* rest of this block inside the row */
                if (len > in - j) len = in - j;
                const float s = block_absmax(w, b);
                for (int64_t t = 0; t < len; t++) {
                    const int64_t i = idx + t;
                    const uint8_t byte = w->data[i >> 1];
                    wb[t] = w->quant_map[(i & 1) ? (byte & 15) : (byte >> 4)] * s; /* bitsandbytes' w */
                }
                for (int64_t k = 0; k < nk; k++) {
                    const float *xr = x + (k0 + k) * in + j;
                    float part[8] = {0};
                    int64_t t = 0;
                    for (; t + 8 <= len; t += 8)
                        for (int u = 0; u < 8; u++) part[u] += wb[t + u] * xr[t + u];
                    for (; t < len; t++) part[0] += wb[t] * xr[t];
                    acc[k] += ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
                }
                j += len;
            }
            for (int64_t k = 0; k < nk; k++) y[(k0 + k) * out + o] = acc[k];
        }
    }
}

/* ---- activations and codes to int16 (SIMD paths) ----------------------------------------- */

#define X_LEVELS 32767.0f /* activations: round(x / amax * 32767), per block of 64 */
#define W_LEVELS 4095.0f  /* codes: round(quant_map / max|quant_map| * 4095) */
/* No int32 lane overflows: a lane sums 8 products of at most 4095 x 32767 (1.07e9 < 2^31). */

/* Per row of x and block of 64:
     xq  int16 [B][64]  the block in the order its codes come out of one 32-byte load: the 32
                        high nibbles are the even elements, the low ones the odd elements, and
                        vpunpck{l,h}bw splits each 32 into elements t = 0-7, 16-23 and 8-15,
                        24-31 (of 2t, resp. 2t + 1): so no code is ever moved;
     xs  fp32 [B]       the block's scale: amax / 32767 / table_scale. */
typedef struct {
    int16_t *xq;
    float *xs;
    int64_t blocks; /* B = In / 64 */
} q4_acts;

static void quantize_block(const float *x, int16_t *xq, float *scale, float table_scale) {
    float amax = 0.0f;
    int finite = 1;
    for (int t = 0; t < BLOCK; t++) {
        const float a = fabsf(x[t]);
        amax = a > amax ? a : amax;
        finite &= a <= 3.4e38f; /* false for NaN and Inf */
    }
    if (!finite) { /* the block's outputs become NaN, as a float product's would */
        memset(xq, 0, BLOCK * sizeof(int16_t));
        *scale = NAN;
        return;
    }
    const float inv = amax > 0.0f ? X_LEVELS / amax : 0.0f;
    float r[BLOCK];
    for (int t = 0; t < BLOCK; t++) /* round half to even: |x * inv| <= 32767 < 2^22 */
        r[t] = (x[t] * inv + 12582912.0f) - 12582912.0f;
    for (int half = 0; half < 2; half++)      /* even elements, then odd */
        for (int part = 0; part < 2; part++)  /* vpunpcklbw's t, then vpunpckhbw's */
            for (int i = 0; i < 16; i++) {
                const int t = (i < 8 ? i : i + 8) + 8 * part; /* 0-7,16-23 or 8-15,24-31 */
                xq[half * 32 + part * 16 + i] = (int16_t)r[2 * t + half];
            }
    *scale = amax / X_LEVELS / table_scale;
}

/* The codes' int16 table, split in low and high bytes for vpshufb: round(table_scale * map),
   table_scale = 4095 / max|map| (rounding error below 0.02% rms of a weight). */
static float int16_table(const float *quant_map, uint8_t lo[16], uint8_t hi[16]) {
    float m = 0.0f;
    for (int c = 0; c < 16; c++) {
        const float a = fabsf(quant_map[c]);
        m = a > m ? a : m;
    }
    const float s = m > 0.0f ? W_LEVELS / m : 1.0f;
    for (int c = 0; c < 16; c++) {
        long v = m > 0.0f ? lrintf(s * quant_map[c]) : 0;
        v = v > 4095 ? 4095 : v < -4095 ? -4095 : v;
        const uint16_t u = (uint16_t)(int16_t)v;
        lo[c] = (uint8_t)(u & 0xFF);
        hi[c] = (uint8_t)(u >> 8);
    }
    return s;
}

/* ---- AVX2 + FMA and AVX-512 VNNI ------------------------------------------------------------- */

/* One output row against NC rows of x, block by block: the 32 code bytes give the even codes
   (high nibbles) and the odd ones (low nibbles); two vpshufb each look up the low and the high
   bytes of their int16 weights, and vpunpck{l,h}bw joins them into four vectors of 16. DOT
   gives the block's int32 sums (8 lanes of 8 products), exact, and the same lanes on both
   paths; they are converted to fp32, scaled by absmax x the activation block's scale and
   accumulated in fp32 in the same order, so the two paths give bit-identical results.
   The blocks run in spans: SPAN sets the span's ``end`` and whatever SCALE, block b's absmax,
   needs (fp32 absmax: one span, the row; double quantization: up to the end of a nested
   block, whose absmax and the offset it loads once). */
#define Q4_ROWS(TARGET, NAME, NC, DOT, SPAN, SCALE)                                                \
    TARGET static void NAME##_##NC(const q4_weight *w, const q4_acts *a, int64_t k0, const uint8_t *tbl, \
                                   float *y, int64_t o) {                                          \
        const int64_t blocks = a->blocks, g0 = o * blocks; /* g0: the row's first block */         \
        const int16_t *xq = a->xq + k0 * blocks * 64;                                              \
        const float *xs = a->xs + k0 * blocks;                                                     \
        const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tbl));    \
        const __m256i thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tbl + 16))); \
        const __m256i m4 = _mm256_set1_epi8(0x0F);                                                 \
        __m256 acc[NC];                                                                            \
        for (int k = 0; k < NC; k++) acc[k] = _mm256_setzero_ps();                                 \
        const uint8_t *row = w->data + g0 * 32;                                                    \
        for (int64_t b = 0; b < blocks;) {                                                         \
            int64_t end;                                                                           \
            SPAN                                                                                   \
            for (; b < end; b++) {                                                                 \
                if ((b & 1) == 0) _mm_prefetch((const char *)(row + b * 32 + PREFETCH), _MM_HINT_T1); \
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + b * 32));           \
                const __m256i ie = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);                \
                const __m256i io = _mm256_and_si256(raw, m4);                                      \
                const __m256i le = _mm256_shuffle_epi8(tlo, ie), he = _mm256_shuffle_epi8(thi, ie); \
                const __m256i lo = _mm256_shuffle_epi8(tlo, io), ho = _mm256_shuffle_epi8(thi, io); \
                const __m256i w0 = _mm256_unpacklo_epi8(le, he), w1 = _mm256_unpackhi_epi8(le, he); \
                const __m256i w2 = _mm256_unpacklo_epi8(lo, ho), w3 = _mm256_unpackhi_epi8(lo, ho); \
                const float sw = SCALE;                                                            \
                for (int k = 0; k < NC; k++) {                                                     \
                    const int64_t xb = k * blocks + b;                                             \
                    const __m256i *xr = (const __m256i *)(xq + xb * 64);                           \
                    __m256i s32;                                                                   \
                    DOT                                                                            \
                    const __m256 f = _mm256_set1_ps(sw * xs[xb]);                                  \
                    acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), f, acc[k]);                  \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int k = 0; k < NC; k++) y[(k0 + k) * w->out + o] = hsum256(acc[k]);                   \
    }

#define SPAN_F32                                                                                   \
    end = blocks;                                                                                  \
    const float *absmax = w->absmax + g0;
#define SCALE_F32 absmax[b]
/* bitsandbytes' dequantize_blockwise of the codes, then + offset: nested_map[code] * nested
   absmax + offset, rounded once (an fma: what the compiler made of that expression here
   before; the portable path rounds twice, as bitsandbytes does) */
#define SPAN_DQ                                                                                    \
    const int64_t nest = (int64_t)((uint64_t)(g0 + b) / NESTED); /* >= 0: a shift */               \
    end = (nest + 1) * NESTED - g0;                                                                \
    if (end > blocks) end = blocks;                                                                \
    const uint8_t *codes = w->absmax_codes + g0;                                                   \
    const float *nested_map = w->nested_map;                                                       \
    const __m128 nested = _mm_set_ss(w->nested_absmax[nest]), offset = _mm_set_ss(w->nested_offset);
#define SCALE_DQ _mm_cvtss_f32(_mm_fmadd_ss(_mm_load_ss(nested_map + codes[b]), nested, offset))

/* NAME_1 .. NAME_4 for fp32 absmax, NAME_dq_1 .. NAME_dq_4 for double quantization */
#define Q4_ROWS_ALL(TARGET, NAME, DOT)                                                             \
    Q4_ROWS(TARGET, NAME, 1, DOT, SPAN_F32, SCALE_F32)                                             \
    Q4_ROWS(TARGET, NAME, 2, DOT, SPAN_F32, SCALE_F32)                                             \
    Q4_ROWS(TARGET, NAME, 3, DOT, SPAN_F32, SCALE_F32)                                             \
    Q4_ROWS(TARGET, NAME, 4, DOT, SPAN_F32, SCALE_F32)                                             \
    Q4_ROWS(TARGET, NAME##_dq, 1, DOT, SPAN_DQ, SCALE_DQ)                                          \
    Q4_ROWS(TARGET, NAME##_dq, 2, DOT, SPAN_DQ, SCALE_DQ)                                          \
    Q4_ROWS(TARGET, NAME##_dq, 3, DOT, SPAN_DQ, SCALE_DQ)                                          \
    Q4_ROWS(TARGET, NAME##_dq, 4, DOT, SPAN_DQ, SCALE_DQ)

#define Q4_PASSES(NAME)                                                                            \
    for (int64_t k0 = 0; k0 < n; k0 += NCHUNK) {                                                   \
        switch (n - k0 < NCHUNK ? n - k0 : NCHUNK) {                                               \
            case 1: NAME##_1(w, a, k0, tbl, y, o); break;                                          \
            case 2: NAME##_2(w, a, k0, tbl, y, o); break;                                          \
            case 3: NAME##_3(w, a, k0, tbl, y, o); break;                                          \
            default: NAME##_4(w, a, k0, tbl, y, o); break;                                         \
        }                                                                                          \
    }

/* Rows o0 .. o1 - 1 */
#define Q4_DISPATCH(NAME)                                                                          \
    static void NAME(const q4_weight *w, const q4_acts *a, int64_t n, const uint8_t *tbl, float *y, \
                     int64_t o0, int64_t o1) {                                                     \
        for (int64_t o = o0; o < o1; o++) {                                                        \
            if (w->absmax) Q4_PASSES(NAME)                                                         \
            else Q4_PASSES(NAME##_dq)                                                              \
        }                                                                                          \
    }

#if Q4_HAVE_AVX2 || Q4_HAVE_AVX512
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if Q4_HAVE_AVX2
#define AVX2_DOT                                                                                   \
    s32 = _mm256_add_epi32(                                                                        \
        _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_load_si256(xr)), _mm256_madd_epi16(w1, _mm256_load_si256(xr + 1))), \
        _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_load_si256(xr + 2)), _mm256_madd_epi16(w3, _mm256_load_si256(xr + 3))));
#define AVX2_T __attribute__((target("avx2,fma")))
Q4_ROWS_ALL(AVX2_T, rows_avx2, AVX2_DOT)
Q4_DISPATCH(rows_avx2)
#endif

#if Q4_HAVE_AVX512
#define AVX512_DOT                                                                                 \
    s32 = _mm256_madd_epi16(w0, _mm256_load_si256(xr));                                            \
    s32 = _mm256_dpwssd_epi32(s32, w1, _mm256_load_si256(xr + 1));                                 \
    s32 = _mm256_dpwssd_epi32(s32, w2, _mm256_load_si256(xr + 2));                                 \
    s32 = _mm256_dpwssd_epi32(s32, w3, _mm256_load_si256(xr + 3));
#define AVX512_T __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
Q4_ROWS_ALL(AVX512_T, rows_avx512, AVX512_DOT)
Q4_DISPATCH(rows_avx512)
#endif

/* ---- a streaming read, for measuring the machine's read bandwidth ----------------------------- */

/* The wrapping sum of the n / 8 64-bit words at p (8-byte aligned), read once with ``threads``
   OpenMP threads in contiguous shares, four independent sums a thread (the compiler vectorizes
   it for the baseline ISA). What the benchmark times as "read bandwidth". */
uint64_t q4_stream_sum(const uint64_t *p, int64_t n, int threads) {
    const int64_t words = n / 8;
    uint64_t total = 0;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
#endif
    for (int64_t c = 0; c < (words + 511) / 512; c++) { /* 4 KiB a chunk */
        const int64_t lo = c * 512, hi = lo + 512 < words ? lo + 512 : words;
        uint64_t a = 0, b = 0, d = 0, e = 0;
        int64_t i = lo;
        for (; i + 4 <= hi; i += 4) {
            a += p[i];
            b += p[i + 1];
            d += p[i + 2];
            e += p[i + 3];
        }
        for (; i < hi; i++) a += p[i];
        total += (a + b) + (d + e);
    }
    return total;
}

/* ---- entry ----------------------------------------------------------------------------------- */

#define ROW_TILE 16 /* output rows per unit of work */

/* y [N, Out] fp32 = x [N, In] fp32 @ W.T on ``path``, with ``threads`` OpenMP threads (the
   number that ran is written to *threads_used when not NULL). Returns Q4_OK, Q4_EPATH (a path
   not compiled or not supported here), Q4_ESHAPE (a SIMD path with In % 64 != 0) or Q4_ENOMEM. */
int q4_linear(const q4_weight *w, const float *x, int64_t n, float *y, int path, int threads, int *threads_used) {
    if (path < 0 || path > PATH_AVX512 || !((q4_supported_paths() & q4_compiled_paths()) & (1 << path))) return Q4_EPATH;
    if (n <= 0 || w->out <= 0 || w->in <= 0) return Q4_ESHAPE;
    if (path != PATH_GENERIC && w->in % BLOCK) return Q4_ESHAPE;
    if (threads < 1) threads = 1;
    const int64_t tiles = (w->out + ROW_TILE - 1) / ROW_TILE;
    if (threads > tiles) threads = (int)tiles;

    q4_acts a = {0};
    uint8_t tbl[32]; /* the codes' int16 table: 16 low bytes, then 16 high bytes */
    void *mem = NULL;
    if (path != PATH_GENERIC) {
        const float table_scale = int16_table(w->quant_map, tbl, tbl + 16);
        a.blocks = w->in / BLOCK;
        const size_t bytes = ((size_t)n * (size_t)a.blocks * (64 * sizeof(int16_t) + sizeof(float)) + 63) / 64 * 64;
        mem = aligned_alloc(64, bytes);
        if (!mem) return Q4_ENOMEM;
        a.xq = (int16_t *)mem;                        /* [N*B][64] */
        a.xs = (float *)(a.xq + n * a.blocks * 64);   /* [N*B] */
        for (int64_t i = 0; i < n * a.blocks; i++)
            quantize_block(x + i * BLOCK, a.xq + i * 64, a.xs + i, table_scale);
    }
    if (threads_used) *threads_used = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        if (threads_used && omp_get_thread_num() == 0) *threads_used = omp_get_num_threads();
#pragma omp for schedule(dynamic, 4) /* 64 rows a grab: a slowed or slower core takes fewer */
#endif
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t o0 = t * ROW_TILE, o1 = o0 + ROW_TILE < w->out ? o0 + ROW_TILE : w->out;
            switch (path) {
#if Q4_HAVE_AVX512
                case PATH_AVX512: rows_avx512(w, &a, n, tbl, y, o0, o1); break;
#endif
#if Q4_HAVE_AVX2
                case PATH_AVX2: rows_avx2(w, &a, n, tbl, y, o0, o1); break;
#endif
                default: rows_generic(w, x, n, y, o0, o1); break;
            }
        }
    }
    free(mem);
    return Q4_OK;
}
