# cython: language_level=3
"""Compiled usage-event parser: message bytes straight into Arrow buffers.

The scan runs without the GIL and creates no Python object per event: each
column is a malloc'd buffer that pyarrow wraps without copying at the end.
The pure-Python twin (meter/_pyparser.py) is the readable statement of the
same contract, including the order of checks that picks a reject's reason;
tests/test_parser_fuzz.py holds the two equal.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memchr, memcmp, memcpy, memset
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_GET_SIZE

import json
import time

import pyarrow as pa

from meter.reasons import PARSER_REASONS, Reject, format_detail
from meter.schema import DEFAULT_LATENESS_MS, EVENTS, FIELD_ORDER

# Reason codes: indexes into meter.reasons.PARSER_REASONS.
DEF R_INVALID_JSON = 0
DEF R_INVALID_UTF8 = 1
DEF R_NOT_OBJECT = 2
DEF R_MISSING_FIELD = 3
DEF R_WRONG_TYPE = 4
DEF R_OUT_OF_RANGE = 5
DEF R_INVALID_VALUE = 6
DEF R_INVALID_TIMESTAMP = 7
DEF R_TIMESTAMP_OUT_OF_RANGE = 8
DEF R_DUPLICATE_FIELD = 9
DEF R_TOO_LARGE = 10
DEF R_TOO_DEEP = 11

# JSON kinds: meter.reasons.KINDS; K_NONE marks a field that is absent.
DEF K_OBJECT = 0
DEF K_ARRAY = 1
DEF K_STRING = 2
DEF K_INTEGER = 3
DEF K_NUMBER = 4
DEF K_BOOL = 5
DEF K_NULL = 6
DEF K_NONE = 7

# Fields in meter.schema.FIELD_ORDER.
DEF F_EVENT_ID = 0
DEF F_TS = 1
DEF F_USER = 2
DEF F_MODEL = 5
DEF F_LAST_STRING = 9
DEF F_INPUT = 10
DEF F_OUTPUT = 11
DEF F_REASONING = 15
DEF N_FIELDS = 16
DEF N_STRINGS = 10

DEF MAX_MESSAGE = 1048576
DEF MAX_DEPTH = 64
DEF TOKEN_MAX = 1000000000
DEF MAX_FUTURE_MS = 300000

#: True for the debug/sanitizer build (METER_DEBUG / METER_ASAN), so tests can check what they run.
DEBUG = DEBUG_BUILD

assert PARSER_REASONS[R_TOO_DEEP] == "too_deep" and PARSER_REASONS[R_DUPLICATE_FIELD] == "duplicate_field"
assert FIELD_ORDER[F_REASONING] == "reasoning_tokens" and FIELD_ORDER[F_LAST_STRING] == "prompt_hash"

cdef uint32_t REQUIRED = (1 << F_EVENT_ID) | (1 << F_TS) | (1 << F_USER) | (1 << F_MODEL) | (1 << F_INPUT) | (1 << F_OUTPUT)
cdef int[N_FIELDS] STRING_MAX
STRING_MAX[:] = [64, 0, 128, 128, 128, 128, 128, 128, 128, 128, 0, 0, 0, 0, 0, 0]

# Byte classes.
cdef uint8_t[256] STR_STOP      # ends a fast string run: '"', '\\', control characters
cdef uint8_t[256] IS_WS
cdef uint8_t[256] HEXVAL        # 255 = not a hex digit
cdef uint8_t[256] EVENT_ID_OK


cdef void _init_tables():
    cdef int c
    for c in range(256):
        STR_STOP[c] = 1 if (c < 0x20 or c == 34 or c == 92) else 0
        IS_WS[c] = 1 if c in (32, 9, 13) else 0  # '\n' ends the line, never skipped
        HEXVAL[c] = 255
        EVENT_ID_OK[c] = 1 if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c in (46, 95, 58, 45)) else 0
    for c in range(10):
        HEXVAL[48 + c] = c
    for c in range(6):
        HEXVAL[65 + c] = 10 + c
        HEXVAL[97 + c] = 10 + c

_init_tables()


# ---------------------------------------------------------------- growable buffers

cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


cdef inline int buf_reserve(Buf* b, Py_ssize_t extra) noexcept nogil:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap
    cdef char* data
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < need:
        cap *= 2
    data = <char*>realloc(b.data, cap)
    if data == NULL:
        return -1
    b.data = data
    b.cap = cap
    return 0


cdef inline int buf_append(Buf* b, const void* src, Py_ssize_t n) noexcept nogil:
    """Append n bytes; short values (most strings of an event) copy in words, not via memcpy()."""
    cdef char* dst
    cdef const char* from_ = <const char*>src
    cdef uint64_t word
    if buf_reserve(b, n) < 0:
        return -1
    dst = b.data + b.len
    b.len += n
    if n > 64:
        memcpy(dst, src, n)
        return 0
    while n >= 8:
        memcpy(&word, from_, 8)
        memcpy(dst, &word, 8)
        dst += 8
        from_ += 8
        n -= 8
    while n > 0:
        dst[0] = from_[0]
        dst += 1
        from_ += 1
        n -= 1
    return 0


cdef inline int buf_push_i64(Buf* b, int64_t v) noexcept nogil:
    return buf_append(b, &v, 8)


cdef inline int buf_push_i32(Buf* b, int32_t v) noexcept nogil:
    return buf_append(b, &v, 4)


cdef class _Owned:
    """Owns one malloc'd buffer and lends it to pyarrow through the buffer protocol."""

    cdef char* data
    cdef Py_ssize_t size

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.size, 1, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __dealloc__(self):
        free(self.data)


cdef object _take(Buf* b):
    """Hand a buffer to pyarrow without copying; the Buf is left empty."""
    cdef _Owned owner
    if b.data == NULL:
        return pa.py_buffer(b"")
    owner = _Owned.__new__(_Owned)
    owner.data = b.data
    owner.size = b.len
    b.data = NULL
    b.len = 0
    b.cap = 0
    return pa.py_buffer(owner)


# ---------------------------------------------------------------- scan state

cdef struct Value:
    Py_ssize_t start      # strings: first byte after the quote; others: first byte
    Py_ssize_t end        # strings: the closing quote; others: one past the value
    int kind
    bint escaped
    bint plain            # strings: no escape and no byte >= 0x7F
    bint negative
    bint big              # integer magnitude beyond 2**63 - 1
    uint64_t magnitude


