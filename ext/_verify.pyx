# cython: language_level=3
"""Compiled signature check: a batch of Kafka messages against a keyring, HMACs without the GIL.

Headers are read with the GIL held (they are Python objects), at C speed and without
creating a Python object per message; every check that needs no key material runs there
too. The HMAC-SHA256 of each message that survives those checks is then computed with the
GIL released, from the key's precomputed inner and outer SHA-256 states (one compression
saved per half, DESIGN 8). SHA-256 is built in: the x86 SHA extensions when the CPU has
them, portable C otherwise, so no system library is linked.

The pure-Python twin (meter/_pyverify.py) states the same contract readably, including
the order of the checks that picks a verdict's code; tests/test_verify.py holds the two
equal.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject, PyTypeObject, Py_TYPE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_Check

cdef extern from "Python.h":
    bint PyList_CheckExact(object)
    bint PyTuple_CheckExact(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    int PyUnicode_KIND(object)
    void* PyUnicode_DATA(object)
    long long PyLong_AsLongLong(object) except? -1

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static const uint32_t meter_sha256_k[64] = {
        0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
        0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
        0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
        0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
        0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
        0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
        0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
        0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u,
    };
    static const uint32_t meter_sha256_iv[8] = {
        0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au, 0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u,
    };

    #define METER_ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

    static void meter_sha256_portable(uint32_t h[8], const uint8_t *p, size_t blocks) {
        uint32_t w[64];
        while (blocks--) {
            uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
            int t;
            for (t = 0; t < 16; t++)
                w[t] = ((uint32_t)p[4 * t] << 24) | ((uint32_t)p[4 * t + 1] << 16)
                     | ((uint32_t)p[4 * t + 2] << 8) | (uint32_t)p[4 * t + 3];
            for (t = 16; t < 64; t++) {
                uint32_t s0 = METER_ROR(w[t - 15], 7) ^ METER_ROR(w[t - 15], 18) ^ (w[t - 15] >> 3);
                uint32_t s1 = METER_ROR(w[t - 2], 17) ^ METER_ROR(w[t - 2], 19) ^ (w[t - 2] >> 10);
                w[t] = w[t - 16] + s0 + w[t - 7] + s1;
            }
            for (t = 0; t < 64; t++) {
                uint32_t t1 = k + (METER_ROR(e, 6) ^ METER_ROR(e, 11) ^ METER_ROR(e, 25))
                            + ((e & f) ^ (~e & g)) + meter_sha256_k[t] + w[t];
                uint32_t t2 = (METER_ROR(a, 2) ^ METER_ROR(a, 13) ^ METER_ROR(a, 22))
                            + ((a & b) ^ (a & c) ^ (b & c));
                k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
            }
            h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
            p += 64;
        }
    }

    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #define METER_HAVE_SHANI 1
    #include <cpuid.h>
    #include <immintrin.h>

    /* The x86 SHA extensions: state kept as ABEF/CDGH, four rounds per sha256rnds2 pair,
       the message schedule by sha256msg1/msg2 on the four newest message vectors. */
    __attribute__((target("sha,sse4.1,ssse3")))
    static void meter_sha256_shani(uint32_t h[8], const uint8_t *p, size_t blocks) {
        const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
        __m128i tmp = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);
        __m128i s1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);
        __m128i s0 = _mm_alignr_epi8(tmp, s1, 8);
        s1 = _mm_blend_epi16(s1, tmp, 0xF0);
        while (blocks--) {
            __m128i abef = s0, cdgh = s1, w[4], m;
            int i;
    #pragma GCC unroll 16
            for (i = 0; i < 16; i++) {
                if (i < 4)
                    w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * i)), mask);
                m = _mm_add_epi32(w[i & 3], _mm_loadu_si128((const __m128i *)&meter_sha256_k[4 * i]));
                s1 = _mm_sha256rnds2_epu32(s1, s0, m);
                if (i >= 3 && i <= 14) {
                    __m128i next = _mm_add_epi32(w[(i + 1) & 3], _mm_alignr_epi8(w[i & 3], w[(i - 1) & 3], 4));
                    w[(i + 1) & 3] = _mm_sha256msg2_epu32(next, w[i & 3]);
                }
                s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(m, 0x0E));
                if (i >= 1 && i <= 12)
                    w[(i - 1) & 3] = _mm_sha256msg1_epu32(w[(i - 1) & 3], w[i & 3]);
            }
            s0 = _mm_add_epi32(s0, abef);
            s1 = _mm_add_epi32(s1, cdgh);
            p += 64;
        }
        tmp = _mm_shuffle_epi32(s0, 0x1B);
        s1 = _mm_shuffle_epi32(s1, 0xB1);
        s0 = _mm_blend_epi16(tmp, s1, 0xF0);
        s1 = _mm_alignr_epi8(s1, tmp, 8);
        _mm_storeu_si128((__m128i *)&h[0], s0);
        _mm_storeu_si128((__m128i *)&h[4], s1);
    }

    /* Two independent messages at once: sha256rnds2 has a latency of several cycles, so one
       message leaves the unit idle between rounds; a second one fills those slots. */
    __attribute__((target("sha,sse4.1,ssse3")))
    static void meter_sha256_shani2(uint32_t ha[8], const uint8_t *pa, uint32_t hb[8],
                                    const uint8_t *pb, size_t blocks) {
        const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
        __m128i ta = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&ha[0]), 0xB1);
        __m128i a1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&ha[4]), 0x1B);
        __m128i a0 = _mm_alignr_epi8(ta, a1, 8);
        __m128i tb = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&hb[0]), 0xB1);
        __m128i b1 = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&hb[4]), 0x1B);
        __m128i b0 = _mm_alignr_epi8(tb, b1, 8);
        a1 = _mm_blend_epi16(a1, ta, 0xF0);
        b1 = _mm_blend_epi16(b1, tb, 0xF0);
        while (blocks--) {
            __m128i abef_a = a0, cdgh_a = a1, abef_b = b0, cdgh_b = b1, wa[4], wb[4], ma, mb, k;
            int i;
    #pragma GCC unroll 16
            for (i = 0; i < 16; i++) {
                if (i < 4) {
                    wa[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(pa + 16 * i)), mask);
                    wb[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(pb + 16 * i)), mask);
                }
                k = _mm_loadu_si128((const __m128i *)&meter_sha256_k[4 * i]);
                ma = _mm_add_epi32(wa[i & 3], k);
                mb = _mm_add_epi32(wb[i & 3], k);
                a1 = _mm_sha256rnds2_epu32(a1, a0, ma);
                b1 = _mm_sha256rnds2_epu32(b1, b0, mb);
                if (i >= 3 && i <= 14) {
                    __m128i na = _mm_add_epi32(wa[(i + 1) & 3], _mm_alignr_epi8(wa[i & 3], wa[(i - 1) & 3], 4));
                    __m128i nb = _mm_add_epi32(wb[(i + 1) & 3], _mm_alignr_epi8(wb[i & 3], wb[(i - 1) & 3], 4));
                    wa[(i + 1) & 3] = _mm_sha256msg2_epu32(na, wa[i & 3]);
                    wb[(i + 1) & 3] = _mm_sha256msg2_epu32(nb, wb[i & 3]);
                }
                a0 = _mm_sha256rnds2_epu32(a0, a1, _mm_shuffle_epi32(ma, 0x0E));
                b0 = _mm_sha256rnds2_epu32(b0, b1, _mm_shuffle_epi32(mb, 0x0E));
                if (i >= 1 && i <= 12) {
                    wa[(i - 1) & 3] = _mm_sha256msg1_epu32(wa[(i - 1) & 3], wa[i & 3]);
                    wb[(i - 1) & 3] = _mm_sha256msg1_epu32(wb[(i - 1) & 3], wb[i & 3]);
                }
            }
            a0 = _mm_add_epi32(a0, abef_a);
            a1 = _mm_add_epi32(a1, cdgh_a);
            b0 = _mm_add_epi32(b0, abef_b);
            b1 = _mm_add_epi32(b1, cdgh_b);
            pa += 64;
            pb += 64;
        }
        ta = _mm_shuffle_epi32(a0, 0x1B);
        a1 = _mm_shuffle_epi32(a1, 0xB1);
        _mm_storeu_si128((__m128i *)&ha[0], _mm_blend_epi16(ta, a1, 0xF0));
        _mm_storeu_si128((__m128i *)&ha[4], _mm_alignr_epi8(a1, ta, 8));
        tb = _mm_shuffle_epi32(b0, 0x1B);
        b1 = _mm_shuffle_epi32(b1, 0xB1);
        _mm_storeu_si128((__m128i *)&hb[0], _mm_blend_epi16(tb, b1, 0xF0));
        _mm_storeu_si128((__m128i *)&hb[4], _mm_alignr_epi8(b1, tb, 8));
    }

    static int meter_cpu_has_shani(void) {
        unsigned a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 19)) || !(c & (1u << 9)))
            return 0;  /* SSE4.1, SSSE3 */
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
            return 0;
        return (b >> 29) & 1;
    }
    #else
    #define METER_HAVE_SHANI 0
    static int meter_cpu_has_shani(void) { return 0; }
    static void meter_sha256_shani(uint32_t h[8], const uint8_t *p, size_t blocks) {
        meter_sha256_portable(h, p, blocks);
    }
    static void meter_sha256_shani2(uint32_t ha[8], const uint8_t *pa, uint32_t hb[8],
                                    const uint8_t *pb, size_t blocks) {
        meter_sha256_portable(ha, pa, blocks);
        meter_sha256_portable(hb, pb, blocks);
    }
    #endif

    static void meter_sha256_portable2(uint32_t ha[8], const uint8_t *pa, uint32_t hb[8],
                                       const uint8_t *pb, size_t blocks) {
        meter_sha256_portable(ha, pa, blocks);
        meter_sha256_portable(hb, pb, blocks);
    }

    typedef void (*meter_compress_fn)(uint32_t h[8], const uint8_t *p, size_t blocks);
    typedef void (*meter_compress2_fn)(uint32_t ha[8], const uint8_t *pa, uint32_t hb[8],
                                       const uint8_t *pb, size_t blocks);
    static meter_compress_fn meter_compress = meter_sha256_portable;
    static meter_compress2_fn meter_compress2 = meter_sha256_portable2;

    /* 1 when the SHA extensions are in use. Called once at import (and by tests). */
    static int meter_sha256_select(int allow_shani) {
        int shani = allow_shani && meter_cpu_has_shani();
        meter_compress = shani ? meter_sha256_shani : meter_sha256_portable;
        meter_compress2 = shani ? meter_sha256_shani2 : meter_sha256_portable2;
        return shani;
    }

    typedef struct {
        uint32_t h[8];
        uint64_t total;
        uint8_t buf[64];
        size_t used;
    } meter_sha256_ctx;

    static void meter_sha256_update(meter_sha256_ctx *c, const uint8_t *p, size_t n) {
        c->total += n;
        if (c->used) {
            size_t take = 64 - c->used < n ? 64 - c->used : n;
            memcpy(c->buf + c->used, p, take);
            c->used += take; p += take; n -= take;
            if (c->used < 64)
                return;
            meter_compress(c->h, c->buf, 1);
            c->used = 0;
        }
        if (n >= 64) {
            meter_compress(c->h, p, n / 64);
            p += n & ~(size_t)63; n &= 63;
        }
        if (n) {
            memcpy(c->buf, p, n);
            c->used = n;
        }
    }

    static void meter_sha256_final(meter_sha256_ctx *c, uint8_t out[32]) {
        uint64_t bits = c->total * 8;
        int i;
        c->buf[c->used++] = 0x80;
        if (c->used > 56) {
            memset(c->buf + c->used, 0, 64 - c->used);
            meter_compress(c->h, c->buf, 1);
            c->used = 0;
        }
        memset(c->buf + c->used, 0, 56 - c->used);
        for (i = 0; i < 8; i++)
            c->buf[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
        meter_compress(c->h, c->buf, 1);
        for (i = 0; i < 8; i++) {
            out[4 * i] = (uint8_t)(c->h[i] >> 24); out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
            out[4 * i + 2] = (uint8_t)(c->h[i] >> 8); out[4 * i + 3] = (uint8_t)c->h[i];
        }
    }

    static void meter_sha256(const uint8_t *p, size_t n, uint8_t out[32]) {
        meter_sha256_ctx c;
        memcpy(c.h, meter_sha256_iv, sizeof c.h);
        c.total = 0; c.used = 0;
        meter_sha256_update(&c, p, n);
        meter_sha256_final(&c, out);
    }

    /* An HMAC-SHA256 key as the states after its ipad and opad blocks (RFC 2104). */
    typedef struct { uint32_t inner[8]; uint32_t outer[8]; } meter_hmac_key;

    static void meter_hmac_init(meter_hmac_key *k, const uint8_t *key, size_t n) {
        uint8_t block[64], digest[32];
        int i;
        memset(block, 0, sizeof block);
        if (n > 64) {
            meter_sha256(key, n, digest);
            memcpy(block, digest, 32);
        } else if (n) {
            memcpy(block, key, n);
        }
        for (i = 0; i < 64; i++) block[i] ^= 0x36;
        memcpy(k->inner, meter_sha256_iv, sizeof k->inner);
        meter_compress(k->inner, block, 1);
        for (i = 0; i < 64; i++) block[i] ^= 0x36 ^ 0x5c;
        memcpy(k->outer, meter_sha256_iv, sizeof k->outer);
        meter_compress(k->outer, block, 1);
        { volatile uint8_t *v = block; for (i = 0; i < 64; i++) v[i] = 0; }
        { volatile uint8_t *v = digest; for (i = 0; i < 32; i++) v[i] = 0; }
    }

    /* HMAC over the concatenation a || b. */
    static void meter_hmac(const meter_hmac_key *k, const uint8_t *a, size_t na,
                           const uint8_t *b, size_t nb, uint8_t out[32]) {
        meter_sha256_ctx c;
        uint8_t inner[32];
        memcpy(c.h, k->inner, sizeof c.h);
        c.total = 64; c.used = 0;
        meter_sha256_update(&c, a, na);
        meter_sha256_update(&c, b, nb);
        meter_sha256_final(&c, inner);
        memcpy(c.h, k->outer, sizeof c.h);
        c.total = 64; c.used = 0;
        meter_sha256_update(&c, inner, 32);
        meter_sha256_final(&c, out);
    }

    /* SHA-256 padding after n message bytes at buf (room for 72 more), for a hashed length of
       `total` bytes; returns the blocks in buf. */
    static size_t meter_pad(uint8_t *buf, size_t n, uint64_t total) {
        size_t blocks = (n + 9 + 63) / 64;
        uint64_t bits = total * 8;
        int i;
        buf[n] = 0x80;
        memset(buf + n + 1, 0, blocks * 64 - n - 9);
        for (i = 0; i < 8; i++)
            buf[blocks * 64 - 8 + i] = (uint8_t)(bits >> (56 - 8 * i));
        return blocks;
    }

    static void meter_digest(const uint32_t h[8], uint8_t *out) {
        int i;
        for (i = 0; i < 8; i++) {
            out[4 * i] = (uint8_t)(h[i] >> 24); out[4 * i + 1] = (uint8_t)(h[i] >> 16);
            out[4 * i + 2] = (uint8_t)(h[i] >> 8); out[4 * i + 3] = (uint8_t)h[i];
        }
    }

    /* Two HMACs at once over messages already laid out in a and b (na, nb bytes, each with
       72 bytes of room after it): both chains go through the two-lane compression while
       both have blocks left, then the longer one finishes alone. */
    static void meter_hmac_pair(const meter_hmac_key *ka, uint8_t *a, size_t na, uint8_t outa[32],
                                const meter_hmac_key *kb, uint8_t *b, size_t nb, uint8_t outb[32]) {
        uint32_t ha[8], hb[8];
        uint8_t oa[64], ob[64];
        size_t blocks_a = meter_pad(a, na, 64 + na), blocks_b = meter_pad(b, nb, 64 + nb);
        size_t both = blocks_a < blocks_b ? blocks_a : blocks_b;
        memcpy(ha, ka->inner, sizeof ha);
        memcpy(hb, kb->inner, sizeof hb);
        meter_compress2(ha, a, hb, b, both);
        if (blocks_a > both) meter_compress(ha, a + 64 * both, blocks_a - both);
        if (blocks_b > both) meter_compress(hb, b + 64 * both, blocks_b - both);
        meter_digest(ha, oa);
        meter_digest(hb, ob);
        meter_pad(oa, 32, 96);
        meter_pad(ob, 32, 96);
        memcpy(ha, ka->outer, sizeof ha);
        memcpy(hb, kb->outer, sizeof hb);
        meter_compress2(ha, oa, hb, ob, 1);
        meter_digest(ha, outa);
        meter_digest(hb, outb);
    }

    static int meter_equal32(const uint8_t *x, const uint8_t *y) {
        uint8_t diff = 0;
        int i;
        for (i = 0; i < 32; i++) diff |= x[i] ^ y[i];
        return diff == 0;
    }

    static void meter_wipe(void *p, size_t n) {
        volatile uint8_t *v = (volatile uint8_t *)p;
        while (n--) *v++ = 0;
    }
    """
    int METER_HAVE_SHANI
    ctypedef struct meter_hmac_key:
        pass
    int meter_sha256_select(int allow_shani) noexcept nogil
    void meter_sha256(const uint8_t* p, size_t n, uint8_t* out) noexcept nogil
    void meter_hmac_init(meter_hmac_key* k, const uint8_t* key, size_t n) noexcept nogil
    void meter_hmac(const meter_hmac_key* k, const uint8_t* a, size_t na,
                    const uint8_t* b, size_t nb, uint8_t* out) noexcept nogil
    void meter_hmac_pair(const meter_hmac_key* ka, uint8_t* a, size_t na, uint8_t* outa,
                         const meter_hmac_key* kb, uint8_t* b, size_t nb, uint8_t* outb) noexcept nogil
    int meter_equal32(const uint8_t* x, const uint8_t* y) noexcept nogil
    void meter_wipe(void* p, size_t n) noexcept nogil

