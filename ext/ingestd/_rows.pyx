# Building the rows of an ingest batch, compiled.
#
# A route's row for one message is defined by its generated Python converter
# (ingestd.ingest.routes.codegen: decode the payload with the
# route's msgspec decoder, then one expression per column). After the inbound
# fast path, running that converter was the largest share of the broker's CPU
# at ingest rates; the expressions themselves (not the msgspec decode) were
# about half of it. RowBuilder builds the same rows for a whole chunk of
# messages in one call, with the common column kinds done here:
#
#   payload field (no conversion, text, timestamp from a number (an integer
#   count of ms/us/ns exactly: _copy.fromunits_utc), any other
#   converter called as the expression calls it), topic level (with or without
#   converter), the topic, received_at as timestamptz, a constant, the
#   message's client id, username, QoS and retain flag, the whole payload as
#   jsonb-or-NULL / bytea-unless-JSON (the default route's pair: the payload
#   is validated once per row for both), required columns; any other column
#   calls its Python getter (m, lv, o) as the generated converter does.
#
# Contract: for every message it returns exactly the tuple the generated
# converter returns. It never decides an error: on any exception (a bad
# payload, a value that needs a converter's checks, a missing required value)
# it raises, and the caller converts that chunk message by message through
# Route.convert, which produces the exact RowError (or row) as before.
# tests/test_rows.py checks the equality on the example configs and random
# payloads.

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int64_t

from ingestd._copy cimport from_units

import datetime as _dt
import types as _types


# A payload field is a slot of the route's decoded msgspec Struct (a member descriptor
# holding an object, NULL while unset). RowBuilder reads it at its offset instead of
# through getattr (a type-dict lookup and a descriptor call per column: ~1/3 of the
# row building measured on the bench route), for an object of exactly the type the
# offsets were read from; anything else goes through getattr.
cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    PyTypeObject* Py_TYPE(object o)

cdef extern from "structmember.h":
    int T_OBJECT_EX

cdef object _MemberDescriptor = _types.MemberDescriptorType

from ingestd._copy import fromtimestamp_utc as _fromts

cdef object _UTC = _dt.timezone.utc


