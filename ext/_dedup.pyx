# cython: language_level=3
"""A set of event ids for dedup: 128-bit hashes in open addressing, 16 bytes a slot.

Ids are hashed straight from an Arrow string column's buffers (no Python object per
event). Two independent 64-bit hashes make a false "duplicate" (a collision dropping a
real event) vanishingly unlikely: about n^2 / 2^129 for n ids held.
"""

from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

import pyarrow as pa

DEF EMPTY_HI = 0
DEF BLOCK = 16  # ids hashed and their slots prefetched ahead of the probes

cdef extern from *:
    void prefetch "__builtin_prefetch" (const void* address) noexcept nogil


cdef inline uint64_t mix64(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h


cdef inline void hash128(const uint8_t* p, Py_ssize_t n, uint64_t* hi, uint64_t* lo) noexcept nogil:
    cdef uint64_t a = 0x9E3779B97F4A7C15ULL ^ <uint64_t>n
    cdef uint64_t b = 0xC2B2AE3D27D4EB4FULL + <uint64_t>n
    cdef uint64_t w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        a = mix64(a ^ w) * 0x9E3779B97F4A7C15ULL
        b = mix64(b + w * 0xD6E8FEB86659FD93ULL)
        i += 8
    w = 0
    if i < n:
        memcpy(&w, p + i, n - i)
        a = mix64(a ^ w) * 0x9E3779B97F4A7C15ULL
        b = mix64(b + w * 0xD6E8FEB86659FD93ULL)
    hi[0] = mix64(a) | 1  # never 0: 0 marks an empty slot
    lo[0] = mix64(b ^ a)


cdef class IdSet:
    """Event-id hashes; grows at half load. `mark` and `add` take an Arrow string array."""

    cdef uint64_t* slots  # pairs (hi, lo)
    cdef Py_ssize_t capacity
    cdef Py_ssize_t count

    def __cinit__(self, Py_ssize_t capacity=1024):
        cdef Py_ssize_t cap = 1024
        while cap < capacity * 2:
            cap *= 2
        self.slots = <uint64_t*>calloc(cap * 2, sizeof(uint64_t))
        if self.slots == NULL:
            raise MemoryError()
        self.capacity = cap
        self.count = 0

    def __dealloc__(self):
        free(self.slots)

    def __len__(self):
        return self.count

    @property
    def nbytes(self):
        return self.capacity * 16

    cdef bint _find(self, uint64_t hi, uint64_t lo, bint insert) noexcept nogil:
        """True if present; otherwise inserts when `insert` (room is ensured by the caller)."""
        cdef Py_ssize_t mask = self.capacity - 1
        cdef Py_ssize_t i = <Py_ssize_t>(lo & mask)
        while self.slots[2 * i] != EMPTY_HI:
            if self.slots[2 * i] == hi and self.slots[2 * i + 1] == lo:
                return True
            i = (i + 1) & mask
        if insert:
            self.slots[2 * i] = hi
            self.slots[2 * i + 1] = lo
            self.count += 1
        return False

    cdef int _grow(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.count + extra
        cdef uint64_t* old = self.slots
        cdef Py_ssize_t old_cap = self.capacity, k, cap = self.capacity
        if need * 2 <= cap:
            return 0
        while need * 2 > cap:
            cap *= 2
        self.slots = <uint64_t*>calloc(cap * 2, sizeof(uint64_t))
        if self.slots == NULL:
            self.slots = old
            raise MemoryError()
        self.capacity = cap
        self.count = 0
        for k in range(old_cap):
            if old[2 * k] != EMPTY_HI:
                self._find(old[2 * k], old[2 * k + 1], True)
        free(old)
        return 0

    def _scan(self, ids, bytearray marks, bint insert):
        if not isinstance(ids, pa.StringArray):
            raise TypeError("expected a pyarrow string array")
        if ids.null_count:
            raise ValueError("event ids must not be null")
        cdef Py_ssize_t n = len(ids)
        if len(marks) != n:
            raise ValueError("marks must have one byte per id")
        if insert:
            self._grow(n)
        buffers = ids.buffers()
        cdef const int32_t[:] offsets = memoryview(buffers[1]).cast("i")
        cdef const uint8_t[:] data = memoryview(buffers[2]).cast("B") if buffers[2] is not None else b""
        cdef uint8_t[:] out = marks
        cdef Py_ssize_t k, j, end, base = ids.offset
        cdef uint64_t his[BLOCK]
        cdef uint64_t los[BLOCK]
        cdef const uint8_t* start = &data[0] if data.shape[0] else NULL
        cdef Py_ssize_t mask = self.capacity - 1  # fixed for the scan: room was made above
        with nogil:
            # A table of millions of ids misses the cache on every probe: hash a block of ids
            # and prefetch their slots first, so the misses overlap instead of queueing.
            for k in range(0, n, BLOCK):
                end = min(k + BLOCK, n)
                for j in range(k, end):
                    hash128(start + offsets[base + j], offsets[base + j + 1] - offsets[base + j],
                            &his[j - k], &los[j - k])
                    prefetch(&self.slots[2 * <Py_ssize_t>(los[j - k] & mask)])
                for j in range(k, end):
                    if not out[j] and self._find(his[j - k], los[j - k], insert):
                        out[j] = 1

    def mark(self, ids, bytearray marks):
        """Set marks[k] = 1 where ids[k] is in the set."""
        self._scan(ids, marks, False)

    def add(self, ids, bytearray marks):
        """Insert every id whose mark is 0; an id already present (also earlier in the same
        array) gets marks[k] = 1 instead."""
        self._scan(ids, marks, True)