cdef extern from *:
    """
    typedef int (*meter_header_get_all_fn)(const void *hdrs, size_t idx, const char **namep,
                                           const void **valuep, size_t *sizep);
    """
    ctypedef int (*meter_header_get_all_fn)(const void* hdrs, size_t idx, const char** namep,
                                            const void** valuep, size_t* sizep) noexcept nogil

# Reading headers in place from confluent-kafka's Message objects (see enable_message_headers):
# its message.headers() builds a list, three tuples, three str and three bytes per message
# (about 2 us with the GC's share), which costs more than verifying the message.
cdef meter_header_get_all_fn g_header_get_all = NULL
cdef void* g_message_type = NULL
cdef Py_ssize_t g_off_headers = 0      # PyObject* headers (set once headers() converted them)
cdef Py_ssize_t g_off_c_headers = 0    # rd_kafka_headers_t* c_headers (NULL afterwards)
cdef bint g_in_place = False

# Verdict codes: indexes into CODES (meter/_pyverify.py has the same list).
DEF C_OK = 0
DEF C_NO_HEADERS = 1
DEF C_MISSING = 2          # arg: header index (kid, ts, sig)
DEF C_DUPLICATE = 3        # arg: header index
DEF C_BAD_KID = 4
DEF C_BAD_TS = 5
DEF C_BAD_SIG = 6
DEF C_UNKNOWN_KEY = 7
DEF C_ALG_MISMATCH = 8     # arg: signature length
DEF C_WRONG_TOPIC = 9
DEF C_NO_BROKER_TIME = 10  # arg: the record's timestamp type
DEF C_REVOKED = 11         # arg: the time checked
DEF C_NOT_YET_VALID = 12   # arg: the time checked
DEF C_EXPIRED = 13         # arg: the time checked
DEF C_STALE = 14           # arg: time checked - meter-ts
DEF C_FUTURE = 15          # arg: meter-ts - time checked
DEF C_BAD_MAC = 16
DEF C_ED25519 = 17         # every check passed but the signature: Python verifies it
DEF C_PENDING = 255        # internal: waiting for the HMAC pass

