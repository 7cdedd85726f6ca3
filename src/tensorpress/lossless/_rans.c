/* Entropy coder for tensorpress.lossless: interleaved rANS and float field split/merge.
 *
 * Plain C with no Python API: the package loads it with ctypes (every function releases the
 * GIL there), so chunks decode in parallel threads.
 *
 * rANS with a 32-bit state x in [2^16, 2^32), 16-bit renormalisation words, probability
 * precision P bits (frequencies sum to 2^P, P <= 15), and LANES independent states: symbol i
 * belongs to state i % LANES, which lets the CPU overlap the lanes' dependency chains. The
 * encoder walks the symbols backwards and writes words from the end of its buffer downwards;
 * the decoder reads the LANES final states, then the words in increasing address order.
 *
 * Float fields: a value of `width` bytes is split into its exponent field (`ebits` bits at
 * `shift`) and the remaining `rawbits = 8*width - ebits` bits (mantissa below, sign above),
 * written LSB-first as a packed bit stream of exactly rawbits bits per value.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define LANES 8
#define RANS_L (1u << 16)

/* Encode n symbols. freq/start are indexed by symbol (sum of freq = 2^P). out has room for
 * cap bytes; returns the number of bytes written (at the start of out), or -1 if cap is too
 * small or a symbol has zero frequency. */
long tp_rans_encode(const uint16_t *sym, size_t n, const uint32_t *freq, const uint32_t *start,
                    unsigned nsym, unsigned P, uint8_t *out, size_t cap) {
    if (cap < 4 * LANES) return -1;
    uint32_t x[LANES];
    for (int l = 0; l < LANES; l++) x[l] = RANS_L;
    uint16_t *base = (uint16_t *)out;
    size_t words = (cap - 4 * LANES) / 2;
    uint16_t *ptr = base + (4 * LANES) / 2 + words; /* one past the last word slot */
    uint16_t *lo = base + (4 * LANES) / 2;
    for (size_t k = n; k-- > 0;) {
        unsigned s = sym[k];
        if (s >= nsym) return -1;
        uint32_t f = freq[s];
        if (f == 0) return -1;
        int l = (int)(k % LANES);
        uint32_t xs = x[l];
        uint64_t xmax = ((uint64_t)(RANS_L >> P) << 16) * f; /* up to 2^32 when f = 2^P */
        while (xs >= xmax) {
            if (ptr == lo) return -1;
            *--ptr = (uint16_t)(xs & 0xffff);
            xs >>= 16;
        }
        x[l] = ((xs / f) << P) + (xs % f) + start[s];
    }
    size_t nwords = (size_t)(base + (4 * LANES) / 2 + words - ptr);
    uint8_t *dst = out;
    for (int l = 0; l < LANES; l++) {
        uint32_t v = x[l];
        memcpy(dst + 4 * l, &v, 4); /* little-endian machines only: checked in Python */
    }
    memmove(out + 4 * LANES, ptr, nwords * 2);
    return (long)(4 * LANES + nwords * 2);
}

/* Decode-table entry for one slot: the symbol, its frequency, and slot - start[symbol]. */
typedef struct {
    uint16_t sym, freq, bias, pad;
} slot_t;

/* Decoder state: the lanes' states and the read position in the word stream. */
typedef struct {
    uint32_t x[LANES];
    const uint16_t *ptr, *end;
    const slot_t *table;
    uint32_t mask;
    unsigned P;
    int bad; /* set when a renormalisation needed a word past the end */
} rans_dec_t;

static int dec_init(rans_dec_t *d, const uint8_t *in, size_t len, const slot_t *table, unsigned P) {
    if (len < 4 * LANES || (len - 4 * LANES) % 2) return -1;
    for (int l = 0; l < LANES; l++) memcpy(&d->x[l], in + 4 * l, 4);
    d->ptr = (const uint16_t *)(in + 4 * LANES);
    d->end = (const uint16_t *)(in + len);
    d->table = table;
    d->mask = (1u << P) - 1;
    d->P = P;
    d->bad = 0;
    return 0;
}

/* A valid stream is consumed exactly and leaves every lane in its initial state; a corrupt
 * one almost surely fails one of these checks. */
static int dec_finish(const rans_dec_t *d) {
    if (d->bad || d->ptr != d->end) return -1;
    for (int l = 0; l < LANES; l++)
        if (d->x[l] != RANS_L) return -1;
    return 0;
}