@cython.final
cdef class RowBuilder:
    """The rows of a list of messages for one route (see the module comment).

    Fields and the operation codes are declared in _rows.pxd."""

    def __cinit__(self):
        self._ops = NULL
        self._required = NULL
        self._fbk = NULL
        self._offs = NULL
        self._otype = None

    def __init__(self, ops, decode, bint needs_levels, check, dict levels=None,
                 Py_ssize_t levels_cache_max=4096):
        """``ops``: per column, (kind, required, arg0, arg1, arg2[, fallback]) with
        the kinds named as in :data:`KINDS` and ``fallback`` None or
        (``FALLBACKS`` name, arg): what the column takes when its operation gives
        None; ``levels``: the topic -> split levels cache to use (shared with the
        route's generated converter)."""
        self._decode = decode
        self._check = check
        self._levels = needs_levels or check is not None
        self._lvc = levels if levels is not None else {}
        self._lvc_max = levels_cache_max
        self._n = len(ops)
        self._ops = <int*>PyMem_Malloc(max(self._n, 1) * sizeof(int))
        self._required = <bint*>PyMem_Malloc(max(self._n, 1) * sizeof(bint))
        self._fbk = <int*>PyMem_Malloc(max(self._n, 1) * sizeof(int))
        self._offs = <Py_ssize_t*>PyMem_Malloc(max(self._n, 1) * sizeof(Py_ssize_t))
        if (self._ops == NULL or self._required == NULL or self._fbk == NULL
                or self._offs == NULL):
            raise MemoryError()
        self._a0 = []
        self._a1 = []
        self._a2 = []
        self._fb = []
        cdef Py_ssize_t i
        for i in range(self._n):
            self._offs[i] = -1
        for i, op in enumerate(ops):
            kind, required, a0, a1, a2 = op[:5]
            fb = op[5] if len(op) > 5 else None
            self._ops[i] = KINDS[kind]
            self._required[i] = bool(required)
            self._a0.append(a0)
            self._a1.append(a1)
            self._a2.append(a2)
            if fb is None:
                self._fbk[i] = FB_NONE
                self._fb.append(None)
            else:
                self._fbk[i] = FALLBACKS[fb[0]]
                self._fb.append(fb[1])

    def __dealloc__(self):
        PyMem_Free(self._ops)
        PyMem_Free(self._required)
        PyMem_Free(self._fbk)
        PyMem_Free(self._offs)

    cdef int _resolve(self, object t) except -1:
        """Read the slot offsets of the payload fields in type ``t`` (once per type)."""
        cdef Py_ssize_t i
        cdef int op
        cdef PyMemberDescrObject* md
        for i in range(self._n):
            self._offs[i] = -1
            op = self._ops[i]
            if op == OP_ATTR or op == OP_ATTR_TEXT or op == OP_ATTR_TS or op == OP_ATTR_CONV:
                d = getattr(t, self._a0[i], None)
                if type(d) is _MemberDescriptor:
                    md = <PyMemberDescrObject*>d
                    if md.d_member.type == T_OBJECT_EX and md.d_member.offset > 0:
                        self._offs[i] = md.d_member.offset
        self._otype = t
        return 0

    cdef inline object _attr(self, object o, Py_ssize_t i):
        cdef PyObject* p
        cdef Py_ssize_t off
        if <object>Py_TYPE(o) is self._otype:
            off = self._offs[i]
            if off > 0:
                p = (<PyObject**>((<char*><PyObject*>o) + off))[0]
                if p != NULL:
                    return <object>p
        return getattr(o, self._a0[i])

    def build(self, list msgs):
        """The rows of ``msgs`` in order. Raises (anything) if one needs the per-message path."""
        cdef list out = []
        cdef Message m
        for obj in msgs:
            m = <Message?>obj
            out.append(self._row(m))
        return out

    cdef tuple _row(self, Message m):
        cdef object lv = None
        cdef object o = None
        cdef object v
        cdef str t
        if self._levels:
            t = m.topic
            lv = self._lvc.get(t)
            if lv is None:
                lv = t.split("/")
                if len(self._lvc) >= self._lvc_max:
                    self._lvc.clear()
                self._lvc[t] = lv
            if self._check is not None:
                self._check(lv)
        if self._decode is not None:
            o = self._decode(m.payload)
            if self._otype is None:
                self._resolve(type(o))  # the decoder's root type: fixed per route
        cdef tuple row = PyTuple_New(self._n)
        cdef Py_ssize_t i
        cdef int op, fast, field
        # OP_PAYLOAD_JSON / _RAW: the payload's jsonb text (None: not JSON), once per row
        cdef bint json_done = False
        cdef object json_text = None
        for i in range(self._n):
            op = self._ops[i]
            if op == OP_ATTR:
                v = self._attr(o, i)
            elif op == OP_ATTR_TEXT:
                v = self._attr(o, i)
                if v is not None and not (type(v) is str and "\x00" not in <str>v):
                    v = self._a1[i](v)
            elif op == OP_ATTR_TS:
                v = self._attr(o, i)
                if v is not None:
                    if type(v) is int or type(v) is float:
                        if self._a2[i] is not None:  # the unit's divisor (None: seconds)
                            # exact for an int (no float division): _copy.fromunits_utc
                            v = from_units(v, <int64_t>self._a2[i])
                        else:
                            v = _fromts(v, _UTC)
                    else:
                        v = self._a1[i](v)
            elif op == OP_ATTR_CONV:
                v = self._attr(o, i)
                if v is not None:
                    v = self._a1[i](v)
            elif op == OP_LEVEL:
                v = lv[self._a0[i]]
            elif op == OP_LEVEL_CONV:
                v = self._a1[i](lv[self._a0[i]])
            elif op == OP_TOPIC:
                v = m.topic
            elif op == OP_RECEIVED_TS:
                v = _fromts(m.received_at, _UTC)
            elif op == OP_CONST:
                v = self._a0[i]
            elif op == OP_MSG:
                field = <int>self._a0[i]
                if field == MSG_CLIENT_ID:
                    v = m.client_id
                elif field == MSG_USERNAME:
                    v = m.username
                elif field == MSG_QOS:
                    v = m.qos
                else:
                    v = m.retain
                if v is not None or field != MSG_USERNAME:
                    fast = <int>self._a2[i]
                    if not (
                        (fast == MSG_FAST_TEXT and type(v) is str and "\x00" not in <str>v)
                        or (fast == MSG_FAST_INT and type(v) is int and -32768 <= v <= 32767)
                        or (fast == MSG_FAST_BOOL and type(v) is bool)
                    ):
                        v = self._a1[i](v)
            elif op == OP_PAYLOAD_JSON or op == OP_PAYLOAD_RAW:
                if not json_done:
                    json_text = _json_text(m.payload, self._a0[i], self._a1[i])
                    json_done = True
                if op == OP_PAYLOAD_RAW:
                    v = m.payload if json_text is None and m.payload else None
                elif json_text is None or _is_null(m.payload):
                    v = None
                else:
                    v = json_text
            else:
                v = self._a0[i](m, lv, o)
            if v is None and self._fbk[i] != FB_NONE:
                if self._fbk[i] == FB_RECEIVED_TS:
                    v = _fromts(m.received_at, _UTC)
                elif self._fbk[i] == FB_CONST:
                    v = self._fb[i]
                else:
                    v = self._fb[i](m, lv, o)
            if v is None and self._required[i]:
                raise ValueError("required column without a value")
            Py_INCREF(v)
            PyTuple_SET_ITEM(row, i, v)
        return row