DEF ALG_HMAC = 0
DEF ALG_ED25519 = 1
DEF TS_LOG_APPEND_TIME = 2
DEF MAX_KID = 64
DEF MAX_TS_DIGITS = 15
DEF MAX_TOPIC = 255
DEF PREFIX_ROOM = 13 + MAX_KID + 1 + MAX_TS_DIGITS + 1 + MAX_TOPIC + 1
DEF SMALL = 4096                       # values up to this size are hashed two at a time
DEF LANE = PREFIX_ROOM + SMALL + 72    # one such message laid out, with room for padding

CODES = (
    "ok", "no_headers", "missing", "duplicate", "bad_kid", "bad_ts", "bad_sig", "unknown_key",
    "alg_mismatch", "wrong_topic", "no_broker_time", "revoked", "not_yet_valid", "expired", "stale",
    "future", "bad_mac", "ed25519",
)
HEADERS = ("meter-kid", "meter-ts", "meter-sig")

#: True for the debug/sanitizer build (METER_DEBUG / METER_ASAN), so tests can check what they run.
DEBUG = DEBUG_BUILD
#: True when SHA-256 runs on the x86 SHA extensions.
SHANI = bool(meter_sha256_select(1))

cdef uint8_t[256] KID_OK
for _c in range(256):
    KID_OK[_c] = chr(_c) in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-"