/* One decoding step of lane l: returns the symbol. Renormalisation is branch-free (the word
 * is read speculatively and kept only when needed), since whether a lane needs a word is
 * data-dependent and unpredictable. */
static inline uint32_t dec_step(rans_dec_t *d, int l) {
    uint32_t xs = d->x[l];
    slot_t e = d->table[xs & d->mask];
    xs = (uint32_t)e.freq * (xs >> d->P) + e.bias;
    int need = xs < RANS_L;
    int avail = d->ptr < d->end;
    uint32_t word = avail ? *d->ptr : 0;
    d->bad |= need & !avail;
    xs = need ? (xs << 16) | word : xs;
    d->ptr += need & avail;
    d->x[l] = xs;
    return e.sym;
}

/* Decode n symbols into sym: uint16 if sym_bytes == 2, uint8 if 1 (byte codes, no copy
 * needed afterwards). table has 2^P slots. Returns 0, or -1 if the stream is inconsistent
 * (see dec_finish). */
#define DECODE_LOOP(T)                                                                 \
    do {                                                                               \
        T *out = (T *)sym;                                                             \
        size_t k = 0, full = n - n % LANES;                                            \
        for (; k < full; k += LANES)                                                   \
            for (int l = 0; l < LANES; l++) out[k + l] = (T)dec_step(&d, l);           \
        for (int l = 0; k < n; k++, l++) out[k] = (T)dec_step(&d, l);                  \
    } while (0)

int tp_rans_decode(const uint8_t *in, size_t len, size_t n, const slot_t *table, unsigned P, void *sym,
                   int sym_bytes) {
    rans_dec_t d;
    if (dec_init(&d, in, len, table, P)) return -1;
    if (sym_bytes == 1)
        DECODE_LOOP(uint8_t);
    else
        DECODE_LOOP(uint16_t);
    return dec_finish(&d);
}

static inline uint64_t load_value(const uint8_t *src, size_t i, int width) {
    uint64_t v = 0;
    memcpy(&v, src + i * (size_t)width, (size_t)width);
    return v;
}

static inline void store_value(uint8_t *dst, size_t i, int width, uint64_t v) {
    switch (width) { /* constant-size copies compile to single stores */
    case 1: dst[i] = (uint8_t)v; break;
    case 2: { uint16_t w = (uint16_t)v; memcpy(dst + 2 * i, &w, 2); break; }
    case 4: { uint32_t w = (uint32_t)v; memcpy(dst + 4 * i, &w, 4); break; }
    default: memcpy(dst + i * (size_t)width, &v, (size_t)width);
    }
}

/* Split n values of `width` bytes into field symbols (`ebits` bits at `shift`) and the packed
 * remaining bits (raw must hold ceil(n*rawbits/8) bytes, zero-initialised by the caller). */
void tp_split(const uint8_t *src, size_t n, int width, int shift, int ebits, uint16_t *sym, uint8_t *raw) {
    const int rawbits = 8 * width - ebits;
    const uint64_t emask = (1ull << ebits) - 1;
    const uint64_t lowmask = (1ull << shift) - 1;
    uint64_t acc = 0; /* bits not yet written, LSB first */
    int nacc = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = load_value(src, i, width);
        sym[i] = (uint16_t)((v >> shift) & emask);
        uint64_t r = (v & lowmask) | ((v >> (shift + ebits)) << shift);
        if (rawbits <= 32) {
            acc |= r << nacc; /* nacc < 32 and r < 2^32: fits */
            nacc += rawbits;
            if (nacc >= 32) {
                uint32_t w = (uint32_t)acc;
                memcpy(raw + o, &w, 4);
                o += 4;
                acc >>= 32;
                nacc -= 32;
            }
            continue;
        }
        int left = rawbits; /* wider raw fields (float64): in pieces of at most 32 bits */
        while (left > 0) {
            int take = left > 32 ? 32 : left;
            acc |= (r & ((1ull << take) - 1)) << nacc;
            r >>= take;
            nacc += take;
            left -= take;
            while (nacc >= 8) {
                raw[o++] = (uint8_t)acc;
                acc >>= 8;
                nacc -= 8;
            }
        }
    }
    while (nacc > 0) {
        raw[o++] = (uint8_t)acc;
        acc >>= 8;
        nacc -= 8;
    }
}

