"""Sans-IO MQTT 3.1 / 3.1.1 / 5.0 packet codec: bytes in, packets out, and back.

The contract is docs/codec.md. Decoding is a :class:`Decoder` fed whatever the
transport delivered; encoding is :func:`encode` for any packet object plus the
two hot-path helpers :func:`encode_publish` and :func:`encode_ack`.

Malformed input raises :class:`ingestd.errors.ProtocolError` carrying the
MQTT 5 reason code to disconnect with and a message that cites the normative
statement (``[MQTT-x.y.z-n]``) or, where the specification has no numbered
statement, its section (``[MQTT-5.0 §x.y]``). Where 3.1.1 numbers a rule
differently the citation follows the version being decoded.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_FromStringAndSize,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

cimport cython

from ingestd.errors import ProtocolError


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


# ---------------------------------------------------------------- constants

MQTT_3_1 = MQTT_V31
MQTT_3_1_1 = MQTT_V311
MQTT_5 = MQTT_V5

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"

PACKET_TYPES = {
    "CONNECT": PT_CONNECT, "CONNACK": PT_CONNACK, "PUBLISH": PT_PUBLISH,
    "PUBACK": PT_PUBACK, "PUBREC": PT_PUBREC, "PUBREL": PT_PUBREL, "PUBCOMP": PT_PUBCOMP,
    "SUBSCRIBE": PT_SUBSCRIBE, "SUBACK": PT_SUBACK, "UNSUBSCRIBE": PT_UNSUBSCRIBE,
    "UNSUBACK": PT_UNSUBACK, "PINGREQ": PT_PINGREQ, "PINGRESP": PT_PINGRESP,
    "DISCONNECT": PT_DISCONNECT, "AUTH": PT_AUTH,
}

REASON_CODES = {
    "SUCCESS": RC_SUCCESS, "GRANTED_QOS_1": RC_GRANTED_QOS_1, "GRANTED_QOS_2": RC_GRANTED_QOS_2,
    "DISCONNECT_WITH_WILL_MESSAGE": RC_DISCONNECT_WITH_WILL_MESSAGE,
    "NO_MATCHING_SUBSCRIBERS": RC_NO_MATCHING_SUBSCRIBERS,
    "NO_SUBSCRIPTION_EXISTED": RC_NO_SUBSCRIPTION_EXISTED,
    "CONTINUE_AUTHENTICATION": RC_CONTINUE_AUTHENTICATION, "RE_AUTHENTICATE": RC_RE_AUTHENTICATE,
    "UNSPECIFIED_ERROR": RC_UNSPECIFIED_ERROR, "MALFORMED_PACKET": RC_MALFORMED_PACKET,
    "PROTOCOL_ERROR": RC_PROTOCOL_ERROR,
    "IMPLEMENTATION_SPECIFIC_ERROR": RC_IMPLEMENTATION_SPECIFIC_ERROR,
    "UNSUPPORTED_PROTOCOL_VERSION": RC_UNSUPPORTED_PROTOCOL_VERSION,
    "CLIENT_IDENTIFIER_NOT_VALID": RC_CLIENT_IDENTIFIER_NOT_VALID,
    "BAD_USER_NAME_OR_PASSWORD": RC_BAD_USER_NAME_OR_PASSWORD, "NOT_AUTHORIZED": RC_NOT_AUTHORIZED,
    "SERVER_UNAVAILABLE": RC_SERVER_UNAVAILABLE, "SERVER_BUSY": RC_SERVER_BUSY, "BANNED": RC_BANNED,
    "SERVER_SHUTTING_DOWN": RC_SERVER_SHUTTING_DOWN,
    "BAD_AUTHENTICATION_METHOD": RC_BAD_AUTHENTICATION_METHOD,
    "KEEP_ALIVE_TIMEOUT": RC_KEEP_ALIVE_TIMEOUT, "SESSION_TAKEN_OVER": RC_SESSION_TAKEN_OVER,
    "TOPIC_FILTER_INVALID": RC_TOPIC_FILTER_INVALID, "TOPIC_NAME_INVALID": RC_TOPIC_NAME_INVALID,
    "PACKET_IDENTIFIER_IN_USE": RC_PACKET_IDENTIFIER_IN_USE,
    "PACKET_IDENTIFIER_NOT_FOUND": RC_PACKET_IDENTIFIER_NOT_FOUND,
    "RECEIVE_MAXIMUM_EXCEEDED": RC_RECEIVE_MAXIMUM_EXCEEDED,
    "TOPIC_ALIAS_INVALID": RC_TOPIC_ALIAS_INVALID, "PACKET_TOO_LARGE": RC_PACKET_TOO_LARGE,
    "MESSAGE_RATE_TOO_HIGH": RC_MESSAGE_RATE_TOO_HIGH, "QUOTA_EXCEEDED": RC_QUOTA_EXCEEDED,
    "ADMINISTRATIVE_ACTION": RC_ADMINISTRATIVE_ACTION,
    "PAYLOAD_FORMAT_INVALID": RC_PAYLOAD_FORMAT_INVALID,
    "RETAIN_NOT_SUPPORTED": RC_RETAIN_NOT_SUPPORTED, "QOS_NOT_SUPPORTED": RC_QOS_NOT_SUPPORTED,
    "USE_ANOTHER_SERVER": RC_USE_ANOTHER_SERVER, "SERVER_MOVED": RC_SERVER_MOVED,
    "SHARED_SUBSCRIPTIONS_NOT_SUPPORTED": RC_SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
    "CONNECTION_RATE_EXCEEDED": RC_CONNECTION_RATE_EXCEEDED,
    "MAXIMUM_CONNECT_TIME": RC_MAXIMUM_CONNECT_TIME,
    "SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED": RC_SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
    "WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED": RC_WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
}

cdef tuple _TYPE_NAMES = (
    "reserved type 0", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH",
)

# ------------------------------------------------------ the property table
#
# One row per property of the MQTT 5 table in section 2.2.2.2: identifier,
# value type, the packets it may appear in, the allowed value range and the
# section stating that range. "Will" (the Will Properties of CONNECT) is
# context 0, packets are contexts 1..15 (their type numbers).

cdef enum:  # property value kinds
    K_NONE = 0
    K_BYTE = 1
    K_U16 = 2
    K_U32 = 3
    K_VBI = 4
    K_STR = 5
    K_BIN = 6
    K_PAIR = 7

cdef enum:
    W_WILL = 1  # context bit of the Will Properties

cdef unsigned char _prop_kind[PROP_MAX_ID + 1]
cdef unsigned int _prop_where[PROP_MAX_ID + 1]
cdef long long _prop_lo[PROP_MAX_ID + 1]
cdef long long _prop_hi[PROP_MAX_ID + 1]

cdef inline unsigned int _w(int ptype):
    return 1u << ptype

cdef unsigned int _ACKS = _w(PT_PUBACK) | _w(PT_PUBREC) | _w(PT_PUBREL) | _w(PT_PUBCOMP)
# Every packet that has properties (all but PINGREQ and PINGRESP), and Will.
cdef unsigned int _ALL = (W_WILL | _w(PT_CONNECT) | _w(PT_CONNACK) | _w(PT_PUBLISH) | _ACKS
                          | _w(PT_SUBSCRIBE) | _w(PT_SUBACK) | _w(PT_UNSUBSCRIBE)
                          | _w(PT_UNSUBACK) | _w(PT_DISCONNECT) | _w(PT_AUTH))
cdef unsigned int _MSG = _w(PT_PUBLISH) | W_WILL

cdef tuple _PROP_TABLE = (
    # id, name, kind, where, lo, hi, section of the range rule
    (PROP_PAYLOAD_FORMAT_INDICATOR, "Payload Format Indicator", K_BYTE, _MSG, 0, 1, "3.3.2.3.2"),
    (PROP_MESSAGE_EXPIRY_INTERVAL, "Message Expiry Interval", K_U32, _MSG, 0, -1, ""),
    (PROP_CONTENT_TYPE, "Content Type", K_STR, _MSG, 0, -1, ""),
    (PROP_RESPONSE_TOPIC, "Response Topic", K_STR, _MSG, 0, -1, ""),
    (PROP_CORRELATION_DATA, "Correlation Data", K_BIN, _MSG, 0, -1, ""),
    (PROP_SUBSCRIPTION_IDENTIFIER, "Subscription Identifier", K_VBI,
     _w(PT_PUBLISH) | _w(PT_SUBSCRIBE), 1, -1, "3.8.2.1.2"),
    (PROP_SESSION_EXPIRY_INTERVAL, "Session Expiry Interval", K_U32,
     _w(PT_CONNECT) | _w(PT_CONNACK) | _w(PT_DISCONNECT), 0, -1, ""),
    (PROP_ASSIGNED_CLIENT_IDENTIFIER, "Assigned Client Identifier", K_STR, _w(PT_CONNACK), 0, -1, ""),
    (PROP_SERVER_KEEP_ALIVE, "Server Keep Alive", K_U16, _w(PT_CONNACK), 0, -1, ""),
    (PROP_AUTHENTICATION_METHOD, "Authentication Method", K_STR,
     _w(PT_CONNECT) | _w(PT_CONNACK) | _w(PT_AUTH), 0, -1, ""),
    (PROP_AUTHENTICATION_DATA, "Authentication Data", K_BIN,
     _w(PT_CONNECT) | _w(PT_CONNACK) | _w(PT_AUTH), 0, -1, ""),
    (PROP_REQUEST_PROBLEM_INFORMATION, "Request Problem Information", K_BYTE,
     _w(PT_CONNECT), 0, 1, "3.1.2.11.7"),
    (PROP_WILL_DELAY_INTERVAL, "Will Delay Interval", K_U32, W_WILL, 0, -1, ""),
    (PROP_REQUEST_RESPONSE_INFORMATION, "Request Response Information", K_BYTE,
     _w(PT_CONNECT), 0, 1, "3.1.2.11.6"),
    (PROP_RESPONSE_INFORMATION, "Response Information", K_STR, _w(PT_CONNACK), 0, -1, ""),
    (PROP_SERVER_REFERENCE, "Server Reference", K_STR, _w(PT_CONNACK) | _w(PT_DISCONNECT), 0, -1, ""),
    (PROP_REASON_STRING, "Reason String", K_STR,
     _w(PT_CONNACK) | _ACKS | _w(PT_SUBACK) | _w(PT_UNSUBACK) | _w(PT_DISCONNECT) | _w(PT_AUTH),
     0, -1, ""),
    (PROP_RECEIVE_MAXIMUM, "Receive Maximum", K_U16, _w(PT_CONNECT) | _w(PT_CONNACK), 1, -1,
     "3.1.2.11.3"),
    (PROP_TOPIC_ALIAS_MAXIMUM, "Topic Alias Maximum", K_U16, _w(PT_CONNECT) | _w(PT_CONNACK),
     0, -1, ""),
    (PROP_TOPIC_ALIAS, "Topic Alias", K_U16, _w(PT_PUBLISH), 1, -1, "3.3.2.3.4"),
    (PROP_MAXIMUM_QOS, "Maximum QoS", K_BYTE, _w(PT_CONNACK), 0, 1, "3.2.2.3.4"),
    (PROP_RETAIN_AVAILABLE, "Retain Available", K_BYTE, _w(PT_CONNACK), 0, 1, "3.2.2.3.5"),
    (PROP_USER_PROPERTY, "User Property", K_PAIR, _ALL, 0, -1, ""),
    (PROP_MAXIMUM_PACKET_SIZE, "Maximum Packet Size", K_U32, _w(PT_CONNECT) | _w(PT_CONNACK),
     1, -1, "3.1.2.11.4"),
    (PROP_WILDCARD_SUBSCRIPTION_AVAILABLE, "Wildcard Subscription Available", K_BYTE,
     _w(PT_CONNACK), 0, 1, "3.2.2.3.11"),
    (PROP_SUBSCRIPTION_IDENTIFIER_AVAILABLE, "Subscription Identifier Available", K_BYTE,
     _w(PT_CONNACK), 0, 1, "3.2.2.3.12"),
    (PROP_SHARED_SUBSCRIPTION_AVAILABLE, "Shared Subscription Available", K_BYTE,
     _w(PT_CONNACK), 0, 1, "3.2.2.3.13"),
)

# Where a range rule is stated again for a second packet, its section there.
cdef dict _RANGE_SECTION = {
    (PROP_PAYLOAD_FORMAT_INDICATOR, 0): "3.1.3.2.3",
    (PROP_SUBSCRIPTION_IDENTIFIER, PT_PUBLISH): "3.3.2.3.8",
    (PROP_RECEIVE_MAXIMUM, PT_CONNACK): "3.2.2.3.3",
    (PROP_MAXIMUM_PACKET_SIZE, PT_CONNACK): "3.2.2.3.6",
}

cdef dict _PROP_NAMES = {}
cdef dict _PROP_SECTION = {}

_KIND_NAMES = {
    K_BYTE: "byte", K_U16: "two-byte integer", K_U32: "four-byte integer",
    K_VBI: "variable byte integer", K_STR: "UTF-8 string", K_BIN: "binary data",
    K_PAIR: "UTF-8 string pair",
}
cdef long long _KIND_MAX[8]


def _init_props():
    _KIND_MAX[K_BYTE] = 0xFF
    _KIND_MAX[K_U16] = 0xFFFF
    _KIND_MAX[K_U32] = 0xFFFFFFFF
    _KIND_MAX[K_VBI] = MAX_VBI
    for pid, name, kind, where, lo, hi, section in _PROP_TABLE:
        _prop_kind[pid] = kind
        _prop_where[pid] = where
        _prop_lo[pid] = lo
        _prop_hi[pid] = _KIND_MAX[kind] if hi < 0 else hi
        _PROP_NAMES[pid] = name
        _PROP_SECTION[pid] = section


_init_props()

PROPERTY_IDS = {
    name.upper().replace(" ", "_"): pid for pid, name, *_ in _PROP_TABLE
}
PROPERTY_KINDS = {pid: _KIND_NAMES[kind] for pid, _, kind, *_ in _PROP_TABLE}


# ------------------------------------------------------------------ errors

cdef int _fail(str message, int reason_code) except -1:
    raise ProtocolError(message, reason_code)


cdef inline str _cite(int version, str v5, str v311):
    """The identifier of a rule that 3.1.1 numbers differently from 5.0."""
    return v311 if 0 < version < 5 else v5


cdef str _len_section(int version):
    return _cite(version, "[MQTT-5.0 §2.1.4]", "[MQTT-3.1.1 §2.2.3]")


# --------------------------------------------------------- bounds-checked reads
#
# Every read checks that the packet (or property section) still holds the
# bytes it needs: a field running past the remaining length is malformed.

cdef int _truncated(Reader* r) except -1:
    _fail("packet shorter than its fields: remaining length does not match the content "
          + _len_section(r.version), RC_MALFORMED_PACKET)


cdef inline int _need(Reader* r, Py_ssize_t n) except -1:
    if r.end - r.pos < n:
        _truncated(r)
    return 0


cdef inline int _u8(Reader* r) except -1:
    if r.pos >= r.end:
        _truncated(r)
    r.pos += 1
    return r.p[r.pos - 1]


cdef inline int _u16(Reader* r) except -1:
    _need(r, 2)
    r.pos += 2
    return (r.p[r.pos - 2] << 8) | r.p[r.pos - 1]


cdef inline long long _u32(Reader* r) except -1:
    cdef const unsigned char* p
    _need(r, 4)
    p = r.p + r.pos
    r.pos += 4
    return (<long long>p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]


cdef Py_ssize_t _vbi(Reader* r) except -1:
    cdef Py_ssize_t value = 0
    cdef int shift = 0, b
    while True:
        b = _u8(r)
        value |= <Py_ssize_t>(b & 0x7F) << shift
        if not b & 0x80:
            return value
        shift += 7
        if shift == 28:
            _fail("variable byte integer longer than 4 bytes [MQTT-5.0 §1.5.5]",
                  RC_MALFORMED_PACKET)


cdef int _nul(Reader* r) except -1:
    _fail("a UTF-8 string must not contain U+0000 "
          + _cite(r.version, "[MQTT-1.5.4-2]", "[MQTT-1.5.3-2]"), RC_MALFORMED_PACKET)


cdef str _decode_utf8(Reader* r, const unsigned char* p, Py_ssize_t n):
    """Decode UTF-8 already checked for U+0000, rejecting ill-formed input.

    Python's strict decoder refuses overlong forms, code points above
    U+10FFFF and the encoded surrogates U+D800..U+DFFF [MQTT-1.5.4-1].
    """
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        _fail("ill-formed UTF-8 in a string "
              + _cite(r.version, "[MQTT-1.5.4-1]", "[MQTT-1.5.3-1]"), RC_MALFORMED_PACKET)


cdef str _utf8(Reader* r, const unsigned char* p, Py_ssize_t n):
    """Decode a UTF-8 Encoded String, rejecting U+0000 and ill-formed UTF-8."""
    if n and memchr(p, 0, n) != NULL:
        _nul(r)
    return _decode_utf8(r, p, n)


cdef str _str(Reader* r):
    cdef int n = _u16(r)
    _need(r, n)
    r.pos += n
    return _utf8(r, r.p + r.pos - n, n)


cdef bytes _bin(Reader* r):
    cdef int n = _u16(r)
    _need(r, n)
    r.pos += n
    return PyBytes_FromStringAndSize(<const char*>r.p + r.pos - n, n)


cdef list _rest_as_list(Reader* r):
    """The remaining bytes as a list of ints (the reason codes of SUBACK, UNSUBACK)."""
    cdef list out = []
    while r.pos < r.end:
        out.append(r.p[r.pos])
        r.pos += 1
    return out


cdef int _packet_id(Reader* r, int ptype) except -1:
    cdef int pid = _u16(r)
    if pid == 0:
        if ptype == PT_PUBLISH or ptype == PT_SUBSCRIBE or ptype == PT_UNSUBSCRIBE:
            cite = _cite(r.version, "[MQTT-2.2.1-3]", "[MQTT-2.3.1-1]")
        else:
            cite = _cite(r.version, "[MQTT-5.0 §2.2.1]", "[MQTT-3.1.1 §2.3.1]")
        _fail(f"packet identifier 0 in {_TYPE_NAMES[ptype]}: it must be non-zero {cite}",
              RC_PROTOCOL_ERROR)
    return pid


cdef int _prop_range_error(int pid, int ctx, long long value) except -1:
    # The property sections call every out-of-range value a Protocol Error;
    # a Topic Alias of 0 has its own reason code.
    name = _PROP_NAMES[pid]
    if pid == PROP_TOPIC_ALIAS:
        _fail("a Topic Alias of 0 is not permitted [MQTT-3.3.2-8]", RC_TOPIC_ALIAS_INVALID)
    section = _RANGE_SECTION.get((pid, ctx), _PROP_SECTION[pid])
    if _prop_hi[pid] == 1:
        rule = "must be 0 or 1"
    else:
        rule = "must not be 0"
    _fail(f"{name} {rule}, got {value} [MQTT-5.0 §{section}]", RC_PROTOCOL_ERROR)


cdef dict _props(Reader* r, int ctx):
    """Read a property section (length + properties) allowed in context ``ctx``."""
    cdef Py_ssize_t n = _vbi(r)
    cdef dict d = {}
    cdef Reader s
    cdef uint64_t seen = 0, bit
    cdef int pid, kind
    cdef long long iv
    cdef object value
    cdef list items
    if n == 0:
        return d
    _need(r, n)
    s = r[0]
    s.end = r.pos + n
    r.pos += n
    while s.pos < s.end:
        # Property identifiers are variable byte integers, but every one
        # defined fits in one byte: a longer one is unknown anyway.
        pid = _u8(&s)
        if pid > PROP_MAX_ID or _prop_kind[pid] == K_NONE:
            _fail(f"unknown property identifier 0x{pid:02X} [MQTT-5.0 §2.2.2.2]",
                  RC_MALFORMED_PACKET)
        if not _prop_where[pid] & (1u << ctx):
            where = "Will Properties" if ctx == 0 else _TYPE_NAMES[ctx]
            _fail(f"{_PROP_NAMES[pid]} (0x{pid:02X}) is not allowed in {where} "
                  "[MQTT-5.0 §2.2.2.2]", RC_MALFORMED_PACKET)
        if pid == PROP_SUBSCRIPTION_IDENTIFIER and ctx == PT_PUBLISH and s.server_side:
            _fail("a PUBLISH sent by a client must not contain a Subscription Identifier "
                  "[MQTT-3.3.4-6]", RC_PROTOCOL_ERROR)
        bit = (<uint64_t>1) << pid
        if seen & bit and pid != PROP_USER_PROPERTY and not (
            pid == PROP_SUBSCRIPTION_IDENTIFIER and ctx == PT_PUBLISH
        ):
            # "It is a Protocol Error to include <the property> more than once."
            _fail(f"{_PROP_NAMES[pid]} (0x{pid:02X}) included more than once "
                  "[MQTT-5.0 §2.2.2.2]", RC_PROTOCOL_ERROR)
        seen |= bit
        kind = _prop_kind[pid]
        if kind == K_STR:
            d[pid] = _str(&s)
        elif kind == K_BIN:
            d[pid] = _bin(&s)
        elif kind == K_PAIR:
            value = (_str(&s), _str(&s))
            items = d.get(pid)
            if items is None:
                d[pid] = [value]
            else:
                items.append(value)
        else:
            if kind == K_BYTE:
                iv = _u8(&s)
            elif kind == K_U16:
                iv = _u16(&s)
            elif kind == K_U32:
                iv = _u32(&s)
            else:
                iv = _vbi(&s)
            if iv < _prop_lo[pid] or iv > _prop_hi[pid]:
                _prop_range_error(pid, ctx, iv)
            if pid == PROP_SUBSCRIPTION_IDENTIFIER:
                items = d.get(pid)
                if items is None:
                    d[pid] = [iv]
                else:
                    items.append(iv)
            else:
                d[pid] = iv
    return d


# ------------------------------------------------------------ packet classes

cdef class _Record:
    """Equality and repr over the attributes named in ``_fields``."""

    _fields = ()

    cdef tuple _values(self):
        return ()

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == (<_Record>other)._values()

    def __ne__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._values() != (<_Record>other)._values()

    __hash__ = None

    def __repr__(self):
        args = ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self._values()))
        return f"{type(self).__name__}({args})"


cdef inline dict _dict(dict d):
    return {} if d is None else d


cdef class Will(_Record):
    """The Will Message of a CONNECT (not a packet)."""

    _fields = ("topic", "payload", "qos", "retain", "properties")

    def __init__(self, str topic="", bytes payload=b"", int qos=0, bint retain=False,
                 dict properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.topic, self.payload, self.qos, self.retain, self.properties)


cdef class Connect(_Record):
    """CONNECT. ``protocol_level`` is 3 (protocol name "MQIsdp"), 4 or 5."""

    packet_type = PT_CONNECT
    _fields = ("protocol_name", "protocol_level", "clean_start", "keepalive", "client_id",
               "username", "password", "will", "properties")

    def __init__(self, str protocol_name="MQTT", int protocol_level=4, bint clean_start=True,
                 int keepalive=60, str client_id="", str username=None, bytes password=None,
                 Will will=None, dict properties=None):
        self.protocol_name = protocol_name
        self.protocol_level = protocol_level
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.client_id = client_id
        self.username = username
        self.password = password
        self.will = will
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.protocol_name, self.protocol_level, self.clean_start, self.keepalive,
                self.client_id, self.username, self.password, self.will, self.properties)


cdef class Connack(_Record):
    """CONNACK. Under 3.1.1 ``reason_code`` is the 3.1.1 return code."""

    packet_type = PT_CONNACK
    _fields = ("session_present", "reason_code", "properties")

    def __init__(self, bint session_present=False, int reason_code=0, dict properties=None):
        self.session_present = session_present
        self.reason_code = reason_code
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.session_present, self.reason_code, self.properties)


# Publish and PubAck are the per-message objects: they hold strings, bytes,
# ints and a properties dict of plain values, so they cannot be part of a
# reference cycle (short of storing a packet in its own properties). Keeping
# them out of the cyclic GC avoids a collection every few hundred packets,
# which cost ~40% of the decode time of a batch of PUBLISH packets.
@cython.no_gc
cdef class Publish(_Record):
    """PUBLISH. ``packet_id`` is 0 for QoS 0."""

    packet_type = PT_PUBLISH
    _fields = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")

    def __init__(self, str topic="", bytes payload=b"", int qos=0, bint retain=False,
                 bint dup=False, int packet_id=0, dict properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.topic, self.payload, self.qos, self.retain, self.dup, self.packet_id,
                self.properties)


@cython.no_gc
cdef class PubAck(_Record):
    """PUBACK, PUBREC, PUBREL or PUBCOMP, told apart by the instance's ``packet_type``."""

    _fields = ("packet_type", "packet_id", "reason_code", "properties")

    def __init__(self, int packet_type=PT_PUBACK, int packet_id=0, int reason_code=0,
                 dict properties=None):
        self.packet_type = packet_type
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.packet_type, self.packet_id, self.reason_code, self.properties)


