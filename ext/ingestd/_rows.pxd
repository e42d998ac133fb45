# Declarations for ingestd._rows: a route's rows for a chunk of messages (see _rows.pyx).

cimport cython

from ingestd._message cimport Message


# RowBuilder operations: one per column kind the builder does itself (the
# names in KINDS, _rows.pyx, are what ingestd.ingest.routes passes).
cdef enum:
    OP_PY = 0            # arg0: getter(m, lv, o)
    OP_ATTR = 1          # arg0: field name; value as decoded
    OP_ATTR_TEXT = 2     # arg0: name, arg1: conv (_to_text)
    OP_ATTR_TS = 3       # arg0: name, arg1: conv (to_ts), arg2: divisor (None: seconds)
    OP_ATTR_CONV = 4     # arg0: name, arg1: conv
    OP_LEVEL = 5         # arg0: index
    OP_LEVEL_CONV = 6    # arg0: index, arg1: conv
    OP_TOPIC = 7
    OP_RECEIVED_TS = 8
    OP_CONST = 9         # arg0: value
    OP_MSG = 10          # arg0: MSG_* field, arg1: conv, arg2: MSG_FAST_* (values conv keeps)
    OP_PAYLOAD_JSON = 11 # arg0: JSON validator, arg1: the exceptions meaning "not JSON"
    OP_PAYLOAD_RAW = 12  # arg0, arg1: as OP_PAYLOAD_JSON

# OP_MSG: which attribute of the message...
cdef enum:
    MSG_CLIENT_ID = 0
    MSG_USERNAME = 1     # None stays NULL
    MSG_QOS = 2
    MSG_RETAIN = 3

# ...and which of its values the column's converter returns unchanged (taken as
# they are, without the call); any other value goes through the converter.
cdef enum:
    MSG_FAST_NONE = 0
    MSG_FAST_TEXT = 1    # a str without NUL (_to_text)
    MSG_FAST_INT = 2     # an int within smallint's range (every integer type's to_int)
    MSG_FAST_BOOL = 3    # a bool (_to_bool)

# What a column with a fallback (routes/kinds.py Fallback) takes when its own
# operation gives None.
cdef enum:
    FB_NONE = 0
    FB_RECEIVED_TS = 1   # the time of receipt
    FB_CONST = 2         # fallback arg: the value
    FB_PY = 3            # fallback arg: getter(m, lv, o)


@cython.final
cdef class RowBuilder:
    cdef object _decode          # the route decoder's decode, or None
    cdef object _check           # the topic template check(lv), or None
    cdef bint _levels            # the topic's levels are needed
    cdef dict _lvc               # topic -> its split levels
    cdef Py_ssize_t _lvc_max
    cdef Py_ssize_t _n           # columns
    cdef int* _ops               # per column: its OP_*
    cdef bint* _required         # per column: None is an error
    cdef list _a0, _a1, _a2      # per column: the operation's arguments
    cdef int* _fbk               # per column: its FB_*
    cdef list _fb                # per column: the fallback's argument
    cdef object _otype           # the decoded payload's type _offs was read from, or None
    cdef Py_ssize_t* _offs       # per column: its payload field's slot offset in _otype, or -1

    # The payload field of column i (an OP_ATTR* column) of the decoded payload o.
    cdef object _attr(self, object o, Py_ssize_t i)
    cdef int _resolve(self, object t) except -1

    # One message's row; raises (anything) when it needs the per-message path.
    cdef tuple _row(self, Message m)