def select_backend(bint shani):
    """Use the SHA extensions (when the CPU has them) or portable C; returns whether SHA-NI is on.
    For tests and benchmarks: both backends must give the same digests."""
    global SHANI
    SHANI = bool(meter_sha256_select(shani))
    return SHANI


def sha256(data):
    """SHA-256 of bytes (tests hold it equal to hashlib)."""
    cdef const uint8_t[::1] view = data
    cdef uint8_t out[32]
    with nogil:
        meter_sha256(&view[0] if view.shape[0] else <const uint8_t*>"", view.shape[0], out)
    return PyBytes_FromStringAndSize(<char*>out, 32)


def hmac_sha256(key, data):
    """HMAC-SHA256 of bytes through the precomputed-state path (tests hold it equal to hmac)."""
    cdef const uint8_t[::1] k = key
    cdef const uint8_t[::1] d = data
    cdef meter_hmac_key state
    cdef uint8_t out[32]
    meter_hmac_init(&state, &k[0] if k.shape[0] else <const uint8_t*>"", k.shape[0])
    with nogil:
        meter_hmac(&state, <const uint8_t*>"", 0, &d[0] if d.shape[0] else <const uint8_t*>"",
                   d.shape[0], out)
    meter_wipe(&state, sizeof(state))
    return PyBytes_FromStringAndSize(<char*>out, 32)