cdef struct Key:
    const uint8_t* p      # key bytes; NULL while they sit at `off` in the arena (it may move)
    Py_ssize_t off
    Py_ssize_t n
    Py_ssize_t pos        # byte offset of the key's opening quote


cdef struct Failure:
    int reason
    int templ
    int field
    int64_t arg


cdef struct Scan:
    const uint8_t* s
    Py_ssize_t n
    Py_ssize_t i
    Failure fail
    Py_ssize_t dup_pos    # smallest offset of a repeated key's opening quote, -1 if none
    Value fields[N_FIELDS]
    uint32_t seen
    Buf keys              # Key stack of the objects being scanned
    Buf arena             # decoded keys and decoded known strings


cdef struct RejectRec:
    int32_t message
    int32_t line
    int32_t reason
    int32_t templ
    int32_t field
    int64_t arg
    Py_ssize_t line_start  # offset of the line in its message (for a duplicate key's name)
    Py_ssize_t key_pos


cdef inline void fail(Scan* sc, int reason, int templ, int field, int64_t arg) noexcept nogil:
    sc.fail.reason = reason
    sc.fail.templ = templ
    sc.fail.field = field
    sc.fail.arg = arg


cdef inline int syntax(Scan* sc, Py_ssize_t pos) noexcept nogil:
    fail(sc, R_INVALID_JSON, 4, -1, pos)
    return -1


cdef inline void skip_ws(Scan* sc) noexcept nogil:
    cdef const uint8_t* s = sc.s
    cdef Py_ssize_t i = sc.i, n = sc.n
    if i < n and s[i] > 32:  # compact JSON: nothing to skip
        return
    while i < n and IS_WS[s[i]]:
        i += 1
    sc.i = i


# ---------------------------------------------------------------- UTF-8