cdef class Subscribe(_Record):
    """SUBSCRIBE; each subscription is (filter, qos, no_local, retain_as_published, retain_handling)."""

    packet_type = PT_SUBSCRIBE
    _fields = ("packet_id", "subscriptions", "properties")

    def __init__(self, int packet_id=0, list subscriptions=None, dict properties=None):
        self.packet_id = packet_id
        self.subscriptions = [] if subscriptions is None else subscriptions
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.packet_id, self.subscriptions, self.properties)


cdef class Suback(_Record):
    """SUBACK: one reason code (3.1.1 return code) per subscription."""

    packet_type = PT_SUBACK
    _fields = ("packet_id", "reason_codes", "properties")

    def __init__(self, int packet_id=0, list reason_codes=None, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = [] if reason_codes is None else reason_codes
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.packet_id, self.reason_codes, self.properties)


cdef class Unsubscribe(_Record):
    """UNSUBSCRIBE."""

    packet_type = PT_UNSUBSCRIBE
    _fields = ("packet_id", "topic_filters", "properties")

    def __init__(self, int packet_id=0, list topic_filters=None, dict properties=None):
        self.packet_id = packet_id
        self.topic_filters = [] if topic_filters is None else topic_filters
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.packet_id, self.topic_filters, self.properties)