ctypedef struct Item:
    const uint8_t* value
    Py_ssize_t value_n
    const uint8_t* kid
    Py_ssize_t kid_n
    const uint8_t* ts
    Py_ssize_t ts_n
    const uint8_t* sig
    int32_t slot


cdef inline int header_index(object key) noexcept:
    """0, 1, 2 for meter-kid, meter-ts, meter-sig; -1 for any other header name."""
    cdef Py_ssize_t n
    cdef const char* s
    if not PyUnicode_Check(key) or PyUnicode_KIND(key) != 1:
        return -1
    n = PyUnicode_GET_LENGTH(key)
    if n != 8 and n != 9:
        return -1
    s = <const char*>PyUnicode_DATA(key)
    if s[0] != b'm' or s[1] != b'e' or s[2] != b't' or s[3] != b'e' or s[4] != b'r' or s[5] != b'-':
        return -1
    if n == 9 and s[6] == b'k' and s[7] == b'i' and s[8] == b'd':
        return 0
    if n == 8 and s[6] == b't' and s[7] == b's':
        return 1
    if n == 9 and s[6] == b's' and s[7] == b'i' and s[8] == b'g':
        return 2
    return -1


cdef inline int c_header_index(const char* s) noexcept nogil:
    """header_index for a NUL-terminated C string."""
    if s == NULL or s[0] != b'm' or s[1] != b'e' or s[2] != b't' or s[3] != b'e' or s[4] != b'r' or s[5] != b'-':
        return -1
    if s[6] == b'k' and s[7] == b'i' and s[8] == b'd' and s[9] == 0:
        return 0
    if s[6] == b't' and s[7] == b's' and s[8] == 0:
        return 1
    if s[6] == b's' and s[7] == b'i' and s[8] == b'g' and s[9] == 0:
        return 2
    return -1


cdef inline void gather_list(object hs, int* count, const uint8_t** fp, Py_ssize_t* fn) noexcept:
    """Count the meter-* headers of a list of (key, value) tuples; keep each one's last value
    as (pointer, size), size -1 when the value is not bytes. `hs` must be an exact list."""
    cdef Py_ssize_t j
    cdef int which
    cdef object h, val
    for j in range(PyList_GET_SIZE(hs)):
        h = <object>PyList_GET_ITEM(hs, j)
        if not PyTuple_CheckExact(h) or PyTuple_GET_SIZE(h) != 2:
            continue
        which = header_index(<object>PyTuple_GET_ITEM(h, 0))
        if which >= 0:
            count[which] += 1
            val = <object>PyTuple_GET_ITEM(h, 1)
            if PyBytes_Check(val):
                fp[which] = <const uint8_t*>PyBytes_AS_STRING(val)
                fn[which] = PyBytes_GET_SIZE(val)
            else:
                fp[which] = NULL
                fn[which] = -1


cdef inline void gather_c(const void* c_headers, int* count, const uint8_t** fp, Py_ssize_t* fn) noexcept nogil:
    """The same over librdkafka's rd_kafka_headers_t, without creating any object."""
    cdef size_t idx = 0
    cdef const char* name
    cdef const void* value
    cdef size_t size
    cdef int which
    while g_header_get_all(c_headers, idx, &name, &value, &size) == 0:
        idx += 1
        which = c_header_index(name)
        if which >= 0:
            count[which] += 1
            if value != NULL:
                fp[which] = <const uint8_t*>value
                fn[which] = <Py_ssize_t>size
            else:
                fp[which] = NULL
                fn[which] = -1


cdef inline PyObject* field(object obj, Py_ssize_t offset) noexcept:
    return (<PyObject**>(<char*><PyObject*>obj + offset))[0]