cdef Py_ssize_t utf8_error(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Offset of the first invalid UTF-8 sequence (overlong, surrogate, > U+10FFFF), or -1."""
    cdef Py_ssize_t i = 0
    cdef uint64_t word
    cdef uint8_t c, c1
    while i < n:
        if i + 8 <= n:
            memcpy(&word, s + i, 8)
            if (word & HIGHS) == 0:
                i += 8
                continue
        c = s[i]
        if c < 0x80:
            i += 1
        elif 0xC2 <= c <= 0xDF:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return i
            i += 2
        elif 0xE0 <= c <= 0xEF:
            if i + 2 >= n:
                return i
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return i
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):
                return i
            i += 3
        elif 0xF0 <= c <= 0xF4:
            if i + 3 >= n:
                return i
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return i
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
                return i
            i += 4
        else:
            return i
    return -1


# ---------------------------------------------------------------- JSON grammar

cdef inline int hex4(Scan* sc, Py_ssize_t at, uint32_t* out) noexcept nogil:
    cdef uint32_t v = 0
    cdef uint8_t h
    cdef Py_ssize_t k
    if at + 4 > sc.n:
        return syntax(sc, at)
    for k in range(4):
        h = HEXVAL[sc.s[at + k]]
        if h == 255:
            return syntax(sc, at)
        v = (v << 4) | h
    out[0] = v
    return 0


cdef extern from *:
    """
    #define METER_HIGHS 0x8080808080808080ULL
    """
    const uint64_t HIGHS "METER_HIGHS"

cdef extern from *:
    """
    /* The run of plain string bytes from i: stops at a quote, a backslash or a control
       byte, 16 bytes at a time with SSE2 (x86-64 baseline), else 8 at a time in a word.
       Returns the first stop position, or the last position with fewer than a block left;
       *wide gets a nonzero bit if a byte >= 0x7F was seen (perhaps one past the stop). */
    #if defined(__SSE2__)
    #include <emmintrin.h>
    static inline Py_ssize_t meter_string_run(const uint8_t* s, Py_ssize_t i, Py_ssize_t n, uint64_t* wide) {
        const __m128i quote = _mm_set1_epi8(34), backslash = _mm_set1_epi8(92);
        const __m128i ctl = _mm_set1_epi8(0x1F), del = _mm_set1_epi8(0x7F);
        while (i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i*)(s + i));
            __m128i stop = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                        _mm_cmpeq_epi8(_mm_min_epu8(v, ctl), v));
            unsigned mask = (unsigned)_mm_movemask_epi8(stop);
            *wide |= (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_max_epu8(v, del), v));
            if (mask) return i + __builtin_ctz(mask);
            i += 16;
        }
        return i;
    }
    #else
    static inline Py_ssize_t meter_string_run(const uint8_t* s, Py_ssize_t i, Py_ssize_t n, uint64_t* wide) {
        const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
        uint64_t w, stop, q, b, d;
        while (i + 8 <= n) {
            memcpy(&w, s + i, 8);
            q = w ^ (ones * 34); b = w ^ (ones * 92); d = w ^ (ones * 127);
            *wide |= (w & highs) | ((d - ones) & ~d & highs);
            stop = ((q - ones) & ~q & highs) | ((b - ones) & ~b & highs) | ((w - ones * 32) & ~w & highs);
            if (stop) return i + (__builtin_ctzll(stop) >> 3);  /* the lowest flagged byte is exact */
            i += 8;
        }
        return i;
    }
    #endif
    """
    Py_ssize_t string_run "meter_string_run"(const uint8_t* s, Py_ssize_t i, Py_ssize_t n, uint64_t* wide) nogil


cdef int scan_string(Scan* sc, Value* v) noexcept nogil:
    """Scan a string at sc.i (on its quote); validates escapes, leaves sc.i after the closing quote.

    Whole blocks at a time while no quote, backslash or control byte is in sight; `v.plain`
    records that no byte is >= 0x7F, so the control-character rule can skip the value.
    """
    cdef const uint8_t* s = sc.s
    cdef Py_ssize_t n = sc.n
    cdef Py_ssize_t i = sc.i + 1
    cdef Py_ssize_t esc
    cdef uint8_t c
    cdef uint32_t unit, low
    cdef uint64_t wide = 0
    v.start = i
    v.escaped = False
    while True:
        i = string_run(s, i, n, &wide)
        while i < n and not STR_STOP[s[i]]:
            if s[i] >= 0x7F:
                wide = 1
            i += 1
        if i >= n:
            return syntax(sc, n)
        c = s[i]
        if c == 34:
            v.end = i
            v.kind = K_STRING
            v.plain = wide == 0 and not v.escaped
            sc.i = i + 1
            if wide and utf8_error(s + v.start, i - v.start) >= 0:
                fail(sc, R_INVALID_UTF8, 2, -1, 0)
                return -1
            return 0
        if c < 0x20:
            return syntax(sc, i)
        v.escaped = True
        esc = i
        if i + 1 >= n:
            return syntax(sc, i + 1)
        c = s[i + 1]
        if c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 or c == 114 or c == 116:
            i += 2
        elif c == 117:
            if hex4(sc, i + 2, &unit) < 0:
                return -1
            i += 6
            if 0xDC00 <= unit <= 0xDFFF:
                fail(sc, R_INVALID_UTF8, 3, -1, esc)
                return -1
            if 0xD800 <= unit <= 0xDBFF:
                if i + 2 > n or s[i] != 92 or s[i + 1] != 117:
                    fail(sc, R_INVALID_UTF8, 3, -1, esc)
                    return -1
                if hex4(sc, i + 2, &low) < 0:
                    return -1
                if not (0xDC00 <= low <= 0xDFFF):
                    fail(sc, R_INVALID_UTF8, 3, -1, esc)
                    return -1
                i += 6
        else:
            return syntax(sc, i + 1)


cdef inline Py_ssize_t put_utf8(uint8_t* out, uint32_t cp) noexcept nogil:
    if cp < 0x80:
        out[0] = cp
        return 1
    if cp < 0x800:
        out[0] = 0xC0 | (cp >> 6)
        out[1] = 0x80 | (cp & 0x3F)
        return 2
    if cp < 0x10000:
        out[0] = 0xE0 | (cp >> 12)
        out[1] = 0x80 | ((cp >> 6) & 0x3F)
        out[2] = 0x80 | (cp & 0x3F)
        return 3
    out[0] = 0xF0 | (cp >> 18)
    out[1] = 0x80 | ((cp >> 12) & 0x3F)
    out[2] = 0x80 | ((cp >> 6) & 0x3F)
    out[3] = 0x80 | (cp & 0x3F)
    return 4


cdef inline uint32_t hex4_unchecked(const uint8_t* p) noexcept nogil:
    return (HEXVAL[p[0]] << 12) | (HEXVAL[p[1]] << 8) | (HEXVAL[p[2]] << 4) | HEXVAL[p[3]]


cdef Py_ssize_t decode_into(const uint8_t* s, Py_ssize_t start, Py_ssize_t end, uint8_t* out) noexcept nogil:
    """Decode an already validated string body to `out` (room for end - start bytes: decoding
    never grows a string); returns the decoded length."""
    cdef Py_ssize_t i = start, n = 0
    cdef uint8_t c
    cdef uint32_t cp, low
    while i < end:
        c = s[i]
        if c != 92:
            out[n] = c
            n += 1
            i += 1
            continue
        c = s[i + 1]
        if c == 117:
            cp = hex4_unchecked(s + i + 2)
            i += 6
            if 0xD800 <= cp <= 0xDBFF:
                low = hex4_unchecked(s + i + 2)
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                i += 6
            n += put_utf8(out + n, cp)
            continue
        if c == 98:
            c = 8
        elif c == 102:
            c = 12
        elif c == 110:
            c = 10
        elif c == 114:
            c = 13
        elif c == 116:
            c = 9
        out[n] = c
        n += 1
        i += 2
    return n


cdef Py_ssize_t decode_string(const uint8_t* s, Py_ssize_t start, Py_ssize_t end, Buf* out) noexcept nogil:
    """Decode an already validated string body onto the end of `out`; returns its offset, -1 on OOM."""
    cdef Py_ssize_t at = out.len
    if buf_reserve(out, end - start) < 0:
        return -1
    out.len += decode_into(s, start, end, <uint8_t*>out.data + at)
    return at


cdef inline int scan_number(Scan* sc, Value* v) noexcept nogil:
    """JSON number grammar; integers accumulate their magnitude, saturating past 2**63 - 1."""
    cdef const uint8_t* s = sc.s
    cdef Py_ssize_t n = sc.n
    cdef Py_ssize_t i = sc.i, start
    cdef uint64_t m = 0
    cdef bint big = False
    cdef uint8_t d
    v.start = i
    v.negative = False
    if s[i] == 45:
        v.negative = True
        i += 1
    if i >= n or not (48 <= s[i] <= 57):
        return syntax(sc, sc.i)
    if s[i] == 48:
        i += 1
    else:
        start = i
        while i < n and 48 <= s[i] <= 57:
            if i - start < 18:  # 18 digits always fit; a 19th needs the overflow check
                m = m * 10 + (s[i] - 48)
            elif not big:
                d = s[i] - 48
                if i - start > 18 or m > (0x7FFFFFFFFFFFFFFFULL - d) // 10:
                    big = True
                else:
                    m = m * 10 + d
            i += 1
    v.kind = K_INTEGER
    if i + 1 < n and s[i] == 46 and 48 <= s[i + 1] <= 57:
        i += 2
        while i < n and 48 <= s[i] <= 57:
            i += 1
        v.kind = K_NUMBER
    if i < n and (s[i] == 101 or s[i] == 69):
        d = 1
        if i + 1 < n and (s[i + 1] == 43 or s[i + 1] == 45):
            d = 2
        if i + d < n and 48 <= s[i + d] <= 57:
            i += d
            while i < n and 48 <= s[i] <= 57:
                i += 1
            v.kind = K_NUMBER
    v.end = i
    v.big = big
    v.magnitude = m
    sc.i = i
    return 0


cdef inline int scan_literal(Scan* sc, Value* v) noexcept nogil:
    cdef const uint8_t* p = sc.s + sc.i
    cdef Py_ssize_t left = sc.n - sc.i
    v.start = sc.i
    if left >= 4 and memcmp(p, b"true", 4) == 0:
        v.kind = K_BOOL
        sc.i += 4
    elif left >= 5 and memcmp(p, b"false", 5) == 0:
        v.kind = K_BOOL
        sc.i += 5
    elif left >= 4 and memcmp(p, b"null", 4) == 0:
        v.kind = K_NULL
        sc.i += 4
    else:
        return syntax(sc, sc.i)
    v.end = sc.i
    return 0


cdef int key_cmp(const void* a, const void* b) noexcept nogil:
    cdef const Key* x = <const Key*>a
    cdef const Key* y = <const Key*>b
    cdef Py_ssize_t n = x.n if x.n < y.n else y.n
    cdef int c = memcmp(x.p, y.p, n)
    if c:
        return c
    if x.n != y.n:
        return -1 if x.n < y.n else 1
    return -1 if x.pos < y.pos else (1 if x.pos > y.pos else 0)


cdef void find_repeated_keys(Scan* sc, Py_ssize_t base) noexcept nogil:
    """Record the earliest second occurrence of a key among the keys pushed since `base`."""
    cdef Key* keys = <Key*>sc.keys.data + base
    cdef Py_ssize_t count = sc.keys.len // sizeof(Key) - base
    cdef Py_ssize_t a, b
    if count < 2:
        return
    if count <= 12:
        for b in range(1, count):
            for a in range(b):
                if keys[a].n == keys[b].n and memcmp(keys[a].p, keys[b].p, keys[a].n) == 0:
                    if sc.dup_pos < 0 or keys[b].pos < sc.dup_pos:
                        sc.dup_pos = keys[b].pos
                    break
        return
    qsort(keys, count, sizeof(Key), key_cmp)
    for b in range(1, count):
        a = b - 1
        if keys[a].n == keys[b].n and memcmp(keys[a].p, keys[b].p, keys[a].n) == 0:
            if sc.dup_pos < 0 or keys[b].pos < sc.dup_pos:
                sc.dup_pos = keys[b].pos


cdef int push_key(Scan* sc, Value* k) noexcept nogil:
    cdef Key key
    key.pos = k.start - 1
    if k.escaped:
        key.off = decode_string(sc.s, k.start, k.end, &sc.arena)
        if key.off < 0:
            return -2
        key.p = NULL
        key.n = sc.arena.len - key.off
    else:
        key.p = sc.s + k.start
        key.n = k.end - k.start
    if buf_append(&sc.keys, &key, sizeof(Key)) < 0:
        return -2
    return 0


cdef void resolve_arena_keys(Scan* sc, Py_ssize_t base) noexcept nogil:
    """Turn arena offsets of decoded keys into pointers once the arena no longer moves."""
    cdef Key* keys = <Key*>sc.keys.data + base
    cdef Py_ssize_t count = sc.keys.len // sizeof(Key) - base
    cdef Py_ssize_t k
    for k in range(count):
        if keys[k].p == NULL:
            keys[k].p = <const uint8_t*>sc.arena.data + keys[k].off


cdef int scan_container(Scan* sc, int depth, Value* v) noexcept nogil:
    """An object or array below the top level: syntax, depth and repeated keys."""
    cdef bint is_object = sc.s[sc.i] == 123
    cdef uint8_t close = 125 if is_object else 93
    cdef Py_ssize_t base = sc.keys.len // sizeof(Key)
    cdef Value item
    cdef uint8_t c
    cdef int rc
    if depth > MAX_DEPTH:
        fail(sc, R_TOO_DEEP, 5, -1, sc.i)
        return -1
    v.start = sc.i
    v.kind = K_OBJECT if is_object else K_ARRAY
    sc.i += 1
    skip_ws(sc)
    if sc.i < sc.n and sc.s[sc.i] == close:
        sc.i += 1
        v.end = sc.i
        return 0
    while True:
        skip_ws(sc)
        if is_object:
            if sc.i >= sc.n or sc.s[sc.i] != 34:
                return syntax(sc, sc.i)
            if scan_string(sc, &item) < 0:
                return -1
            rc = push_key(sc, &item)
            if rc < 0:
                return rc
            skip_ws(sc)
            if sc.i >= sc.n or sc.s[sc.i] != 58:
                return syntax(sc, sc.i)
            sc.i += 1
        rc = scan_value(sc, depth, &item)
        if rc < 0:
            return rc
        skip_ws(sc)
        if sc.i >= sc.n:
            return syntax(sc, sc.n)
        c = sc.s[sc.i]
        sc.i += 1
        if c == close:
            break
        if c != 44:
            return syntax(sc, sc.i - 1)
    if is_object:
        resolve_arena_keys(sc, base)
        find_repeated_keys(sc, base)
        sc.keys.len = base * sizeof(Key)
    v.end = sc.i
    return 0


cdef int scan_value(Scan* sc, int depth, Value* v) noexcept nogil:
    cdef uint8_t c
    skip_ws(sc)
    if sc.i >= sc.n:
        return syntax(sc, sc.i)
    c = sc.s[sc.i]
    if c == 34:
        return scan_string(sc, v)
    if c == 45 or 48 <= c <= 57:
        return scan_number(sc, v)
    if c == 123 or c == 91:
        return scan_container(sc, depth + 1, v)
    return scan_literal(sc, v)


cdef inline int field_of(const uint8_t* k, Py_ssize_t n) noexcept nogil:
    """Index in FIELD_ORDER of a known key, or -1."""
    if n == 2:
        return F_TS if memcmp(k, b"ts", 2) == 0 else -1
    if n == 3:
        return 4 if memcmp(k, b"org", 3) == 0 else -1
    if n == 4:
        if memcmp(k, b"user", 4) == 0:
            return F_USER
        return 3 if memcmp(k, b"team", 4) == 0 else -1
    if n == 5:
        return F_MODEL if memcmp(k, b"model", 5) == 0 else -1
    if n == 6:
        return 7 if memcmp(k, b"client", 6) == 0 else -1
    if n == 8:
        if memcmp(k, b"event_id", 8) == 0:
            return F_EVENT_ID
        return 6 if memcmp(k, b"provider", 8) == 0 else -1
    if n == 10:
        return 8 if memcmp(k, b"request_id", 10) == 0 else -1
    if n == 11:
        return 9 if memcmp(k, b"prompt_hash", 11) == 0 else -1
    if n == 12:
        return F_INPUT if memcmp(k, b"input_tokens", 12) == 0 else -1
    if n == 13:
        return F_OUTPUT if memcmp(k, b"output_tokens", 13) == 0 else -1
    if n == 16:
        return F_REASONING if memcmp(k, b"reasoning_tokens", 16) == 0 else -1
    if n == 17:
        return 12 if memcmp(k, b"cache_read_tokens", 17) == 0 else -1
    if n == 18:
        return 13 if memcmp(k, b"cache_write_tokens", 18) == 0 else -1
    if n == 21:
        return 14 if memcmp(k, b"cache_write_1h_tokens", 21) == 0 else -1
    return -1


cdef inline int is_name(const uint8_t* p, Py_ssize_t left, const char* name, Py_ssize_t size) noexcept nogil:
    return left > size and memcmp(p, name, size) == 0 and p[size] == 34


cdef inline int known_key(const uint8_t* p, Py_ssize_t left, Py_ssize_t* size) noexcept nogil:
    """Fast path for an unescaped known key right after its opening quote: field index or -1."""
    cdef uint8_t c = p[0] if left > 0 else 0
    if c == 101 and is_name(p, left, b"event_id", 8):
        size[0] = 8
        return F_EVENT_ID
    if c == 116:
        if is_name(p, left, b"ts", 2):
            size[0] = 2
            return F_TS
        if is_name(p, left, b"team", 4):
            size[0] = 4
            return 3
    elif c == 117 and is_name(p, left, b"user", 4):
        size[0] = 4
        return F_USER
    elif c == 111:
        if is_name(p, left, b"org", 3):
            size[0] = 3
            return 4
        if is_name(p, left, b"output_tokens", 13):
            size[0] = 13
            return F_OUTPUT
    elif c == 109 and is_name(p, left, b"model", 5):
        size[0] = 5
        return F_MODEL
    elif c == 112:
        if is_name(p, left, b"provider", 8):
            size[0] = 8
            return 6
        if is_name(p, left, b"prompt_hash", 11):
            size[0] = 11
            return 9
    elif c == 99:
        if is_name(p, left, b"client", 6):
            size[0] = 6
            return 7
        if is_name(p, left, b"cache_read_tokens", 17):
            size[0] = 17
            return 12
        if is_name(p, left, b"cache_write_tokens", 18):
            size[0] = 18
            return 13
        if is_name(p, left, b"cache_write_1h_tokens", 21):
            size[0] = 21
            return 14
    elif c == 114:
        if is_name(p, left, b"request_id", 10):
            size[0] = 10
            return 8
        if is_name(p, left, b"reasoning_tokens", 16):
            size[0] = 16
            return F_REASONING
    elif c == 105 and is_name(p, left, b"input_tokens", 12):
        size[0] = 12
        return F_INPUT
    return -1


cdef int scan_event(Scan* sc) noexcept nogil:
    """The top-level value of a line: fields of the event object are remembered by index."""
    cdef Value key, item
    cdef Value* slot
    cdef Py_ssize_t base, at, size
    cdef int field, rc
    cdef uint8_t c
    skip_ws(sc)
    if sc.s[sc.i] != 123:
        rc = scan_value(sc, 0, &item)
        if rc < 0:
            return rc
        skip_ws(sc)
        if sc.i != sc.n and sc.s[sc.i] != 10:
            return syntax(sc, sc.i)
        fail(sc, R_NOT_OBJECT, 6, -1, item.kind)
        return -1
    base = sc.keys.len // sizeof(Key)
    sc.i += 1
    skip_ws(sc)
    if sc.i < sc.n and sc.s[sc.i] == 125:
        sc.i += 1
    else:
        while True:
            skip_ws(sc)
            if sc.i >= sc.n or sc.s[sc.i] != 34:
                return syntax(sc, sc.i)
            field = known_key(sc.s + sc.i + 1, sc.n - sc.i - 1, &size)
            if field >= 0:
                key.start = sc.i + 1
                sc.i += size + 2
            elif scan_string(sc, &key) < 0:
                return -1
            elif key.escaped:
                at = decode_string(sc.s, key.start, key.end, &sc.arena)
                if at < 0:
                    return -2
                field = field_of(<const uint8_t*>sc.arena.data + at, sc.arena.len - at)
                if field < 0:
                    rc = push_key(sc, &key)
                    if rc < 0:
                        return rc
            else:  # an unescaped known key always takes the fast path above
                rc = push_key(sc, &key)
                if rc < 0:
                    return rc
            if field >= 0 and sc.seen & (1u << field):
                if sc.dup_pos < 0 or key.start - 1 < sc.dup_pos:
                    sc.dup_pos = key.start - 1
                field = -1
            skip_ws(sc)
            if sc.i >= sc.n or sc.s[sc.i] != 58:
                return syntax(sc, sc.i)
            sc.i += 1
            if field >= 0:
                slot = &sc.fields[field]
                sc.seen |= 1u << field
            else:
                slot = &item
            c = sc.s[sc.i] if sc.i < sc.n else 0
            if c == 34:  # the common shapes first, without the generic dispatch
                rc = scan_string(sc, slot)
            elif 48 <= c <= 57:
                rc = scan_number(sc, slot)
            else:
                rc = scan_value(sc, 1, slot)
            if rc < 0:
                return rc
            skip_ws(sc)
            if sc.i >= sc.n:
                return syntax(sc, sc.n)
            c = sc.s[sc.i]
            sc.i += 1
            if c == 125:
                break
            if c != 44:
                return syntax(sc, sc.i - 1)
    skip_ws(sc)
    if sc.i != sc.n and sc.s[sc.i] != 10:
        return syntax(sc, sc.i)
    resolve_arena_keys(sc, base)
    find_repeated_keys(sc, base)
    sc.keys.len = base * sizeof(Key)
    if sc.dup_pos >= 0:
        fail(sc, R_DUPLICATE_FIELD, 7, -1, sc.dup_pos)
        return -1
    return 0


# ---------------------------------------------------------------- field rules

cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline bint digits(const uint8_t* p, int n) noexcept nogil:
    cdef int k
    for k in range(n):
        if not (48 <= p[k] <= 57):
            return False
    return True


cdef inline int num(const uint8_t* p, int n) noexcept nogil:
    cdef int v = 0, k
    for k in range(n):
        v = v * 10 + (p[k] - 48)
    return v


cdef int rfc3339_ms(const uint8_t* p, Py_ssize_t n, int64_t* out, int* templ) noexcept nogil:
    """YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|+hh:mm|-hh:mm) to UTC epoch ms, fraction truncated."""
    cdef Py_ssize_t i = 19
    cdef int frac_digits = 0, millis = 0
    cdef int year, month, day, hour, minute, second, off_h = 0, off_m = 0, sign = 0, mdays
    templ[0] = 15
    if n < 20 or not (digits(p, 4) and p[4] == 45 and digits(p + 5, 2) and p[7] == 45
                      and digits(p + 8, 2) and p[10] == 84 and digits(p + 11, 2) and p[13] == 58
                      and digits(p + 14, 2) and p[16] == 58 and digits(p + 17, 2)):
        return -1
    if p[i] == 46:
        i += 1
        while i < n and 48 <= p[i] <= 57 and frac_digits < 10:
            if frac_digits < 3:
                millis = millis * 10 + (p[i] - 48)
            frac_digits += 1
            i += 1
        if frac_digits == 0 or frac_digits > 9:
            return -1
        while frac_digits < 3:
            millis *= 10
            frac_digits += 1
    if i < n and p[i] == 90:
        if i + 1 != n:
            return -1
    elif i < n and (p[i] == 43 or p[i] == 45):
        if i + 6 != n or not (digits(p + i + 1, 2) and p[i + 3] == 58 and digits(p + i + 4, 2)):
            return -1
        sign = 1 if p[i] == 43 else -1
        off_h = num(p + i + 1, 2)
        off_m = num(p + i + 4, 2)
    else:
        return -1
    year = num(p, 4)
    month = num(p + 5, 2)
    day = num(p + 8, 2)
    hour = num(p + 11, 2)
    minute = num(p + 14, 2)
    second = num(p + 17, 2)
    templ[0] = 16
    if month < 1 or month > 12 or year < 1:
        return -1
    if month == 2:
        mdays = 29 if (year % 4 == 0 and year % 100 != 0) or year % 400 == 0 else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        mdays = 30
    else:
        mdays = 31
    if day < 1 or day > mdays or hour > 23 or minute > 59 or second > 59 or off_h > 23 or off_m > 59:
        return -1
    out[0] = ((days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
               - sign * (off_h * 3600 + off_m * 60)) * 1000 + millis)
    return 0


cdef int check_string(Scan* sc, int field, Buf* column, const uint8_t** text, Py_ssize_t* size) noexcept nogil:
    """Length, control-character and event_id charset rules on the decoded value.

    An escaped value is decoded straight past the end of its column's buffer, where the row
    commit finds it in place; `text` then points there, otherwise into the message.
    """
    cdef Value* v = &sc.fields[field]
    cdef const uint8_t* p
    cdef Py_ssize_t n, k
    if v.kind != K_STRING:
        fail(sc, R_WRONG_TYPE, 10, field, v.kind)
        return -1
    if v.escaped:
        if buf_reserve(column, v.end - v.start) < 0:
            return -2
        p = <const uint8_t*>column.data + column.len
        n = decode_into(sc.s, v.start, v.end, <uint8_t*>p)
    else:
        p = sc.s + v.start
        n = v.end - v.start
    if n < 1 or n > STRING_MAX[field]:
        fail(sc, R_INVALID_VALUE, 12, field, n)
        return -1
    if field == F_EVENT_ID:
        for k in range(n):
            if not EVENT_ID_OK[p[k]]:
                fail(sc, R_INVALID_VALUE, 14, field, 0)
                return -1
    elif not v.plain:
        for k in range(n):
            if p[k] < 0x20 or p[k] == 0x7F or (p[k] == 0xC2 and k + 1 < n and p[k + 1] <= 0x9F):
                fail(sc, R_INVALID_VALUE, 13, field, 0)
                return -1
    text[0] = p
    size[0] = n
    return 0


cdef int check_tokens(Scan* sc, int field, int64_t* out) noexcept nogil:
    cdef Value* v = &sc.fields[field]
    if v.kind != K_INTEGER:
        fail(sc, R_WRONG_TYPE, 10, field, v.kind)
        return -1
    if v.big or v.magnitude > TOKEN_MAX or (v.negative and v.magnitude != 0):
        fail(sc, R_OUT_OF_RANGE, 11, field, 0)
        return -1
    out[0] = <int64_t>v.magnitude
    return 0


cdef int check_ts(Scan* sc, int64_t* out) noexcept nogil:
    cdef Value* v = &sc.fields[F_TS]
    cdef const uint8_t* p
    cdef Py_ssize_t n, at
    cdef int templ = 15
    if v.kind == K_STRING:
        if v.escaped:
            at = decode_string(sc.s, v.start, v.end, &sc.arena)
            if at < 0:
                return -2
            p = <const uint8_t*>sc.arena.data + at
            n = sc.arena.len - at
        else:
            p = sc.s + v.start
            n = v.end - v.start
        if rfc3339_ms(p, n, out, &templ) < 0:
            fail(sc, R_INVALID_TIMESTAMP, templ, F_TS, 0)
            return -1
        return 0
    if v.kind == K_INTEGER:
        # magnitude saturates at 2**63 - 1, so -2**63 itself reads as big: reject it too
        # only if the reference does (it accepts int64 min); handle it exactly here.
        if v.big:
            if v.negative and v.end - v.start == 20 and memcmp(sc.s + v.start, b"-9223372036854775808", 20) == 0:
                out[0] = <int64_t>(-0x7FFFFFFFFFFFFFFF - 1)
                return 0
            fail(sc, R_INVALID_TIMESTAMP, 17, F_TS, 0)
            return -1
        out[0] = -<int64_t>v.magnitude if v.negative else <int64_t>v.magnitude
        return 0
    fail(sc, R_WRONG_TYPE, 10, F_TS, v.kind)
    return -1


# ---------------------------------------------------------------- columns

cdef struct Columns:
    Buf data[N_STRINGS]      # string bytes (index 1, ts, unused)
    Buf offsets[N_STRINGS]   # int32 offsets, row_cap + 1 of them
    Buf valid[N_STRINGS]     # validity bitmaps of optional strings, zeroed as they grow
    Buf ints[N_FIELDS]       # ts and the token counts as int64
    Buf origin               # int32 message index per row
    Buf line                 # int32 line within its message per row
    Py_ssize_t rows
    Py_ssize_t row_cap       # rows every per-row buffer has room for
    Py_ssize_t nulls[N_STRINGS]


cdef inline bint optional_string(int field) noexcept nogil:
    return field < N_STRINGS and field != F_TS and not (REQUIRED & (1u << field))


cdef int resize(Buf* b, Py_ssize_t size) noexcept nogil:
    cdef char* data
    if size <= b.cap:
        return 0
    data = <char*>realloc(b.data, size)
    if data == NULL:
        return -2
    b.data = data
    b.cap = size
    return 0


cdef int grow_rows(Columns* col, Py_ssize_t rows) noexcept nogil:
    """Make room for `rows` rows in every per-row buffer (offsets, validity, ints, origins)."""
    cdef Py_ssize_t cap = col.row_cap * 2 if col.row_cap else 1024
    cdef Py_ssize_t old_bits = (col.row_cap + 7) // 8
    cdef int field
    while cap < rows:
        cap *= 2
    for field in range(N_FIELDS):
        if field < N_STRINGS and field != F_TS:
            if resize(&col.offsets[field], (cap + 1) * 4) < 0:
                return -2
            if optional_string(field):
                if resize(&col.valid[field], (cap + 7) // 8) < 0:
                    return -2
                memset(col.valid[field].data + old_bits, 0, (cap + 7) // 8 - old_bits)
        else:
            if resize(&col.ints[field], cap * 8) < 0:
                return -2
    if resize(&col.origin, cap * 4) < 0 or resize(&col.line, cap * 4) < 0:
        return -2
    col.row_cap = cap
    return 0


cdef void finish_columns(Columns* col) noexcept nogil:
    """Set each buffer's length from the row count before pyarrow takes it."""
    cdef int field
    for field in range(N_FIELDS):
        if field < N_STRINGS and field != F_TS:
            col.offsets[field].len = (col.rows + 1) * 4
            col.valid[field].len = (col.rows + 7) // 8 if optional_string(field) else 0
        else:
            col.ints[field].len = col.rows * 8
    col.origin.len = col.rows * 4
    col.line.len = col.rows * 4