cdef class Unsuback(_Record):
    """UNSUBACK; 3.1.1 has no reason codes (the list is empty)."""

    packet_type = PT_UNSUBACK
    _fields = ("packet_id", "reason_codes", "properties")

    def __init__(self, int packet_id=0, list reason_codes=None, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = [] if reason_codes is None else reason_codes
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.packet_id, self.reason_codes, self.properties)


cdef class Pingreq(_Record):
    """PINGREQ."""

    packet_type = PT_PINGREQ


cdef class Pingresp(_Record):
    """PINGRESP."""

    packet_type = PT_PINGRESP


cdef class Disconnect(_Record):
    """DISCONNECT (3.1.1: no reason code, no properties)."""

    packet_type = PT_DISCONNECT
    _fields = ("reason_code", "properties")

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.reason_code, self.properties)


cdef class Auth(_Record):
    """AUTH (MQTT 5 only)."""

    packet_type = PT_AUTH
    _fields = ("reason_code", "properties")

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = _dict(properties)

    cdef tuple _values(self):
        return (self.reason_code, self.properties)


# ------------------------------------------------------------------ decoder

cdef int _append(bytearray buf, const unsigned char* p, Py_ssize_t n) except -1:
    cdef Py_ssize_t old = PyByteArray_GET_SIZE(buf)
    if n:
        # PyByteArray_Resize over-allocates, so repeated appends are amortised.
        PyByteArray_Resize(buf, old + n)
        memcpy(PyByteArray_AS_STRING(buf) + old, p, n)
    return 0