def enable_message_headers(message_type, size_t header_get_all, first, second):
    """Read the headers of confluent-kafka Message objects in place, after proving where
    they are on two just-consumed messages that carry headers (both get converted here).

    The Message struct starts, after PyObject_HEAD, with topic, value, key, headers (the
    Python list, NULL until headers() is called) and c_headers (librdkafka's headers,
    NULL after the call). The proof: `first`'s topic, value and key are found at their
    offsets, its headers() call turns c_headers from set to NULL and sets headers to the
    list it returned; then `second`'s headers read through `header_get_all` (librdkafka's
    rd_kafka_header_get_all) equal its headers(). Anything else leaves the fast path off
    (headers() is then called per message). Returns whether the fast path is on."""
    global g_header_get_all, g_message_type, g_off_headers, g_off_c_headers, g_in_place
    cdef Py_ssize_t base = sizeof(PyObject)
    cdef Py_ssize_t word = sizeof(void*)
    cdef const void* c_headers
    cdef size_t idx = 0
    cdef const char* name
    cdef const void* value
    cdef size_t size
    if header_get_all == 0 or type(first) is not message_type or type(second) is not message_type:
        return False
    topic, value_obj, key = first.topic(), first.value(), first.key()
    if topic is None or value_obj is None:
        return False
    if field(first, base) != <PyObject*>topic or field(first, base + word) != <PyObject*>value_obj:
        return False
    if key is not None and field(first, base + 2 * word) != <PyObject*>key:
        return False
    if field(first, base + 3 * word) != NULL or field(first, base + 4 * word) == NULL:
        return False
    converted = first.headers()
    if field(first, base + 3 * word) != <PyObject*>converted or field(first, base + 4 * word) != NULL:
        return False
    if field(second, base + 3 * word) != NULL or field(second, base + 4 * word) == NULL:
        return False
    g_header_get_all = <meter_header_get_all_fn>header_get_all
    c_headers = <const void*>field(second, base + 4 * word)
    seen = []
    while g_header_get_all(c_headers, idx, &name, &value, &size) == 0:
        idx += 1
        seen.append((name.decode(), None if value == NULL else (<const char*>value)[:size]))
    if seen != list(second.headers()):
        g_header_get_all = NULL
        return False
    g_message_type = <void*>message_type
    g_off_headers = base + 3 * word
    g_off_c_headers = base + 4 * word
    g_in_place = True
    return True


def message_headers_in_place():
    """Whether Message headers are read in place (see enable_message_headers)."""
    return bool(g_in_place)


cdef inline int64_t parse_ts(const uint8_t* p, Py_ssize_t n) noexcept:
    """Epoch milliseconds as 1-15 ASCII digits; -1 if not."""
    cdef int64_t v = 0
    cdef Py_ssize_t i
    if n < 1 or n > MAX_TS_DIGITS:
        return -1
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return -1
        v = v * 10 + (p[i] - 48)
    return v


cdef inline Py_ssize_t write_prefix(uint8_t* out, const Item* it, const char* topic,
                                    Py_ssize_t topic_n) noexcept nogil:
    """The signature base up to the value: "meter-sig-v1\\n" kid "\\n" ts "\\n" topic "\\n"."""
    cdef Py_ssize_t n = 13
    memcpy(out, b"meter-sig-v1\n", 13)
    memcpy(out + n, it.kid, it.kid_n)
    n += it.kid_n
    out[n] = 10
    memcpy(out + n + 1, it.ts, it.ts_n)
    n += it.ts_n + 1
    out[n] = 10
    memcpy(out + n + 1, topic, topic_n)
    n += topic_n + 1
    out[n] = 10
    return n + 1


cdef inline Py_ssize_t lay_out(uint8_t* lane, const Item* it, const char* topic,
                               Py_ssize_t topic_n) noexcept nogil:
    cdef Py_ssize_t n = write_prefix(lane, it, topic, topic_n)
    memcpy(lane + n, it.value, it.value_n)
    return n + it.value_n


cdef void mac_pass(Item* items, uint8_t* codes, Py_ssize_t count, const meter_hmac_key* keys,
                   const char* topic, Py_ssize_t topic_n, uint8_t* lanes) noexcept nogil:
    """HMAC every pending message and compare in constant time. Values up to SMALL bytes are
    copied behind their prefix into one of two lanes and hashed two at a time; larger ones
    are streamed from where they are."""
    cdef Py_ssize_t i, waiting = -1, na = 0, nb
    cdef uint8_t* a = lanes
    cdef uint8_t* b = lanes + LANE
    cdef uint8_t mac_a[32]
    cdef uint8_t mac_b[32]
    cdef uint8_t prefix[PREFIX_ROOM]
    cdef Item* it
    for i in range(count):
        if codes[i] != C_PENDING:
            continue
        it = &items[i]
        if it.value_n > SMALL:
            nb = write_prefix(prefix, it, topic, topic_n)
            meter_hmac(&keys[it.slot], prefix, nb, it.value, it.value_n, mac_b)
            codes[i] = C_OK if meter_equal32(mac_b, it.sig) else C_BAD_MAC
        elif waiting < 0:
            na = lay_out(a, it, topic, topic_n)
            waiting = i
        else:
            nb = lay_out(b, it, topic, topic_n)
            meter_hmac_pair(&keys[items[waiting].slot], a, na, mac_a, &keys[it.slot], b, nb, mac_b)
            codes[waiting] = C_OK if meter_equal32(mac_a, items[waiting].sig) else C_BAD_MAC
            codes[i] = C_OK if meter_equal32(mac_b, it.sig) else C_BAD_MAC
            waiting = -1
    if waiting >= 0:
        meter_hmac(&keys[items[waiting].slot], a, na, a + na, 0, mac_a)
        codes[waiting] = C_OK if meter_equal32(mac_a, items[waiting].sig) else C_BAD_MAC


cdef class Verdicts:
    """Per message: a code (index into CODES), its integer argument, the keyring slot (-1 if none)."""

    cdef readonly bytes codes
    cdef readonly bytes args    # int64 per message, native order
    cdef readonly bytes slots   # int32 per message, native order

    def __init__(self, bytes codes, bytes args, bytes slots):
        self.codes = codes
        self.args = args
        self.slots = slots