cdef inline void copy_bytes(char* dst, const uint8_t* src, Py_ssize_t n) noexcept nogil:
    """Short copies in words: most values of an event are a few dozen bytes."""
    cdef uint64_t word
    while n >= 8:
        memcpy(&word, src, 8)
        memcpy(dst, &word, 8)
        dst += 8
        src += 8
        n -= 8
    while n > 0:
        dst[0] = src[0]
        dst += 1
        src += 1
        n -= 1


cdef int append_row(Scan* sc, Columns* col, int32_t message, int32_t line, int64_t now_ms,
                    int64_t lateness_ms) noexcept nogil:
    """Apply the field rules in FIELD_ORDER and, if all pass, append the row to the columns."""
    cdef const uint8_t* text[N_STRINGS]
    cdef Py_ssize_t size[N_STRINGS]
    cdef int64_t ints[N_FIELDS]
    cdef int field, rc
    cdef Value* v
    cdef Buf* b
    cdef Py_ssize_t row = col.rows
    for field in range(N_FIELDS):
        v = &sc.fields[field]
        if not (sc.seen & (1u << field)) or v.kind == K_NULL:
            if REQUIRED & (1u << field):
                fail(sc, R_MISSING_FIELD, 9 if sc.seen & (1u << field) else 8, field, 0)
                return -1
            if field < N_STRINGS:
                text[field] = NULL
            ints[field] = 0
            continue
        if field == F_TS:
            rc = check_ts(sc, &ints[F_TS])
        elif field < N_STRINGS:
            rc = check_string(sc, field, &col.data[field], &text[field], &size[field])
        else:
            rc = check_tokens(sc, field, &ints[field])
        if rc < 0:
            return rc
    if ints[F_REASONING] > ints[F_OUTPUT]:
        fail(sc, R_OUT_OF_RANGE, 20, F_REASONING, 0)
        return -1
    if ints[F_TS] > now_ms + MAX_FUTURE_MS:
        fail(sc, R_TIMESTAMP_OUT_OF_RANGE, 18, F_TS, ints[F_TS])
        return -1
    if ints[F_TS] < now_ms - lateness_ms:
        fail(sc, R_TIMESTAMP_OUT_OF_RANGE, 19, F_TS, ints[F_TS])
        return -1
    if row + 1 > col.row_cap and grow_rows(col, row + 1) < 0:
        return -2
    for field in range(N_STRINGS):
        if field == F_TS:
            continue
        b = &col.data[field]
        if text[field] != NULL:
            if b.len + size[field] > 0x7FFFFFFF:
                return -3
            if not sc.fields[field].escaped:  # an escaped value was decoded in place
                if b.len + size[field] > b.cap and buf_reserve(b, size[field]) < 0:
                    return -2
                copy_bytes(b.data + b.len, text[field], size[field])
            b.len += size[field]
            if optional_string(field):
                col.valid[field].data[row >> 3] |= <char>(1 << (row & 7))
        else:
            col.nulls[field] += 1
        (<int32_t*>col.offsets[field].data)[row + 1] = <int32_t>b.len
    (<int64_t*>col.ints[F_TS].data)[row] = ints[F_TS]
    for field in range(N_STRINGS, N_FIELDS):
        (<int64_t*>col.ints[field].data)[row] = ints[field]
    (<int32_t*>col.origin.data)[row] = message
    (<int32_t*>col.line.data)[row] = line
    col.rows = row + 1
    return 0


