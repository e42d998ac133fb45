# Declarations for ingestd._copy: rows -> PostgreSQL binary COPY stream (see _copy.pyx).

cimport cython
from libc.stdint cimport int64_t


# Column type codes (one per canonical ingestd column type that has a binary encoder here).
cdef enum ColType:
    T_FLOAT8 = 1
    T_FLOAT4 = 2
    T_INT8 = 3
    T_INT4 = 4
    T_INT2 = 5
    T_TEXT = 6
    T_BOOL = 7
    T_TIMESTAMPTZ = 8
    T_JSONB = 9
    T_BYTEA = 10


# A growable byte buffer owned by one encode() call. Big-endian writers, as the
# COPY binary format (and PostgreSQL's send/recv functions) use network order.
cdef struct _Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap


@cython.final
@cython.auto_pickle(False)
cdef class CopyEncoder:
    cdef readonly tuple types        # canonical type names, in column order
    cdef unsigned char* _codes       # ColType per column
    cdef Py_ssize_t _ncols

    cdef int _encode_row(self, _Buf* b, object row) except -1
    cdef int _encode_value(self, _Buf* b, unsigned char code, object v) except -1


# fromunits_utc (the exact datetime of an integer count of ms/us/ns) for a divisor
# known to be 1000, 10**6 or 10**9.
cdef object from_units(object t, int64_t d)