cdef class Table:
    """A keyring compiled for the hot path: HMAC states, algorithms, validity windows, and
    which keys each topic admits. Secrets are read once, turned into HMAC states and never
    kept as Python objects here; the states are wiped when the table goes away."""

    cdef meter_hmac_key* keys
    cdef uint8_t* algs
    cdef int64_t* windows   # not_before, not_after, revoked_at per slot (INT64 sentinels when open)
    cdef Py_ssize_t count
    cdef dict slots         # kid bytes -> slot
    cdef list kid_list      # kid bytes by slot
    cdef list topics        # per slot: frozenset of topic names, or None for every topic
    cdef dict admitted      # topic -> bytes, one flag per slot

    def __cinit__(self):
        self.keys = NULL
        self.algs = NULL
        self.windows = NULL
        self.count = 0

    def __init__(self, kids, algs, windows, secrets, topics):
        """kids: bytes; algs: 0 hmac-sha256, 1 ed25519; windows: (not_before, not_after,
        revoked_at) in epoch ms; secrets: HMAC key bytes (None for Ed25519 keys); topics: a
        set of topic names or None (any topic). One entry per key, in slot order."""
        cdef Py_ssize_t n = len(kids)
        cdef Py_ssize_t i
        cdef const uint8_t[::1] secret
        if not (len(algs) == len(windows) == len(secrets) == len(topics) == n):
            raise ValueError("keyring columns differ in length")
        self.keys = <meter_hmac_key*>malloc(max(n, 1) * sizeof(meter_hmac_key))
        self.algs = <uint8_t*>malloc(max(n, 1))
        self.windows = <int64_t*>malloc(max(n, 1) * 3 * sizeof(int64_t))
        if self.keys == NULL or self.algs == NULL or self.windows == NULL:
            raise MemoryError()
        memset(self.keys, 0, max(n, 1) * sizeof(meter_hmac_key))
        self.count = n
        self.slots = {}
        self.kid_list = []
        self.topics = list(topics)
        self.admitted = {}
        for i in range(n):
            kid = kids[i]
            if not PyBytes_Check(kid):
                raise TypeError("kid must be bytes")
            if kid in self.slots:
                raise ValueError(f"kid {kid.decode(errors='replace')!r} occurs twice")
            self.slots[kid] = i
            self.kid_list.append(kid)
            self.algs[i] = ALG_ED25519 if algs[i] == ALG_ED25519 else ALG_HMAC
            self.windows[3 * i] = windows[i][0]
            self.windows[3 * i + 1] = windows[i][1]
            self.windows[3 * i + 2] = windows[i][2]
            if self.algs[i] == ALG_HMAC:
                secret = secrets[i]
                meter_hmac_init(&self.keys[i], &secret[0] if secret.shape[0] else <const uint8_t*>"",
                                secret.shape[0])

    def __dealloc__(self):
        if self.keys != NULL:
            meter_wipe(self.keys, max(self.count, 1) * sizeof(meter_hmac_key))
        free(self.keys)
        free(self.algs)
        free(self.windows)

    def __len__(self):
        return self.count

    def slot(self, kid):
        """The slot of a key id (bytes), or -1."""
        return self.slots.get(kid, -1)

    cdef int _find(self, const uint8_t* kid, Py_ssize_t n):
        """The slot of a key id given as bytes in memory: a scan for small keyrings, the dict
        (one bytes object made) for large ones."""
        cdef Py_ssize_t i
        cdef object candidate
        if self.count <= 32:
            for i in range(self.count):
                candidate = <object>PyList_GET_ITEM(self.kid_list, i)
                if PyBytes_GET_SIZE(candidate) == n and memcmp(PyBytes_AS_STRING(candidate), kid, n) == 0:
                    return <int>i
            return -1
        found = self.slots.get(PyBytes_FromStringAndSize(<const char*>kid, n))
        return -1 if found is None else <int>found

    cdef bytes _admitted(self, str topic):
        flags = self.admitted.get(topic)
        if flags is None:
            flags = bytes([1 if allowed is None or topic in allowed else 0 for allowed in self.topics])
            self.admitted[topic] = flags
        return flags

    def check(self, payloads, headers, timestamps, str topic, int64_t arrival_ms,
              bint allow_create_time, int64_t max_delay_ms, int64_t max_future_ms):
        """Check each message; returns Verdicts. See meter/_pyverify.py for the order of checks."""
        cdef list values = list(payloads)
        cdef list heads = list(headers)
        cdef list times = list(timestamps)
        cdef Py_ssize_t n = len(values)
        cdef bytes topic_b = topic.encode()
        cdef const char* topic_p = topic_b
        cdef Py_ssize_t topic_n = len(topic_b)
        cdef bytes flags = self._admitted(topic)
        cdef const uint8_t* admitted = <const uint8_t*>PyBytes_AS_STRING(flags)
        cdef bytes codes_b, args_b, slots_b
        cdef uint8_t* codes
        cdef int64_t* args
        cdef int32_t* slots
        cdef Item* items
        cdef Item* it
        cdef Py_ssize_t i, j, pending = 0
        cdef object hs, val, stamp
        cdef const uint8_t* fp[3]
        cdef Py_ssize_t fn[3]
        cdef int count[3]
        cdef int which, code, slot = -1
        cdef int64_t ts = 0, when = 0, kind
        cdef Py_ssize_t sig_n = 0
        cdef const int64_t* window
        cdef uint8_t* lanes
        if len(heads) != n or len(times) != n:
            raise ValueError("payloads, headers and timestamps differ in length")
        if topic_n > MAX_TOPIC:
            raise ValueError("topic name too long")
        codes_b = PyBytes_FromStringAndSize(NULL, n)
        args_b = PyBytes_FromStringAndSize(NULL, n * 8)
        slots_b = PyBytes_FromStringAndSize(NULL, n * 4)
        codes = <uint8_t*>PyBytes_AS_STRING(codes_b)
        args = <int64_t*>PyBytes_AS_STRING(args_b)
        slots = <int32_t*>PyBytes_AS_STRING(slots_b)
        items = <Item*>malloc(max(n, 1) * sizeof(Item))
        if items == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                args[i] = 0
                slots[i] = -1
                it = &items[i]
                code = C_PENDING
                hs = heads[i]
                count[0] = count[1] = count[2] = 0
                fn[0] = fn[1] = fn[2] = -1
                fp[0] = fp[1] = fp[2] = NULL
                if hs is None:
                    pass
                elif PyList_CheckExact(hs):
                    gather_list(hs, count, fp, fn)
                elif g_in_place and <void*>Py_TYPE(hs) == g_message_type:
                    if field(hs, g_off_headers) != NULL:  # headers() was called on it already
                        gather_list(<object>field(hs, g_off_headers), count, fp, fn)
                    elif field(hs, g_off_c_headers) != NULL:
                        gather_c(<const void*>field(hs, g_off_c_headers), count, fp, fn)
                else:
                    hs = hs.headers() if hasattr(hs, "headers") else hs
                    if hs is not None:
                        hs = list(hs)
                        heads[i] = hs
                        gather_list(hs, count, fp, fn)
                if count[0] == 0 and count[1] == 0 and count[2] == 0:
                    code = C_NO_HEADERS
                else:
                    for which in range(3):
                        if count[which] > 1:
                            code = C_DUPLICATE
                            args[i] = which
                            break
                    if code == C_PENDING:
                        for which in range(3):
                            if count[which] == 0:
                                code = C_MISSING
                                args[i] = which
                                break
                if code == C_PENDING:
                    if not 1 <= fn[0] <= MAX_KID:
                        code = C_BAD_KID
                    else:
                        it.kid = fp[0]
                        it.kid_n = fn[0]
                        for j in range(it.kid_n):
                            if not KID_OK[it.kid[j]]:
                                code = C_BAD_KID
                                break
                if code == C_PENDING:
                    ts = -1
                    if fn[1] >= 0:
                        it.ts = fp[1]
                        it.ts_n = fn[1]
                        ts = parse_ts(it.ts, it.ts_n)
                    if ts < 0:
                        code = C_BAD_TS
                if code == C_PENDING:
                    if fn[2] <= 0:
                        code = C_BAD_SIG
                    else:
                        it.sig = fp[2]
                        sig_n = fn[2]
                if code == C_PENDING:
                    slot = self._find(it.kid, it.kid_n)
                    if slot < 0:
                        code = C_UNKNOWN_KEY
                    else:
                        slots[i] = slot
                        if sig_n != (64 if self.algs[slot] == ALG_ED25519 else 32):
                            code = C_ALG_MISMATCH
                            args[i] = sig_n
                        elif not admitted[slot]:
                            code = C_WRONG_TOPIC
                if code == C_PENDING:
                    stamp = times[i]
                    kind = 0
                    if PyTuple_CheckExact(stamp) and PyTuple_GET_SIZE(stamp) == 2:
                        kind = PyLong_AsLongLong(<object>PyTuple_GET_ITEM(stamp, 0))
                    if kind == TS_LOG_APPEND_TIME:
                        when = PyLong_AsLongLong(<object>PyTuple_GET_ITEM(stamp, 1))
                    elif allow_create_time:
                        when = arrival_ms
                    else:
                        code = C_NO_BROKER_TIME
                        args[i] = kind
                if code == C_PENDING:
                    window = &self.windows[3 * slot]
                    if when >= window[2]:
                        code = C_REVOKED
                        args[i] = when
                    elif when < window[0]:
                        code = C_NOT_YET_VALID
                        args[i] = when
                    elif when >= window[1]:
                        code = C_EXPIRED
                        args[i] = when
                    elif when - ts > max_delay_ms:
                        code = C_STALE
                        args[i] = when - ts
                    elif ts - when > max_future_ms:
                        code = C_FUTURE
                        args[i] = ts - when
                if code == C_PENDING:
                    if self.algs[slot] == ALG_ED25519:
                        code = C_ED25519
                    else:
                        val = values[i]
                        if val is None:
                            it.value = <const uint8_t*>""
                            it.value_n = 0
                        elif PyBytes_Check(val):
                            it.value = <const uint8_t*>PyBytes_AS_STRING(val)
                            it.value_n = PyBytes_GET_SIZE(val)
                        else:
                            val = values[i] = bytes(val)
                            it.value = <const uint8_t*>PyBytes_AS_STRING(val)
                            it.value_n = PyBytes_GET_SIZE(val)
                        it.slot = slot
                        pending += 1
                codes[i] = code
            if pending:
                lanes = <uint8_t*>malloc(2 * LANE)
                if lanes == NULL:
                    raise MemoryError()
                with nogil:
                    mac_pass(items, codes, n, self.keys, topic_p, topic_n, lanes)
                free(lanes)
            return Verdicts(codes_b, args_b, slots_b)
        finally:
            free(items)