cdef int record_reject(Buf* out, Scan* sc, int32_t message, int32_t line, Py_ssize_t line_start) noexcept nogil:
    cdef RejectRec r
    r.message = message
    r.line = line
    r.reason = sc.fail.reason
    r.templ = sc.fail.templ
    r.field = sc.fail.field
    r.arg = sc.fail.arg
    r.line_start = line_start
    r.key_pos = sc.fail.arg if sc.fail.reason == R_DUPLICATE_FIELD else -1
    return -2 if buf_append(out, &r, sizeof(RejectRec)) < 0 else 0


cdef inline int scan_line(Scan* sc) noexcept nogil:
    sc.i = 0
    sc.seen = 0
    sc.dup_pos = -1
    sc.keys.len = 0
    sc.arena.len = 0
    return scan_event(sc)


cdef int rescan_exact_line(Scan* sc, const uint8_t* msg, Py_ssize_t start, Py_ssize_t size) noexcept nogil:
    """The reference's verdict on a failed line, taken on its exact bytes: UTF-8 first, then syntax.

    The fast path scans up to the first newline and validates UTF-8 only inside non-ASCII
    strings; a line that fails there is rare, so it is cut exactly and checked in contract order.
    """
    cdef const uint8_t* nl = <const uint8_t*>memchr(msg + start, 10, size - start)
    cdef Py_ssize_t stop = (nl - msg) if nl != NULL else size
    cdef Py_ssize_t bad
    if stop > start and msg[stop - 1] == 13:
        stop -= 1
    sc.s = msg + start
    sc.n = stop - start
    bad = utf8_error(sc.s, sc.n)
    if bad >= 0:
        fail(sc, R_INVALID_UTF8, 2, -1, bad)
        return -1
    return scan_line(sc)