cdef class Decoder:
    """Incremental MQTT decoder: ``feed(bytes)`` returns the packets completed so far.

    ``server_side=True`` decodes what clients send (first packet CONNECT,
    which sets ``protocol_version``); ``server_side=False`` decodes what a
    server sends and must be told ``protocol_version`` unless it learns it
    from the CONNACK. ``max_packet_size`` bounds the whole packet (fixed
    header included) and is checked as soon as the fixed header is read.
    After a :class:`ProtocolError` the decoder only raises it again.

    Memory: the bytes of an incomplete packet are held in a bytearray made when
    a read ends inside a packet and dropped once it completes (None otherwise),
    so an idle connection's decoder holds no buffer. A broker channel with no
    incomplete packet holds no decoder at all: it reads through one shared
    decoder per protocol level (:meth:`for_connection`) and takes its own
    (:meth:`detach`) only when a read ends inside a packet.
    """

    def __init__(self, bint server_side=True, Py_ssize_t max_packet_size=268435460):
        self.server_side = server_side
        self.max_packet_size = max_packet_size
        self.protocol_version = 0
        self._connected = False
        self._error = None

    @staticmethod
    def for_connection(int protocol_version, Py_ssize_t max_packet_size):
        """A server-side decoder past CONNECT, for ``protocol_version`` (3, 4 or 5)."""
        cdef Decoder d = Decoder(True, max_packet_size)
        d.protocol_version = protocol_version
        d._connected = True
        return d

    def detach(self):
        """A new decoder with this one's settings and its incomplete packet's bytes;
        this one keeps none (a shared decoder hands a connection what is its own)."""
        cdef Decoder d = Decoder(self.server_side, self.max_packet_size)
        d.protocol_version = self.protocol_version
        d._connected = self._connected
        d._error = self._error
        d._buf = self._buf
        self._buf = None
        return d

    def reset(self):
        """Forget the bytes held and a failure (a shared decoder, after a bad read)."""
        self._buf = None
        self._error = None

    @property
    def buffered(self):
        """Number of bytes held back as the start of an incomplete packet."""
        return 0 if self._buf is None else PyByteArray_GET_SIZE(self._buf)

    def feed(self, data):
        """Decode ``data`` (bytes-like) and return the list of packets it completed."""
        cdef Py_buffer view
        cdef Py_ssize_t used, size
        cdef list out = []
        if self._error is not None:
            raise ProtocolError(*self._error)
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if self._buf is None:
                # Common case: parse straight from the caller's buffer and keep
                # only the tail of an incomplete packet.
                used = self._parse(<const unsigned char*>view.buf, view.len, out)
                if used < view.len:
                    self._buf = PyByteArray_FromStringAndSize(
                        <const char*>view.buf + used, view.len - used)
            else:
                _append(self._buf, <const unsigned char*>view.buf, view.len)
                size = PyByteArray_GET_SIZE(self._buf)
                used = self._parse(<const unsigned char*>PyByteArray_AS_STRING(self._buf),
                                   size, out)
                if used == size:
                    self._buf = None  # nothing incomplete: no buffer held
                elif used:
                    # Deleting a bytearray's prefix only moves its start offset.
                    del self._buf[:used]
        except ProtocolError as exc:
            self._error = (str(exc), exc.reason_code)
            self._buf = None
            # The complete packets before the malformed one, in order: the caller
            # handles them before closing, so how TCP split the bytes changes nothing.
            exc.packets = out
            raise
        finally:
            PyBuffer_Release(&view)
        return out

    cdef Py_ssize_t _parse(self, const unsigned char* p, Py_ssize_t n, list out) except -1:
        """Decode the complete packets at the start of p[:n]; return the bytes consumed."""
        cdef Py_ssize_t pos = 0, i, rl, total
        cdef int first, b, shift
        while pos < n:
            first = p[pos]
            self._check_type(first)
            i = pos + 1
            rl = 0
            shift = 0
            while True:
                if i >= n:
                    return pos
                b = p[i]
                i += 1
                rl |= <Py_ssize_t>(b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
                if shift == 28:
                    _fail("remaining length longer than 4 bytes "
                          + _cite(self.protocol_version, "[MQTT-5.0 §1.5.5]",
                                  "[MQTT-3.1.1 §2.2.3]"), RC_MALFORMED_PACKET)
            total = i - pos + rl
            if total > self.max_packet_size:
                cite = "[MQTT-3.2.2-15]" if self.server_side else "[MQTT-3.1.2-24]"
                _fail(f"{_TYPE_NAMES[first >> 4]} of {total} bytes exceeds the maximum packet "
                      f"size {self.max_packet_size} {cite}", RC_PACKET_TOO_LARGE)
            if n - i < rl:
                return pos
            out.append(self._decode(first, p + i, rl))
            pos = i + rl
        return pos

    cdef int _check_type(self, int first) except -1:
        """Checks that need only the first byte: type, direction, order, flags."""
        cdef int t = first >> 4, f = first & 0x0F, v = self.protocol_version
        if t == 0:
            _fail("packet type 0 is reserved "
                  + _cite(v, "[MQTT-5.0 §2.1.2]", "[MQTT-3.1.1 §2.2.1]"), RC_MALFORMED_PACKET)
        if t == PT_AUTH and 0 < v < 5:
            _fail("packet type 15 is reserved in MQTT 3.1.1 [MQTT-3.1.1 §2.2.1]",
                  RC_MALFORMED_PACKET)
        if self.server_side:
            if t == PT_CONNACK or t == PT_SUBACK or t == PT_UNSUBACK or t == PT_PINGRESP:
                _fail(f"{_TYPE_NAMES[t]} is sent only by a server [MQTT-5.0 §2.1.2]", RC_PROTOCOL_ERROR)
            if not self._connected:
                if t != PT_CONNECT:
                    _fail(f"first packet must be CONNECT, got {_TYPE_NAMES[t]} [MQTT-3.1.0-1]",
                          RC_PROTOCOL_ERROR)
            elif t == PT_CONNECT:
                _fail("a second CONNECT is a protocol error [MQTT-3.1.0-2]", RC_PROTOCOL_ERROR)
        else:
            if t == PT_CONNECT or t == PT_SUBSCRIBE or t == PT_UNSUBSCRIBE or t == PT_PINGREQ:
                _fail(f"{_TYPE_NAMES[t]} is sent only by a client [MQTT-5.0 §2.1.2]", RC_PROTOCOL_ERROR)
            if v == 0 and t != PT_CONNACK and t != PT_AUTH:
                _fail(f"first packet from the server must be CONNACK, got {_TYPE_NAMES[t]} "
                      "[MQTT-3.2.0-1]", RC_PROTOCOL_ERROR)
            if t == PT_DISCONNECT and 0 < v < 5:
                _fail("an MQTT 3.1.1 server does not send DISCONNECT [MQTT-3.1.1 §3.14]",
                      RC_PROTOCOL_ERROR)
        if t == PT_PUBLISH:
            if f & 0x06 == 0x06:
                _fail("PUBLISH must not have both QoS bits set [MQTT-3.3.1-4]",
                      RC_MALFORMED_PACKET)
        elif t == PT_PUBREL or t == PT_SUBSCRIBE or t == PT_UNSUBSCRIBE:
            if f != 0x02:
                cite = ("[MQTT-3.6.1-1]" if t == PT_PUBREL
                        else "[MQTT-3.8.1-1]" if t == PT_SUBSCRIBE else "[MQTT-3.10.1-1]")
                _fail(f"reserved flags in {_TYPE_NAMES[t]} must be 0010 {cite}", RC_MALFORMED_PACKET)
        elif f != 0:
            if t == PT_DISCONNECT:
                cite = "[MQTT-3.14.1-1]"
            elif t == PT_AUTH:
                cite = "[MQTT-3.15.1-1]"
            else:
                cite = _cite(v, "[MQTT-2.1.3-1]", "[MQTT-2.2.2-1]")
            _fail(f"reserved flags in {_TYPE_NAMES[t]} must be 0000 {cite}", RC_MALFORMED_PACKET)
        return 0

    cdef object _decode(self, int first, const unsigned char* body, Py_ssize_t n):
        cdef Reader r
        cdef int t = first >> 4
        r.p = body
        r.pos = 0
        r.end = n
        r.version = self.protocol_version if self.protocol_version else MQTT_V5
        r.server_side = self.server_side
        if t == PT_PUBLISH:  # the hot path first
            packet = self._publish(&r, first & 0x0F)
        elif PT_PUBACK <= t <= PT_PUBCOMP:
            packet = self._puback(&r, t)
        elif t == PT_CONNECT:
            packet = self._connect(&r)
        elif t == PT_CONNACK:
            packet = self._connack(&r)
        elif t == PT_SUBSCRIBE:
            packet = self._subscribe(&r)
        elif t == PT_SUBACK:
            packet = self._suback(&r)
        elif t == PT_UNSUBSCRIBE:
            packet = self._unsubscribe(&r)
        elif t == PT_UNSUBACK:
            packet = self._unsuback(&r)
        elif t == PT_PINGREQ:
            packet = Pingreq.__new__(Pingreq)
        elif t == PT_PINGRESP:
            packet = Pingresp.__new__(Pingresp)
        elif t == PT_DISCONNECT:
            packet = self._disconnect(&r)
        else:
            packet = self._auth(&r)
        if r.pos != r.end:
            _fail(f"remaining length {n} is longer than the {_TYPE_NAMES[t]} it holds "
                  f"({r.pos} bytes) {_len_section(r.version)}", RC_MALFORMED_PACKET)
        if t == PT_CONNECT:
            self._connected = True
        return packet

    cdef Publish _publish(self, Reader* r, int flags):
        cdef Publish p = Publish.__new__(Publish)
        cdef int qos = (flags >> 1) & 3
        cdef int n = _u16(r)
        cdef const unsigned char* t
        cdef const char* last
        cdef Py_ssize_t i, last_len = 0
        cdef unsigned char c
        cdef str topic = self._last_topic
        _need(r, n)
        t = r.p + r.pos
        # A connection mostly publishes to a few topics: when the bytes are those
        # of the previous PUBLISH, reuse its (already validated) str.
        if topic is not None:
            last = PyUnicode_AsUTF8AndSize(topic, &last_len)
            if last_len != n or memcmp(last, t, n) != 0:
                topic = None
        if topic is None:
            # One pass for U+0000 and the wildcards: they are ASCII, and no byte
            # of a multi-byte UTF-8 sequence is ASCII, so the raw bytes tell.
            for i in range(n):
                c = t[i]
                if c == 43 or c == 35:  # '+' or '#'
                    _fail("the Topic Name in a PUBLISH must not contain wildcard characters "
                          "[MQTT-3.3.2-2]", RC_TOPIC_NAME_INVALID)
                if c == 0:
                    _nul(r)
            topic = _decode_utf8(r, t, n)
            self._last_topic = topic
        p.topic = topic
        r.pos += n
        p.qos = qos
        p.retain = flags & 1
        p.dup = (flags >> 3) & 1
        p.packet_id = _packet_id(r, PT_PUBLISH) if qos else 0
        if r.version == MQTT_V5:
            p.properties = _props(r, PT_PUBLISH)
            if n == 0 and PROP_TOPIC_ALIAS not in p.properties:
                _fail("a zero-length Topic Name needs a Topic Alias [MQTT-4.7.3-1] "
                      "[MQTT-5.0 §3.3.2.3.4]", RC_PROTOCOL_ERROR)
        else:
            p.properties = {}
            if n == 0:
                _fail("a Topic Name must be at least one character long [MQTT-4.7.3-1]",
                      RC_PROTOCOL_ERROR)
        p.payload = PyBytes_FromStringAndSize(<const char*>r.p + r.pos, r.end - r.pos)
        r.pos = r.end
        return p

    cdef PubAck _puback(self, Reader* r, int ptype):
        cdef PubAck p = PubAck.__new__(PubAck)
        p.packet_type = ptype
        p.packet_id = _packet_id(r, ptype)
        p.reason_code = 0
        # v5: "the Reason Code and Property Length can be omitted if the Reason
        # Code is 0x00 and there are no Properties" (remaining length 2 or 3).
        if r.version == MQTT_V5 and r.pos < r.end:
            p.reason_code = _u8(r)
            if r.pos < r.end:
                p.properties = _props(r, ptype)
                return p
        p.properties = {}
        return p

    cdef Connect _connect(self, Reader* r):
        cdef Connect c = Connect.__new__(Connect)
        cdef int level, flags, will_qos
        cdef Will will
        name = _str(r)
        level = _u8(r)
        if not (name == "MQTT" and (level == MQTT_V311 or level == MQTT_V5)
                or name == "MQIsdp" and level == MQTT_V31):
            if name != "MQTT" and name != "MQIsdp":
                _fail(f"unsupported protocol name {name!r} [MQTT-3.1.2-1]",
                      RC_UNSUPPORTED_PROTOCOL_VERSION)
            _fail(f"unsupported protocol level {level} for {name!r} [MQTT-3.1.2-2]",
                  RC_UNSUPPORTED_PROTOCOL_VERSION)
        # Known from here on, even if the rest of the CONNECT is malformed: the
        # server then answers in the client's version.
        self.protocol_version = level
        r.version = level
        c.protocol_name = name
        c.protocol_level = level
        flags = _u8(r)
        if flags & 0x01:
            _fail("reserved flag in CONNECT must be 0 [MQTT-3.1.2-3]", RC_MALFORMED_PACKET)
        will_qos = (flags >> 3) & 3
        if not flags & 0x04:
            if will_qos:
                _fail("Will QoS must be 0 when the Will Flag is 0 "
                      + _cite(level, "[MQTT-3.1.2-11]", "[MQTT-3.1.2-13]"), RC_PROTOCOL_ERROR)
            if flags & 0x20:
                _fail("Will Retain must be 0 when the Will Flag is 0 "
                      + _cite(level, "[MQTT-3.1.2-13]", "[MQTT-3.1.2-15]"), RC_PROTOCOL_ERROR)
        elif will_qos == 3:
            _fail("Will QoS must not be 3 "
                  + _cite(level, "[MQTT-3.1.2-12]", "[MQTT-3.1.2-14]"), RC_MALFORMED_PACKET)
        if level < MQTT_V5 and flags & 0x40 and not flags & 0x80:
            _fail("the Password Flag must be 0 when the User Name Flag is 0 [MQTT-3.1.2-22]",
                  RC_PROTOCOL_ERROR)
        c.clean_start = flags & 0x02
        c.keepalive = _u16(r)
        c.properties = _props(r, PT_CONNECT) if level == MQTT_V5 else {}
        c.client_id = _str(r)
        c.will = None
        if flags & 0x04:
            will = Will.__new__(Will)
            will.properties = _props(r, 0) if level == MQTT_V5 else {}
            will.topic = _str(r)
            will.payload = _bin(r)
            will.qos = will_qos
            will.retain = flags & 0x20
            c.will = will
        c.username = _str(r) if flags & 0x80 else None
        c.password = _bin(r) if flags & 0x40 else None
        return c

    cdef Connack _connack(self, Reader* r):
        # A CONNACK's form tells its version: 3.1.1 has exactly two bytes, 5.0
        # always a property length. A v5 client may get a 3.1.1 refusal.
        cdef Connack c = Connack.__new__(Connack)
        cdef int flags = _u8(r)
        cdef int version = MQTT_V311 if r.end == 2 else MQTT_V5
        if flags & 0xFE:
            _fail("reserved bits of the CONNACK acknowledge flags must be 0 [MQTT-3.2.2-1]",
                  RC_MALFORMED_PACKET)
        c.session_present = flags & 1
        c.reason_code = _u8(r)
        r.version = version
        c.properties = _props(r, PT_CONNACK) if version == MQTT_V5 else {}
        if self.protocol_version == 0:
            self.protocol_version = version
        return c

    cdef Subscribe _subscribe(self, Reader* r):
        cdef Subscribe s = Subscribe.__new__(Subscribe)
        cdef list subs = []
        cdef int o, qos, rh
        cdef bint v5 = r.version == MQTT_V5
        s.packet_id = _packet_id(r, PT_SUBSCRIBE)
        s.properties = _props(r, PT_SUBSCRIBE) if v5 else {}
        while r.pos < r.end:
            topic_filter = _str(r)
            o = _u8(r)
            qos = o & 3
            rh = (o >> 4) & 3
            if v5:
                if o & 0xC0:
                    _fail("reserved bits of the Subscription Options must be 0 [MQTT-3.8.3-5]",
                          RC_MALFORMED_PACKET)
                if qos == 3:
                    _fail("Maximum QoS 3 in the Subscription Options [MQTT-5.0 §3.8.3.1]",
                          RC_PROTOCOL_ERROR)
                if rh == 3:
                    _fail("Retain Handling 3 in the Subscription Options [MQTT-5.0 §3.8.3.1]",
                          RC_PROTOCOL_ERROR)
                if o & 0x04 and topic_filter.startswith("$share/"):
                    _fail("No Local must not be set on a Shared Subscription [MQTT-3.8.3-4]",
                          RC_PROTOCOL_ERROR)
            elif o & 0xFC or qos == 3:
                # The 3.1.1 specification spells this identifier with a dash.
                _fail("reserved bits of the requested QoS byte must be 0 and QoS must not be 3 "
                      "[MQTT-3-8.3-4]", RC_MALFORMED_PACKET)
            subs.append((topic_filter, qos, (o >> 2) & 1 == 1, (o >> 3) & 1 == 1, rh))
        if not subs:
            _fail("SUBSCRIBE must contain at least one topic filter "
                  + _cite(r.version, "[MQTT-3.8.3-2]", "[MQTT-3.8.3-3]"), RC_PROTOCOL_ERROR)
        s.subscriptions = subs
        return s

    cdef Suback _suback(self, Reader* r):
        cdef Suback s = Suback.__new__(Suback)
        s.packet_id = _packet_id(r, PT_SUBACK)
        s.properties = _props(r, PT_SUBACK) if r.version == MQTT_V5 else {}
        s.reason_codes = _rest_as_list(r)
        return s

    cdef Unsubscribe _unsubscribe(self, Reader* r):
        cdef Unsubscribe u = Unsubscribe.__new__(Unsubscribe)
        cdef list filters = []
        u.packet_id = _packet_id(r, PT_UNSUBSCRIBE)
        u.properties = _props(r, PT_UNSUBSCRIBE) if r.version == MQTT_V5 else {}
        while r.pos < r.end:
            filters.append(_str(r))
        if not filters:
            _fail("UNSUBSCRIBE must contain at least one topic filter [MQTT-3.10.3-2]",
                  RC_PROTOCOL_ERROR)
        u.topic_filters = filters
        return u

    cdef Unsuback _unsuback(self, Reader* r):
        cdef Unsuback u = Unsuback.__new__(Unsuback)
        u.packet_id = _packet_id(r, PT_UNSUBACK)
        if r.version == MQTT_V5:
            u.properties = _props(r, PT_UNSUBACK)
            u.reason_codes = _rest_as_list(r)
        else:
            u.properties = {}
            u.reason_codes = []
        return u

    cdef Disconnect _disconnect(self, Reader* r):
        cdef Disconnect d = Disconnect.__new__(Disconnect)
        d.reason_code = 0
        if r.version == MQTT_V5 and r.pos < r.end:
            d.reason_code = _u8(r)
            if r.pos < r.end:
                d.properties = _props(r, PT_DISCONNECT)
                return d
        d.properties = {}
        return d

    cdef Auth _auth(self, Reader* r):
        cdef Auth a = Auth.__new__(Auth)
        a.reason_code = 0
        if r.pos < r.end:
            a.reason_code = _u8(r)
            if r.pos < r.end:
                a.properties = _props(r, PT_AUTH)
                return a
        a.properties = {}
        return a


# ------------------------------------------------------------------ encoders
#
# Each packet body is produced by one routine run twice over a Writer: first
# with no buffer to measure it, then into the bytes object allocated at the
# exact size. Fixed header + body is therefore one allocation and no
# per-field concatenation.

cdef inline void _w_u8(Writer* w, unsigned int v) noexcept:
    if w.buf != NULL:
        w.buf[w.pos] = <char>v
    w.pos += 1


cdef inline void _w_u16(Writer* w, unsigned int v) noexcept:
    if w.buf != NULL:
        w.buf[w.pos] = <char>(v >> 8)
        w.buf[w.pos + 1] = <char>v
    w.pos += 2


cdef inline void _w_u32(Writer* w, unsigned long long v) noexcept:
    if w.buf != NULL:
        w.buf[w.pos] = <char>(v >> 24)
        w.buf[w.pos + 1] = <char>(v >> 16)
        w.buf[w.pos + 2] = <char>(v >> 8)
        w.buf[w.pos + 3] = <char>v
    w.pos += 4


cdef inline int _vbi_len(Py_ssize_t v) noexcept:
    return 1 if v < 128 else 2 if v < 16384 else 3 if v < 2097152 else 4


cdef inline void _w_vbi(Writer* w, Py_ssize_t v) noexcept:
    cdef int b
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            _w_u8(w, b | 0x80)
        else:
            _w_u8(w, b)
            return


cdef inline void _w_raw(Writer* w, const char* p, Py_ssize_t n) noexcept:
    if w.buf != NULL and n:
        memcpy(w.buf + w.pos, p, n)
    w.pos += n


cdef int _w_str(Writer* w, object s, str what) except -1:
    cdef Py_ssize_t n = 0
    cdef const char* p
    if not isinstance(s, str):
        raise TypeError(f"{what} must be str, not {type(s).__name__}")
    p = PyUnicode_AsUTF8AndSize(s, &n)
    if n > 65535:
        raise ValueError(f"{what} is longer than 65535 bytes of UTF-8")
    _w_u16(w, <unsigned int>n)
    _w_raw(w, p, n)
    return 0


cdef int _w_bin(Writer* w, object b, str what) except -1:
    cdef Py_buffer view
    if isinstance(b, bytes):
        if PyBytes_GET_SIZE(b) > 65535:
            raise ValueError(f"{what} is longer than 65535 bytes")
        _w_u16(w, <unsigned int>PyBytes_GET_SIZE(b))
        _w_raw(w, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
        return 0
    PyObject_GetBuffer(b, &view, PyBUF_SIMPLE)
    try:
        if view.len > 65535:
            raise ValueError(f"{what} is longer than 65535 bytes")
        _w_u16(w, <unsigned int>view.len)
        _w_raw(w, <const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef long long _int_in(object value, long long lo, long long hi, str what) except? -1:
    cdef long long v = value
    if v < lo or v > hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, got {v}")
    return v


cdef int _w_props_body(Writer* w, dict props) except -1:
    cdef int pid, kind
    cdef long long iv
    for key, value in props.items():
        pid = key
        if pid < 0 or pid > PROP_MAX_ID or _prop_kind[pid] == K_NONE:
            raise ValueError(f"unknown property identifier {key!r}")
        kind = _prop_kind[pid]
        name = _PROP_NAMES[pid]
        if kind == K_PAIR:
            for pair in value:
                k, v = pair
                _w_u8(w, pid)
                _w_str(w, k, name)
                _w_str(w, v, name)
        elif kind == K_STR:
            _w_u8(w, pid)
            _w_str(w, value, name)
        elif kind == K_BIN:
            _w_u8(w, pid)
            _w_bin(w, value, name)
        elif kind == K_VBI:
            # Subscription Identifier: a list (several in a server's PUBLISH) or one int.
            for v in (value if isinstance(value, (list, tuple)) else (value,)):
                _w_u8(w, pid)
                _w_vbi(w, <Py_ssize_t>_int_in(v, 1, MAX_VBI, name))
        else:
            _w_u8(w, pid)
            iv = _int_in(value, 0, _KIND_MAX[kind], name)
            if kind == K_BYTE:
                _w_u8(w, <unsigned int>iv)
            elif kind == K_U16:
                _w_u16(w, <unsigned int>iv)
            else:
                _w_u32(w, <unsigned long long>iv)
    return 0


cdef int _w_props(Writer* w, dict props) except -1:
    """Property Length followed by the properties (length 0 for None or {})."""
    cdef Writer m
    if not props:
        _w_u8(w, 0)
        return 0
    m.buf = NULL
    m.pos = 0
    _w_props_body(&m, props)
    if m.pos > MAX_VBI:
        raise ValueError("properties longer than a variable byte integer can express")
    _w_vbi(w, m.pos)
    if w.buf == NULL:
        w.pos += m.pos
    else:
        _w_props_body(w, props)
    return 0


cdef int _check_version(int version) except -1:
    if version != MQTT_V31 and version != MQTT_V311 and version != MQTT_V5:
        raise ValueError(f"protocol_version must be 3, 4 or 5, got {version}")
    return 0


cdef int _w_ack(Writer* w, PubAck a, bint v5) except -1:
    cdef int t = a.packet_type
    if t < PT_PUBACK or t > PT_PUBCOMP:
        raise ValueError(f"PubAck.packet_type must be 4..7, got {t}")
    _w_u16(w, _int_in(a.packet_id, 0, 65535, "packet_id"))
    # v5 may omit the reason code when it is 0 and there are no properties.
    if v5 and (a.properties or a.reason_code):
        _w_u8(w, _int_in(a.reason_code, 0, 255, "reason_code"))
        if a.properties:
            _w_props(w, a.properties)
    return (t << 4) | (2 if t == PT_PUBREL else 0)


cdef int _w_connack(Writer* w, Connack c, bint v5) except -1:
    _w_u8(w, 1 if c.session_present else 0)
    # Under 3.1.1 reason_code is the return code: the broker maps it.
    _w_u8(w, _int_in(c.reason_code, 0, 255, "reason_code"))
    if v5:
        _w_props(w, c.properties)
    return PT_CONNACK << 4


cdef int _w_subscribe(Writer* w, Subscribe p, bint v5) except -1:
    cdef int options
    if not p.subscriptions:
        raise ValueError("SUBSCRIBE needs at least one subscription")
    _w_u16(w, _int_in(p.packet_id, 0, 65535, "packet_id"))
    if v5:
        _w_props(w, p.properties)
    for topic_filter, qos, no_local, retain_as_published, retain_handling in p.subscriptions:
        _w_str(w, topic_filter, "topic filter")
        options = _int_in(qos, 0, 2, "subscription QoS")
        if v5:
            options |= (4 if no_local else 0) | (8 if retain_as_published else 0)
            options |= _int_in(retain_handling, 0, 2, "retain handling") << 4
        _w_u8(w, options)
    return (PT_SUBSCRIBE << 4) | 2


cdef int _w_unsubscribe(Writer* w, Unsubscribe p, bint v5) except -1:
    if not p.topic_filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    _w_u16(w, _int_in(p.packet_id, 0, 65535, "packet_id"))
    if v5:
        _w_props(w, p.properties)
    for topic_filter in p.topic_filters:
        _w_str(w, topic_filter, "topic filter")
    return (PT_UNSUBSCRIBE << 4) | 2


cdef int _w_suback(Writer* w, int ptype, int packet_id, list codes, dict props,
                   bint v5) except -1:
    """SUBACK or UNSUBACK: packet id, [properties], reason codes."""
    cdef int code
    _w_u16(w, _int_in(packet_id, 0, 65535, "packet_id"))
    if v5:
        _w_props(w, props)
    if v5 or ptype == PT_SUBACK:  # a 3.1.1 UNSUBACK has no payload
        for value in codes:
            code = _int_in(value, 0, 255, "reason code")
            # 3.1.1 knows only 0x80 as a failure return code [MQTT-3.9.3-2].
            _w_u8(w, 0x80 if not v5 and code >= 0x80 else code)
    return ptype << 4


cdef int _w_reason(Writer* w, int ptype, int code, dict props, bint v5) except -1:
    """DISCONNECT or AUTH: v5 omits reason code 0 with no properties (length 0)."""
    if v5 and (props or code):
        _w_u8(w, _int_in(code, 0, 255, "reason_code"))
        if props:
            _w_props(w, props)
    return ptype << 4


cdef int _w_connect(Writer* w, Connect c, bint v5) except -1:
    cdef Will will = c.will
    cdef int flags
    if (c.protocol_level == MQTT_V5) != v5:
        raise ValueError(f"protocol_level {c.protocol_level} does not match the protocol version")
    if not v5 and c.password is not None and c.username is None:
        raise ValueError("MQTT 3.1.1 allows no password without a user name [MQTT-3.1.2-22]")
    flags = 0x02 if c.clean_start else 0
    if will is not None:
        flags |= 0x04 | (_int_in(will.qos, 0, 2, "Will QoS") << 3) | (0x20 if will.retain else 0)
    if c.username is not None:
        flags |= 0x80
    if c.password is not None:
        flags |= 0x40
    _w_str(w, c.protocol_name, "protocol_name")
    _w_u8(w, _int_in(c.protocol_level, 0, 255, "protocol_level"))
    _w_u8(w, flags)
    _w_u16(w, _int_in(c.keepalive, 0, 65535, "keepalive"))
    if v5:
        _w_props(w, c.properties)
    _w_str(w, c.client_id, "client_id")
    if will is not None:
        if v5:
            _w_props(w, will.properties)
        _w_str(w, will.topic, "Will topic")
        _w_bin(w, will.payload, "Will payload")
    if c.username is not None:
        _w_str(w, c.username, "username")
    if c.password is not None:
        _w_bin(w, c.password, "password")
    return PT_CONNECT << 4


cdef int _w_body(Writer* w, object packet, int version) except -1:
    """Write (or measure) the body of any packet but PUBLISH; return its first byte."""
    cdef bint v5 = version == MQTT_V5
    tp = type(packet)
    if tp is PubAck:
        return _w_ack(w, <PubAck>packet, v5)
    if tp is Connack:
        return _w_connack(w, <Connack>packet, v5)
    if tp is Subscribe:
        return _w_subscribe(w, <Subscribe>packet, v5)
    if tp is Suback:
        return _w_suback(w, PT_SUBACK, (<Suback>packet).packet_id,
                         (<Suback>packet).reason_codes, (<Suback>packet).properties, v5)
    if tp is Unsubscribe:
        return _w_unsubscribe(w, <Unsubscribe>packet, v5)
    if tp is Unsuback:
        return _w_suback(w, PT_UNSUBACK, (<Unsuback>packet).packet_id,
                         (<Unsuback>packet).reason_codes, (<Unsuback>packet).properties, v5)
    if tp is Pingreq:
        return PT_PINGREQ << 4
    if tp is Pingresp:
        return PT_PINGRESP << 4
    if tp is Disconnect:
        return _w_reason(w, PT_DISCONNECT, (<Disconnect>packet).reason_code,
                         (<Disconnect>packet).properties, v5)
    if tp is Auth:
        if not v5:
            raise ValueError("AUTH exists only in MQTT 5")
        return _w_reason(w, PT_AUTH, (<Auth>packet).reason_code, (<Auth>packet).properties, v5)
    if tp is Connect:
        return _w_connect(w, <Connect>packet, v5)
    raise TypeError(f"cannot encode {tp.__name__}")


cdef bytes _encode_publish(str topic, object payload, int qos, bint retain, bint dup,
                           int packet_id, dict properties, int version):
    cdef Py_ssize_t tlen = 0, plen, body, props_len = 0
    cdef const char* t
    cdef const char* pl
    cdef Py_buffer view
    cdef bint have_view = False
    cdef Writer w
    cdef bytes out
    _check_version(version)
    if topic is None:
        raise TypeError("topic must be str, not None")
    if qos < 0 or qos > 2:
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    if packet_id < 0 or packet_id > 65535:
        raise ValueError(f"packet_id must be in 0..65535, got {packet_id}")
    t = PyUnicode_AsUTF8AndSize(topic, &tlen)
    if tlen > 65535:
        raise ValueError("topic is longer than 65535 bytes of UTF-8")
    if isinstance(payload, bytes):
        pl = PyBytes_AS_STRING(payload)
        plen = PyBytes_GET_SIZE(payload)
    else:
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        have_view = True
        pl = <const char*>view.buf
        plen = view.len
    try:
        body = 2 + tlen + (2 if qos else 0) + plen
        if version == MQTT_V5:
            if properties:
                w.buf = NULL
                w.pos = 0
                _w_props(&w, properties)
                props_len = w.pos
            else:
                props_len = 1
            body += props_len
        if body > MAX_VBI:
            raise ValueError(f"PUBLISH of {body} bytes exceeds the maximum remaining length")
        out = PyBytes_FromStringAndSize(NULL, 1 + _vbi_len(body) + body)
        w.buf = PyBytes_AS_STRING(out)
        w.pos = 0
        _w_u8(&w, (PT_PUBLISH << 4) | (8 if dup else 0) | (qos << 1) | (1 if retain else 0))
        _w_vbi(&w, body)
        _w_u16(&w, <unsigned int>tlen)
        _w_raw(&w, t, tlen)
        if qos:
            _w_u16(&w, packet_id)
        if version == MQTT_V5:
            _w_props(&w, properties)
        _w_raw(&w, pl, plen)
    finally:
        if have_view:
            PyBuffer_Release(&view)
    return out


def encode_publish(str topic, payload, int qos, bint retain, bint dup, int packet_id,
                   dict properties, int protocol_version):
    """Encode one PUBLISH; ``properties`` (may be None) are written only for version 5."""
    return _encode_publish(topic, payload, qos, retain, dup, packet_id, properties,
                           protocol_version)


def encode_ack(int packet_type, int packet_id, int reason_code, int protocol_version):
    """Encode PUBACK (4), PUBREC (5), PUBREL (6) or PUBCOMP (7).

    Under version 5 the reason code byte is omitted when it is 0, as the
    specification allows; under 3.1.1 there is no reason code at all.
    """
    cdef bytes out
    cdef char* p
    cdef bint rc = protocol_version == MQTT_V5 and reason_code != 0
    _check_version(protocol_version)
    if packet_type < PT_PUBACK or packet_type > PT_PUBCOMP:
        raise ValueError(f"packet_type must be 4..7, got {packet_type}")
    if packet_id < 0 or packet_id > 65535:
        raise ValueError(f"packet_id must be in 0..65535, got {packet_id}")
    if reason_code < 0 or reason_code > 255:
        raise ValueError(f"reason_code must be in 0..255, got {reason_code}")
    out = PyBytes_FromStringAndSize(NULL, 5 if rc else 4)
    p = PyBytes_AS_STRING(out)
    p[0] = <char>((packet_type << 4) | (2 if packet_type == PT_PUBREL else 0))
    p[1] = 3 if rc else 2
    p[2] = <char>(packet_id >> 8)
    p[3] = <char>packet_id
    if rc:
        p[4] = <char>reason_code
    return out


def encode(packet, int protocol_version):
    """Encode any packet object under ``protocol_version`` (3, 4 or 5).

    Under 3 and 4, properties and the reason codes 3.1.1 has no field for are
    dropped; a 3.1.1 SUBACK maps failure codes (>= 0x80) to 0x80 and a
    CONNACK's ``reason_code`` is written as the 3.1.1 return code unchanged.
    Values that cannot be encoded raise ValueError (TypeError for wrong types).
    """
    cdef Writer w
    cdef Py_ssize_t n
    cdef int first
    cdef bytes out
    cdef Publish p
    _check_version(protocol_version)
    if type(packet) is Publish:
        p = <Publish>packet
        return _encode_publish(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id,
                               p.properties, protocol_version)
    w.buf = NULL
    w.pos = 0
    first = _w_body(&w, packet, protocol_version)
    n = w.pos
    if n > MAX_VBI:
        raise ValueError(f"packet body of {n} bytes exceeds the maximum remaining length")
    out = PyBytes_FromStringAndSize(NULL, 1 + _vbi_len(n) + n)
    w.buf = PyBytes_AS_STRING(out)
    w.pos = 0
    _w_u8(&w, first)
    _w_vbi(&w, n)
    _w_body(&w, packet, protocol_version)
    if w.pos != PyBytes_GET_SIZE(out):  # only if the packet changed between the passes
        raise RuntimeError("packet changed while it was being encoded")
    return out