/* Rebuild n values from symbols and packed raw bits (rawbits <= 32). Inlined with constant
 * layouts below, so that the shifts and masks are immediates. */
static inline __attribute__((always_inline)) size_t merge_fast(const uint16_t *sym, const uint8_t *raw, size_t n, int width,
                                                               int shift, int ebits, uint8_t *dst) {
    const int rawbits = 8 * width - ebits;
    const size_t rawlen = (n * (size_t)rawbits + 7) / 8;
    const uint64_t lowmask = (1ull << shift) - 1;
    const uint64_t rmask = (1ull << rawbits) - 1;
    /* one unaligned 64-bit load per value while 8 bytes remain in the raw stream */
    size_t safe = rawlen >= 8 ? ((rawlen - 8) * 8) / (size_t)rawbits : 0;
    if (safe > n) safe = n;
    for (size_t i = 0; i < safe; i++) {
        size_t pos = i * (size_t)rawbits;
        uint64_t w;
        memcpy(&w, raw + (pos >> 3), 8);
        uint64_t r = (w >> (pos & 7)) & rmask;
        store_value(dst, i, width, (r & lowmask) | ((uint64_t)sym[i] << shift) | ((r >> shift) << (shift + ebits)));
    }
    return safe;
}

/* Inverse of tp_split: rebuild n values into dst from symbols and packed raw bits. */
void tp_merge(const uint16_t *sym, const uint8_t *raw, size_t n, int width, int shift, int ebits, uint8_t *dst) {
    const int rawbits = 8 * width - ebits;
    const uint64_t lowmask = (1ull << shift) - 1;
    size_t i = 0;
    if (width == 2 && shift == 5 && ebits == 10) /* bfloat16 */
        i = merge_fast(sym, raw, n, 2, 5, 10, dst);
    else if (width == 2 && shift == 8 && ebits == 7) /* float16 */
        i = merge_fast(sym, raw, n, 2, 8, 7, dst);
    else if (width == 4 && shift == 21 && ebits == 10) /* float32 */
        i = merge_fast(sym, raw, n, 4, 21, 10, dst);
    else if (rawbits <= 32)
        i = merge_fast(sym, raw, n, width, shift, ebits, dst);
    for (; i < n; i++) { /* the tail, and raw fields wider than 32 bits */
        size_t pos = i * (size_t)rawbits;
        uint64_t r = 0;
        for (int got = 0; got < rawbits;) {
            size_t p = pos + (size_t)got;
            int avail = 8 - (int)(p & 7);
            int take = rawbits - got < avail ? rawbits - got : avail;
            r |= (uint64_t)((raw[p >> 3] >> (p & 7)) & ((1u << take) - 1)) << got;
            got += take;
        }
        store_value(dst, i, width, (r & lowmask) | ((uint64_t)sym[i] << shift) | ((r >> shift) << (shift + ebits)));
    }
}

/* Decode n coded fields and merge them with their raw bits into dst, in blocks of BLOCK values
 * whose symbols stay in L1 between the two steps (no chunk-sized symbol buffer). */
#define BLOCK 1024
int tp_decode_merge(const uint8_t *in, size_t len, size_t n, const slot_t *table, unsigned P,
                    const uint8_t *raw, int width, int shift, int ebits, uint8_t *dst) {
    const int rawbits = 8 * width - ebits;
    rans_dec_t d;
    if (dec_init(&d, in, len, table, P)) return -1;
    uint16_t sym[BLOCK];
    for (size_t base = 0; base < n; base += BLOCK) {
        size_t m = n - base < BLOCK ? n - base : BLOCK;
        size_t k = 0;
        /* lanes continue across blocks: value i always belongs to lane i % LANES */
        for (; k + LANES <= m; k += LANES)
            for (int l = 0; l < LANES; l++) sym[k + l] = (uint16_t)dec_step(&d, l);
        for (int l = 0; k < m; k++, l++) sym[k] = (uint16_t)dec_step(&d, l);
        /* raw bits of this block start at bit base*rawbits: byte-aligned since BLOCK % 8 == 0 */
        tp_merge(sym, raw + (base * (size_t)rawbits) / 8, m, width, shift, ebits, dst + base * (size_t)width);
    }
    return dec_finish(&d);
}