cdef object _json_text(bytes p, object validate, object not_json):
    """routes/kinds.py json_text: the payload as jsonb text when it is a JSON
    document jsonb can store, else None."""
    if not p:
        return None
    try:
        validate(p)
        text = p.decode()
    except not_json:
        return None
    # text holds the 6 ASCII characters exactly where p does
    if b"\\u0000" in p:
        return None
    return text


cdef bint _is_null(bytes p):
    """A valid JSON document that is ``null`` (``text.strip() == "null"``): JSON's only
    value starting with n, after JSON whitespace (the only whitespace a valid
    document has outside its strings)."""
    cdef const unsigned char* b = p
    cdef Py_ssize_t i, n = len(p)
    for i in range(n):
        if b[i] not in (32, 9, 10, 13):
            return b[i] == 110  # 'n'
    return False


KINDS = {
    "py": OP_PY,
    "attr": OP_ATTR,
    "attr_text": OP_ATTR_TEXT,
    "attr_ts": OP_ATTR_TS,
    "attr_conv": OP_ATTR_CONV,
    "level": OP_LEVEL,
    "level_conv": OP_LEVEL_CONV,
    "topic": OP_TOPIC,
    "received_ts": OP_RECEIVED_TS,
    "const": OP_CONST,
    "msg": OP_MSG,
    "payload_json": OP_PAYLOAD_JSON,
    "payload_raw": OP_PAYLOAD_RAW,
}
MSG_FIELDS = {
    "client_id": MSG_CLIENT_ID,
    "username": MSG_USERNAME,
    "qos": MSG_QOS,
    "retain": MSG_RETAIN,
}
MSG_FAST = {
    None: MSG_FAST_NONE,
    "text": MSG_FAST_TEXT,
    "int": MSG_FAST_INT,
    "bool": MSG_FAST_BOOL,
}
FALLBACKS = {
    "received_ts": FB_RECEIVED_TS,
    "const": FB_CONST,
    "py": FB_PY,
}