cdef int parse_message(const uint8_t* msg, Py_ssize_t size, int32_t message, Scan* sc, Columns* col,
                       Buf* rejects, int64_t now_ms, int64_t lateness_ms) noexcept nogil:
    """Every line of one message becomes a row or a reject; a message yielding neither is rejected."""
    cdef Py_ssize_t start = 0, end
    cdef const uint8_t* nl
    cdef int32_t line = 0
    cdef Py_ssize_t before = col.rows + rejects.len // sizeof(RejectRec)
    cdef int rc
    if size > MAX_MESSAGE:
        fail(sc, R_TOO_LARGE, 1, -1, size)
        return record_reject(rejects, sc, message, 0, 0)
    while True:
        sc.s = msg + start
        sc.n = size - start
        sc.i = 0
        skip_ws(sc)
        if sc.i < sc.n and sc.s[sc.i] != 10:
            rc = scan_line(sc)
            if rc == 0:
                end = start + sc.i
                rc = append_row(sc, col, message, line, now_ms, lateness_ms)
            elif rc == -1:
                nl = <const uint8_t*>memchr(msg + start, 10, size - start)
                end = (nl - msg) if nl != NULL else size
                rc = rescan_exact_line(sc, msg, start, size)
                if rc == 0:
                    rc = append_row(sc, col, message, line, now_ms, lateness_ms)
            if rc == -1:
                if record_reject(rejects, sc, message, line, start) < 0:
                    return -2
            elif rc < 0:
                return rc
        else:
            end = start + sc.i
        if end >= size:
            break
        start = end + 1
        line += 1
    if col.rows + rejects.len // sizeof(RejectRec) == before:
        fail(sc, R_INVALID_JSON, 0, -1, 0)
        return record_reject(rejects, sc, message, 0, 0)
    return 0


