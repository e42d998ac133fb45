"""The compiled part of the ingest row path.

:class:`CopyEncoder`: rows -> one PostgreSQL binary ``COPY ... FROM STDIN
(FORMAT binary)`` stream. :func:`fromtimestamp_utc`: the route converters'
``datetime.fromtimestamp(t, UTC)``, computed without the C library's gmtime
and the ``tzinfo.fromutc`` call (about 5x cheaper; same results).

Why this exists: handing tuples to asyncpg's ``copy_records_to_table`` costs
about 2 us of client CPU per 7-column row (a codec lookup and a generic
``encode`` call per value), which was the largest single item in a profile of
the ingest path. :class:`CopyEncoder` knows each column's type up front, so a
row is one ``switch`` per value writing straight into one buffer; the result
goes to ``copy_to_table(source=<bytes>, format="binary")`` as one CopyData
message.

Contract: for every value the ingest converters produce, the bytes are the
ones asyncpg's binary codecs write for the same value, and a value asyncpg
would refuse is refused with the same exception class (``TypeError``,
``ValueError`` or ``OverflowError``), so the writer's dead-letter bisection
treats both paths alike. ``tests/test_copy_encoder.py`` checks this against
asyncpg's own encoders (through PostgreSQL) and against hand-built bytes.

Format (PostgreSQL docs, "COPY", binary format): an 11-byte signature, a
32-bit flags field (0), a 32-bit header-extension length (0); per row a 16-bit
field count, then per field a 32-bit length (-1 for NULL) and the value in the
type's binary send format; a 16-bit -1 trailer. All integers big-endian.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.datetime cimport (
    PyDateTime_Check,
    datetime_new,
    PyDateTime_DATE_GET_HOUR,
    PyDateTime_DATE_GET_MICROSECOND,
    PyDateTime_DATE_GET_MINUTE,
    PyDateTime_DATE_GET_SECOND,
    PyDateTime_GET_DAY,
    PyDateTime_GET_MONTH,
    PyDateTime_GET_YEAR,
    datetime_tzinfo,
    import_datetime,
)
from cpython.float cimport PyFloat_AsDouble
from cpython.long cimport PyLong_AsLongLong, PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_Check
from libc.math cimport fabs, isfinite, isinf, modf, round
from libc.stdint cimport int16_t, int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

cimport cython

import datetime as _dt

import_datetime()


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1


cdef object _UTC = _dt.timezone.utc
# asyncpg maps these two naive datetimes to 'infinity' / '-infinity'.
cdef object _INFINITY = _dt.datetime(_dt.MAXYEAR, 12, 31, 23, 59, 59, 999999)
cdef object _NEG_INFINITY = _dt.datetime(_dt.MINYEAR, 1, 1, 0, 0, 0, 0)
cdef int64_t _PG_TS_INFINITY = 0x7FFFFFFFFFFFFFFF
cdef int64_t _PG_TS_NEG_INFINITY = <int64_t>0x8000000000000000

cdef const char* _SIGNATURE = b"PGCOPY\n\xff\r\n\x00"

# Canonical ingestd type name (ingestd.ingest.routes.SQL_TYPE keys) -> code.
TYPE_CODES = {
    "double precision": T_FLOAT8,
    "real": T_FLOAT4,
    "bigint": T_INT8,
    "integer": T_INT4,
    "smallint": T_INT2,
    "text": T_TEXT,
    "boolean": T_BOOL,
    "timestamptz": T_TIMESTAMPTZ,
    "jsonb": T_JSONB,
    "bytea": T_BYTEA,
}


def supports(types):
    """True when every type name in ``types`` has a binary encoder here (``numeric`` has not)."""
    for t in types:
        if t not in TYPE_CODES:
            return False
    return True


# ---------------------------------------------------------------- buffer

cdef int _reserve(_Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.len + extra
    cdef Py_ssize_t cap
    cdef char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < need:
        cap *= 2
    p = <char*>PyMem_Realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline void _put16(_Buf* b, int16_t v) noexcept:
    cdef unsigned char* p = <unsigned char*>(b.data + b.len)
    cdef uint32_t u = <uint32_t><unsigned short>v
    p[0] = (u >> 8) & 0xFF
    p[1] = u & 0xFF
    b.len += 2


cdef inline void _put32(_Buf* b, int32_t v) noexcept:
    cdef unsigned char* p = <unsigned char*>(b.data + b.len)
    cdef uint32_t u = <uint32_t>v
    p[0] = (u >> 24) & 0xFF
    p[1] = (u >> 16) & 0xFF
    p[2] = (u >> 8) & 0xFF
    p[3] = u & 0xFF
    b.len += 4


cdef inline void _put64(_Buf* b, int64_t v) noexcept:
    cdef unsigned char* p = <unsigned char*>(b.data + b.len)
    cdef uint64_t u = <uint64_t>v
    cdef int i
    for i in range(8):
        p[i] = (u >> (56 - 8 * i)) & 0xFF
    b.len += 8


cdef inline int _put_bytes(_Buf* b, const char* s, Py_ssize_t n, bint jsonb) except -1:
    if n > 0x7FFFFFFF - 1:
        raise ValueError("string too long")
    _reserve(b, 5 + n)
    _put32(b, <int32_t>(n + 1 if jsonb else n))
    if jsonb:
        b.data[b.len] = 1  # jsonb binary format version
        b.len += 1
    memcpy(b.data + b.len, s, n)
    b.len += n
    return 0


# ---------------------------------------------------------------- values

cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline void _civil_from_days(int64_t z, int* y, int* m, int* d) noexcept:
    """The proleptic Gregorian date of day ``z`` since 1970-01-01 (H. Hinnant's algorithm)."""
    cdef int64_t era, doe, yoe, doy, mp, yy
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    yy = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d[0] = <int>(doy - (153 * mp + 2) // 5 + 1)
    m[0] = <int>(mp + 3 if mp < 10 else mp - 9)
    y[0] = <int>(yy + 1 if m[0] <= 2 else yy)


# Seconds since 1970 of 0001-01-01T00:00:00 and 9999-12-31T23:59:59 (datetime's range).
cdef int64_t _MIN_UNIX = -62135596800
cdef int64_t _MAX_UNIX = 253402300799
cdef object _py_fromtimestamp = _dt.datetime.fromtimestamp


cdef inline double _round_half_even(double x) noexcept:
    # CPython's _PyTime_RoundHalfEven.
    cdef double r = round(x)
    if fabs(x - r) == 0.5:
        r = 2.0 * round(x / 2.0)
    return r


def fromtimestamp_utc(t, tz=_UTC):
    """``datetime.datetime.fromtimestamp(t, tz)``, the same value and the same errors.

    For ``tz`` UTC and an ``int`` or ``float`` within datetime's range it is
    computed here: seconds and microseconds split and rounded half-even exactly
    as CPython's ``_PyTime_ObjectToTimeval`` does, the date from the day number.
    Anything else (another tz, another type, NaN, out of range) is handed to
    ``datetime.fromtimestamp`` itself, which then raises what it raises.
    """
    cdef double x, intpart, frac
    cdef int64_t secs
    cdef int us = 0
    if tz is not _UTC:
        return _py_fromtimestamp(t, tz)
    if type(t) is float:
        x = t
        if not isfinite(x):
            return _py_fromtimestamp(t, tz)
        frac = modf(x, &intpart)
        frac = _round_half_even(frac * 1e6)
        if frac >= 1e6:
            frac -= 1e6
            intpart += 1.0
        elif frac < 0:
            frac += 1e6
            intpart -= 1.0
        if not (_MIN_UNIX <= intpart <= _MAX_UNIX):
            return _py_fromtimestamp(t, tz)
        secs = <int64_t>intpart
        us = <int>frac
    elif type(t) is int:
        if not (_MIN_UNIX <= t <= _MAX_UNIX):
            return _py_fromtimestamp(t, tz)
        secs = t
    else:
        return _py_fromtimestamp(t, tz)
    return _from_secs_us(secs, us)


def fromunits_utc(t, div):
    """The UTC datetime of ``t`` counted in units of 1/``div`` s (``div`` 1000, 10**6 or
    10**9: ms, us, ns), exact for an ``int``: the microseconds rounded half-even from
    the integer, without the float division ``fromtimestamp_utc(t / div)`` would need
    (a nanosecond count of today is past a double's precision: that division could
    be 1 us off, and it was a measurable share of the ingest path's CPU).

    A ``float``, an ``int`` out of datetime's range (or of 64 bits) or another ``div``:
    ``fromtimestamp_utc(t / div)``, the same value and the same errors as before.
    """
    if type(div) is not int or not (div == 1000 or div == 1000000 or div == 1000000000):
        return fromtimestamp_utc(t / div, _UTC)
    return from_units(t, <int64_t>div)


cdef object from_units(object t, int64_t d):
    """fromunits_utc for a ``d`` of 1000, 10**6 or 10**9 (see there)."""
    cdef int64_t v, secs, rem, us, r
    cdef int overflow = 0
    if type(t) is not int or not (d == 1000 or d == 1000000 or d == 1000000000):
        return fromtimestamp_utc(t / d, _UTC)
    v = PyLong_AsLongLongAndOverflow(t, &overflow)
    if overflow:
        return fromtimestamp_utc(t / d, _UTC)
    secs = v // d  # built with cdivision: truncated toward zero, corrected below
    rem = v - secs * d
    if rem < 0:
        rem += d
        secs -= 1
    if d == 1000000:
        us = rem
    elif d == 1000:
        us = rem * 1000
    else:
        us = rem // 1000
        r = rem - us * 1000
        if r > 500 or (r == 500 and (us & 1)):
            us += 1
        if us == 1000000:
            us = 0
            secs += 1
    if not (_MIN_UNIX <= secs <= _MAX_UNIX):
        return fromtimestamp_utc(t / d, _UTC)
    return _from_secs_us(secs, <int>us)


cdef object _from_secs_us(int64_t secs, int us):
    """The UTC datetime ``secs`` (within datetime's range) + ``us`` after 1970."""
    cdef int64_t days, rem
    cdef int y, mo, d
    days = secs // 86400
    rem = secs - days * 86400
    if rem < 0:  # built with cdivision: the quotient truncated toward zero
        rem += 86400
        days -= 1
    _civil_from_days(days, &y, &mo, &d)
    return datetime_new(
        y, mo, d, <int>(rem // 3600), <int>((rem % 3600) // 60), <int>(rem % 60), us, _UTC
    )


# 2000-01-01, PostgreSQL's epoch, in days since 1970-01-01.
cdef int64_t _PG_EPOCH_DAYS = 10957


cdef int64_t _timestamp_us(object v) except? -1:
    """Microseconds since 2000-01-01 UTC, as asyncpg's timestamptz encoder computes them."""
    cdef object tz
    cdef int64_t days, secs, us
    if not PyDateTime_Check(v):
        raise TypeError(
            f"expected a datetime.date or datetime.datetime instance, got {type(v).__name__!r}"
        )
    tz = datetime_tzinfo(v)
    if tz is not _UTC:
        if tz is None:
            if v == _INFINITY:
                return _PG_TS_INFINITY
            if v == _NEG_INFINITY:
                return _PG_TS_NEG_INFINITY
        v = v.astimezone(_UTC)
    days = _days_from_civil(
        PyDateTime_GET_YEAR(v), PyDateTime_GET_MONTH(v), PyDateTime_GET_DAY(v)
    ) - _PG_EPOCH_DAYS
    secs = (
        days * 86400
        + PyDateTime_DATE_GET_HOUR(v) * 3600
        + PyDateTime_DATE_GET_MINUTE(v) * 60
        + PyDateTime_DATE_GET_SECOND(v)
    )
    us = secs * 1000000 + PyDateTime_DATE_GET_MICROSECOND(v)
    # asyncpg also maps the instants of datetime.max / datetime.min read as UTC to +-infinity.
    if us == 252455615999999999:
        return _PG_TS_INFINITY
    if us == -63082281600000000:
        return _PG_TS_NEG_INFINITY
    return us


cdef int64_t _as_int(object v) except? -1:
    # asyncpg converts non-int objects that have __int__ (a float, a Decimal) the same way.
    if not PyLong_Check(v):
        if hasattr(type(v), "__int__"):
            v = int(v)
        else:
            raise TypeError(f"an integer is required (got type {type(v).__name__})")
    return PyLong_AsLongLong(v)  # OverflowError past int64


cdef int64_t _as_int_in(object v, int64_t lo, int64_t hi, str name) except? -1:
    cdef int64_t i
    try:
        i = _as_int(v)
    except OverflowError:
        raise OverflowError(f"value out of {name} range") from None
    if i < lo or i > hi:
        raise OverflowError(f"value out of {name} range")
    return i


@cython.final
@cython.auto_pickle(False)
cdef class CopyEncoder:
    """Encodes rows (tuples or lists, one value per column, None for NULL) for binary COPY.

    ``types`` are ingestd's canonical column type names (``routes.SQL_TYPE``
    keys). ``ValueError`` for a type with no encoder here; check with
    :func:`supports` first.
    """

    def __cinit__(self, types):
        self._codes = NULL
        self._ncols = 0

    def __init__(self, types):
        cdef Py_ssize_t i
        types = tuple(types)
        if len(types) > 1600:  # PostgreSQL's column limit; also keeps the field count in int16
            raise ValueError(f"{len(types)} columns is more than a table can have")
        codes = [TYPE_CODES.get(t) for t in types]
        for t, c in zip(types, codes):
            if c is None:
                raise ValueError(f"no binary COPY encoder for column type {t!r}")
        self._codes = <unsigned char*>PyMem_Malloc(len(types) + 1)
        if self._codes == NULL:
            raise MemoryError()
        for i in range(len(types)):
            self._codes[i] = <unsigned char>codes[i]
        self._ncols = len(types)
        self.types = types

    def __dealloc__(self):
        if self._codes != NULL:
            PyMem_Free(self._codes)
            self._codes = NULL

    def encode(self, rows):
        """The whole COPY stream (signature, header, rows, trailer) for ``rows``, as bytes.

        Raises ``TypeError`` / ``ValueError`` / ``OverflowError`` for a value
        the column's type cannot take, and ``ValueError`` for a row with the
        wrong number of values.
        """
        cdef _Buf b
        b.data = NULL
        b.len = 0
        b.cap = 0
        try:
            _reserve(&b, 19 + 64 * len(rows))
            memcpy(b.data, _SIGNATURE, 11)
            b.len = 11
            _put32(&b, 0)  # flags
            _put32(&b, 0)  # header extension length
            for row in rows:
                self._encode_row(&b, row)
            _reserve(&b, 2)
            _put16(&b, -1)
            return PyBytes_FromStringAndSize(b.data, b.len)
        finally:
            PyMem_Free(b.data)

    cdef int _encode_row(self, _Buf* b, object row) except -1:
        cdef Py_ssize_t i, n = len(row)
        if n != self._ncols:
            raise ValueError(f"row has {n} values, the table has {self._ncols} columns")
        _reserve(b, 2)
        _put16(b, <int16_t>n)
        for i in range(n):
            self._encode_value(b, self._codes[i], row[i])
        return 0

    cdef int _encode_value(self, _Buf* b, unsigned char code, object v) except -1:
        cdef double d
        cdef float f
        cdef int64_t i
        cdef const char* s
        cdef Py_ssize_t n
        cdef Py_buffer view
        if v is None:
            _reserve(b, 4)
            _put32(b, -1)
            return 0
        if code == T_FLOAT8:
            d = PyFloat_AsDouble(v)
            _reserve(b, 12)
            _put32(b, 8)
            _put64(b, (<int64_t*>&d)[0])
        elif code == T_FLOAT4:
            d = PyFloat_AsDouble(v)
            f = <float>d
            if isinf(f) and not isinf(d):
                raise ValueError("value out of float32 range")
            _reserve(b, 8)
            _put32(b, 4)
            _put32(b, (<int32_t*>&f)[0])
        elif code == T_INT8:
            i = _as_int(v)
            _reserve(b, 12)
            _put32(b, 8)
            _put64(b, i)
        elif code == T_INT4:
            i = _as_int_in(v, -2147483648, 2147483647, "int32")
            _reserve(b, 8)
            _put32(b, 4)
            _put32(b, <int32_t>i)
        elif code == T_INT2:
            i = _as_int_in(v, -32768, 32767, "int16")
            _reserve(b, 6)
            _put32(b, 2)
            _put16(b, <int16_t>i)
        elif code == T_TEXT or code == T_JSONB:
            if not PyUnicode_Check(v):
                raise TypeError(f"expected str, got {type(v).__name__}")
            s = PyUnicode_AsUTF8AndSize(v, &n)
            _put_bytes(b, s, n, code == T_JSONB)
        elif code == T_BOOL:
            if v is not True and v is not False:
                raise TypeError(f"a boolean is required (got type {type(v).__name__})")
            _reserve(b, 5)
            _put32(b, 1)
            b.data[b.len] = 1 if v is True else 0
            b.len += 1
        elif code == T_TIMESTAMPTZ:
            i = _timestamp_us(v)
            _reserve(b, 12)
            _put32(b, 8)
            _put64(b, i)
        elif code == T_BYTEA:
            if PyBytes_CheckExact(v):
                _put_bytes(b, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), False)
            else:
                PyObject_GetBuffer(v, &view, PyBUF_SIMPLE)
                try:
                    _put_bytes(b, <const char*>view.buf, view.len, False)
                finally:
                    PyBuffer_Release(&view)
        else:  # pragma: no cover - __init__ admits known codes only
            raise ValueError(f"unknown column type code {code}")
        return 0