# ---------------------------------------------------------------- Python surface

class ParseResult:
    """Accepted rows as an Arrow batch, rejects, and where each row came from (message, line)."""

    __slots__ = ("batch", "line_index", "message_index", "rejects")

    def __init__(self, batch, rejects, message_index, line_index):
        self.batch = batch
        self.rejects = rejects
        self.message_index = message_index
        self.line_index = line_index


def _key_name(bytes message, Py_ssize_t at):
    """The decoded key whose opening quote is at `at` (only called for valid JSON)."""
    cdef Py_ssize_t end = at + 1
    while message[end] != 34:
        end += 2 if message[end] == 92 else 1
    return json.loads(message[at:end + 1])


cdef void free_columns(Columns* col) noexcept:
    cdef int k
    for k in range(N_STRINGS):
        free(col.data[k].data)
        free(col.offsets[k].data)
        free(col.valid[k].data)
    for k in range(N_FIELDS):
        free(col.ints[k].data)
    free(col.origin.data)
    free(col.line.data)


def parse_batch(payloads, now_ms=None, lateness_ms=DEFAULT_LATENESS_MS):
    """Parse and validate Kafka message payloads (one or more NDJSON events each)."""
    cdef list messages = payloads if type(payloads) is list else list(payloads)
    cdef Py_ssize_t count = len(messages)
    cdef const uint8_t** ptrs = <const uint8_t**>malloc((count + 1) * sizeof(void*))
    cdef Py_ssize_t* sizes = <Py_ssize_t*>malloc((count + 1) * sizeof(Py_ssize_t))
    cdef Columns col
    cdef Scan sc
    cdef Buf rejects
    cdef RejectRec* recs
    cdef Py_ssize_t k
    cdef int rc = 0
    cdef int64_t now = time.time_ns() // 1000000 if now_ms is None else now_ms
    cdef int64_t lateness = lateness_ms
    cdef Py_ssize_t total
    if ptrs == NULL or sizes == NULL:
        free(ptrs)
        free(sizes)
        raise MemoryError()
    if count > 0x7FFFFFFF:
        raise ValueError("too many messages in one batch")
    memset(&col, 0, sizeof(Columns))
    memset(&sc, 0, sizeof(Scan))
    memset(&rejects, 0, sizeof(Buf))
    for k in range(count):
        item = messages[k]
        if not PyBytes_Check(item):
            if messages is payloads:
                messages = list(payloads)
            item = messages[k] = b"" if item is None else bytes(item)
        ptrs[k] = <const uint8_t*>PyBytes_AS_STRING(item)
        sizes[k] = PyBytes_GET_SIZE(item)
    try:
        total = 0
        for k in range(count):
            total += sizes[k]
        # Room for one event per message up front; string bytes by a generous share of the
        # input (virtual until touched), so growing rarely copies.
        if grow_rows(&col, count) < 0:
            raise MemoryError()
        for k in range(N_STRINGS):
            if k != F_TS:
                (<int32_t*>col.offsets[k].data)[0] = 0
                if buf_reserve(&col.data[k], total // 8 + 64) < 0:
                    raise MemoryError()
        with nogil:
            for k in range(count):
                rc = parse_message(ptrs[k], sizes[k], <int32_t>k, &sc, &col, &rejects, now, lateness)
                if rc < 0:
                    break
        if rc == -2:
            raise MemoryError()
        if rc == -3:
            raise ValueError("a string column of one batch exceeds 2 GiB; parse fewer messages at once")
        finish_columns(&col)
        batch = _batch(&col)
        origin = pa.Array.from_buffers(pa.int32(), col.rows, [None, _take(&col.origin)])
        lines = pa.Array.from_buffers(pa.int32(), col.rows, [None, _take(&col.line)])
        out = []
        recs = <RejectRec*>rejects.data
        for k in range(rejects.len // sizeof(RejectRec)):
            key = ""
            if recs[k].key_pos >= 0:
                key = _key_name(messages[recs[k].message], recs[k].line_start + recs[k].key_pos)
            field = FIELD_ORDER[recs[k].field] if recs[k].field >= 0 else ""
            out.append(Reject(recs[k].message, recs[k].line, PARSER_REASONS[recs[k].reason],
                              format_detail(recs[k].templ, field, recs[k].arg, key)))
        return ParseResult(batch, out, origin, lines)
    finally:
        free(ptrs)
        free(sizes)
        free(sc.keys.data)
        free(sc.arena.data)
        free(rejects.data)
        free_columns(&col)


cdef object _batch(Columns* col):
    cdef Py_ssize_t rows = col.rows
    cdef int field
    arrays = []
    for field in range(N_FIELDS):
        name = FIELD_ORDER[field]
        kind = EVENTS.field(name).type
        if field == F_TS or field >= N_STRINGS:
            arrays.append(pa.Array.from_buffers(kind, rows, [None, _take(&col.ints[field])]))
        else:
            valid = _take(&col.valid[field]) if col.nulls[field] else None
            arrays.append(pa.Array.from_buffers(
                kind, rows, [valid, _take(&col.offsets[field]), _take(&col.data[field])],
                null_count=col.nulls[field]))
    return pa.RecordBatch.from_arrays(arrays, schema=EVENTS)
