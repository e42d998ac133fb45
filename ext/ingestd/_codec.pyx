# cython: language_level=3
"""Sans-IO MQTT 3.1.1 / 5.0 codec: bytes in, packets out; packets in, bytes out.

No sockets, no asyncio. :class:`Decoder` keeps partial input until a packet
completes and returns every complete packet of a ``feed``. Malformed input
raises :class:`ingestd.errors.ProtocolError` carrying the MQTT 5 reason code
and citing the normative statement broken. Every read from the input goes
through the bounds-checked ``_rd_*`` helpers, which raise on truncation.

The contract (classes, attributes, errors) is docs/codec.md.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcpy

from ingestd.errors import ProtocolError

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
TOPIC_NAME_INVALID = 0x90
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
UNSUPPORTED_PROTOCOL_VERSION = 0x84

cdef int MAX_VARINT = 268435455


cdef inline object _err(str msg, int code=0x81):
    return ProtocolError(msg, code)


# ---------------------------------------------------------------------------
# Property table (MQTT 5.0 section 2.2.2.2): kind and the packets allowing it.

cdef int _PROP_KIND[43]
cdef unsigned int _PROP_ALLOWED[43]
cdef object _PROP_NAMES = {}


cdef void _prop(int pid, int kind, unsigned int allowed, str name):
    _PROP_KIND[pid] = kind
    _PROP_ALLOWED[pid] = allowed
    _PROP_NAMES[pid] = name


cdef unsigned int B(int t):
    return 1u << t


for _i in range(43):
    _PROP_KIND[_i] = K_NONE
    _PROP_ALLOWED[_i] = 0

_prop(0x01, K_BYTE, B(T_PUBLISH) | B(WILL_BIT), "Payload Format Indicator")
_prop(0x02, K_U32, B(T_PUBLISH) | B(WILL_BIT), "Message Expiry Interval")
_prop(0x03, K_STR, B(T_PUBLISH) | B(WILL_BIT), "Content Type")
_prop(0x08, K_STR, B(T_PUBLISH) | B(WILL_BIT), "Response Topic")
_prop(0x09, K_BIN, B(T_PUBLISH) | B(WILL_BIT), "Correlation Data")
_prop(0x0B, K_VARINT, B(T_PUBLISH) | B(T_SUBSCRIBE), "Subscription Identifier")
_prop(0x11, K_U32, B(T_CONNECT) | B(T_CONNACK) | B(T_DISCONNECT), "Session Expiry Interval")
_prop(0x12, K_STR, B(T_CONNACK), "Assigned Client Identifier")
_prop(0x13, K_U16, B(T_CONNACK), "Server Keep Alive")
_prop(0x15, K_STR, B(T_CONNECT) | B(T_CONNACK) | B(T_AUTH), "Authentication Method")
_prop(0x16, K_BIN, B(T_CONNECT) | B(T_CONNACK) | B(T_AUTH), "Authentication Data")
_prop(0x17, K_BYTE, B(T_CONNECT), "Request Problem Information")
_prop(0x18, K_U32, B(WILL_BIT), "Will Delay Interval")
_prop(0x19, K_BYTE, B(T_CONNECT), "Request Response Information")
_prop(0x1A, K_STR, B(T_CONNACK), "Response Information")
_prop(0x1C, K_STR, B(T_CONNACK) | B(T_DISCONNECT), "Server Reference")
_prop(0x1F, K_STR, B(T_CONNACK) | B(T_PUBACK) | B(T_PUBREC) | B(T_PUBREL) | B(T_PUBCOMP)
      | B(T_SUBACK) | B(T_UNSUBACK) | B(T_DISCONNECT) | B(T_AUTH), "Reason String")
_prop(0x21, K_U16, B(T_CONNECT) | B(T_CONNACK), "Receive Maximum")
_prop(0x22, K_U16, B(T_CONNECT) | B(T_CONNACK), "Topic Alias Maximum")
_prop(0x23, K_U16, B(T_PUBLISH), "Topic Alias")
_prop(0x24, K_BYTE, B(T_CONNACK), "Maximum QoS")
_prop(0x25, K_BYTE, B(T_CONNACK), "Retain Available")
_prop(0x26, K_PAIR, B(T_CONNECT) | B(T_CONNACK) | B(T_PUBLISH) | B(WILL_BIT) | B(T_PUBACK)
      | B(T_PUBREC) | B(T_PUBREL) | B(T_PUBCOMP) | B(T_SUBSCRIBE) | B(T_SUBACK)
      | B(T_UNSUBSCRIBE) | B(T_UNSUBACK) | B(T_DISCONNECT) | B(T_AUTH), "User Property")
_prop(0x27, K_U32, B(T_CONNECT) | B(T_CONNACK), "Maximum Packet Size")
_prop(0x28, K_BYTE, B(T_CONNACK), "Wildcard Subscription Available")
_prop(0x29, K_BYTE, B(T_CONNACK), "Subscription Identifier Available")
_prop(0x2A, K_BYTE, B(T_CONNACK), "Shared Subscription Available")

cdef dict _PACKET_NAMES = {
    0: "Will", 1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

# ---------------------------------------------------------------------------
# Bounds-checked readers


cdef inline int _need(Reader* r, Py_ssize_t n, const char* what) except -1:
    if r.pos + n > r.end:
        raise _err(f"truncated {what.decode()}: remaining length too short [MQTT-2.1.4]")
    return 0


cdef inline int _rd_u8(Reader* r) except -1:
    _need(r, 1, b"byte")
    r.pos += 1
    return r.p[r.pos - 1]


cdef inline int _rd_u16(Reader* r) except -1:
    _need(r, 2, b"two byte integer")
    r.pos += 2
    return (r.p[r.pos - 2] << 8) | r.p[r.pos - 1]


cdef inline long long _rd_u32(Reader* r) except -1:
    _need(r, 4, b"four byte integer")
    r.pos += 4
    return ((<long long>r.p[r.pos - 4] << 24) | (r.p[r.pos - 3] << 16)
            | (r.p[r.pos - 2] << 8) | r.p[r.pos - 1])


cdef inline long long _rd_varint(Reader* r) except -1:
    cdef long long value = 0
    cdef int shift = 0
    cdef int b
    for i in range(4):
        b = _rd_u8(r)
        value |= <long long>(b & 0x7F) << shift
        if not (b & 0x80):
            if i > 0 and b == 0:
                # [MQTT-1.5.5-1] the minimum number of bytes must be used
                raise _err("variable byte integer not in its shortest form [MQTT-1.5.5-1]")
            return value
        shift += 7
    raise _err("variable byte integer longer than 4 bytes [MQTT-1.5.5]")


cdef str _decode_utf8(const unsigned char* p, Py_ssize_t n):
    if memchr(p, 0, n) != NULL:
        raise _err("UTF-8 string contains U+0000 [MQTT-1.5.4-2]")
    try:
        return PyUnicode_DecodeUTF8(<const char*>p, n, "strict")
    except UnicodeDecodeError:
        raise _err("ill-formed UTF-8 string [MQTT-1.5.4-1]") from None


cdef inline str _rd_str(Reader* r):
    cdef int n = _rd_u16(r)
    _need(r, n, b"UTF-8 string")
    r.pos += n
    return _decode_utf8(r.p + r.pos - n, n)


cdef inline bytes _rd_bin(Reader* r):
    cdef int n = _rd_u16(r)
    _need(r, n, b"binary data")
    r.pos += n
    return PyBytes_FromStringAndSize(<const char*>r.p + r.pos - n, n)


cdef dict _rd_props(Reader* r, int ptype, bint server_side):
    """Read a v5 property block for packet ``ptype`` (WILL_BIT for will properties)."""
    cdef long long length = _rd_varint(r)
    cdef dict props = {}
    if length == 0:
        return props
    _need(r, length, b"properties")
    cdef Py_ssize_t end = r.pos + length
    cdef Py_ssize_t saved_end = r.end
    r.end = end
    cdef long long pid
    cdef int kind
    cdef long long v
    cdef str where = _PACKET_NAMES[ptype]
    try:
        while r.pos < end:
            pid = _rd_varint(r)
            if pid <= 0 or pid > 0x2A or _PROP_KIND[pid] == K_NONE:
                raise _err(f"unknown property 0x{pid:02X} in {where} [MQTT-2.2.2-2]")
            if not (_PROP_ALLOWED[pid] & (1u << ptype)):
                raise _err(f"{_PROP_NAMES[pid]} is not allowed in {where} [MQTT-2.2.2-2]")
            kind = _PROP_KIND[pid]
            if kind == K_PAIR:
                k = _rd_str(r)
                val = _rd_str(r)
                lst = props.get(0x26)
                if lst is None:
                    props[0x26] = [(k, val)]
                else:
                    (<list>lst).append((k, val))
                continue
            if pid == 0x0B:
                v = _rd_varint(r)
                if v == 0:
                    raise _err("Subscription Identifier 0 [MQTT-3.8.2.1.2]", PROTOCOL_ERROR)
                lst = props.get(0x0B)
                if lst is None:
                    props[0x0B] = [<object>v]
                elif ptype == T_PUBLISH and not server_side:
                    (<list>lst).append(<object>v)
                else:
                    raise _err(f"Subscription Identifier more than once in {where} [MQTT-2.2.2-2]",
                               PROTOCOL_ERROR)
                continue
            if pid in props:
                raise _err(f"{_PROP_NAMES[pid]} more than once in {where} [MQTT-2.2.2-2]", PROTOCOL_ERROR)
            if kind == K_BYTE:
                v = _rd_u8(r)
                if v > 1:
                    raise _err(f"{_PROP_NAMES[pid]} must be 0 or 1, got {v} [MQTT-2.2.2.2]", PROTOCOL_ERROR)
                props[pid] = <object>v
            elif kind == K_U16:
                v = _rd_u16(r)
                if v == 0 and pid == 0x21:
                    raise _err("Receive Maximum 0 [MQTT-3.1.2.11.3]", PROTOCOL_ERROR)
                if v == 0 and pid == 0x23:
                    raise _err("Topic Alias 0 [MQTT-3.3.2-8]", TOPIC_ALIAS_INVALID)
                props[pid] = <object>v
            elif kind == K_U32:
                v = _rd_u32(r)
                if v == 0 and pid == 0x27:
                    raise _err("Maximum Packet Size 0 [MQTT-3.1.2.11.4]", PROTOCOL_ERROR)
                props[pid] = <object>v
            elif kind == K_STR:
                props[pid] = _rd_str(r)
            else:
                props[pid] = _rd_bin(r)
    finally:
        r.end = saved_end
    if r.pos != end:
        raise _err(f"property length of {where} does not match its properties [MQTT-2.2.2]")
    return props


# ---------------------------------------------------------------------------
# Packet classes


cdef class Packet:
    """Base of the packet classes: equality and repr over ``_fields``."""

    _fields = ()

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"

    __hash__ = None


cdef class Will:
    """The will carried by a CONNECT (not a packet of its own)."""

    _fields = ("topic", "payload", "qos", "retain", "properties")

    def __init__(self, str topic="", bytes payload=b"", int qos=0, bint retain=False, dict properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = {} if properties is None else properties

    def __eq__(self, other):
        if type(other) is not Will:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"Will({args})"

    __hash__ = None


cdef class Connect(Packet):
    packet_type = T_CONNECT
    _fields = ("protocol_name", "protocol_level", "clean_start", "keepalive", "client_id",
               "username", "password", "will", "properties")

    def __init__(self, str protocol_name="MQTT", int protocol_level=4, bint clean_start=True,
                 int keepalive=60, str client_id="", username=None, password=None, will=None,
                 dict properties=None):
        self.protocol_name = protocol_name
        self.protocol_level = protocol_level
        self.clean_start = clean_start
        self.keepalive = keepalive
        self.client_id = client_id
        self.username = username
        self.password = password
        self.will = will
        self.properties = {} if properties is None else properties


cdef class Connack(Packet):
    packet_type = T_CONNACK
    _fields = ("session_present", "reason_code", "properties")

    def __init__(self, bint session_present=False, int reason_code=0, dict properties=None):
        self.session_present = session_present
        self.reason_code = reason_code
        self.properties = {} if properties is None else properties


cdef class Publish(Packet):
    packet_type = T_PUBLISH
    _fields = ("topic", "payload", "qos", "retain", "dup", "packet_id", "properties")

    def __init__(self, str topic="", bytes payload=b"", int qos=0, bint retain=False, bint dup=False,
                 int packet_id=0, dict properties=None):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.packet_id = packet_id
        self.properties = {} if properties is None else properties


cdef class PubAck(Packet):
    """PUBACK, PUBREC, PUBREL or PUBCOMP, told apart by ``packet_type``."""

    _fields = ("packet_type", "packet_id", "reason_code", "properties")

    def __init__(self, int packet_type=T_PUBACK, int packet_id=0, int reason_code=0, dict properties=None):
        if packet_type < T_PUBACK or packet_type > T_PUBCOMP:
            raise ValueError(f"PubAck packet_type must be 4..7, not {packet_type}")
        self.packet_type = packet_type
        self.packet_id = packet_id
        self.reason_code = reason_code
        self.properties = {} if properties is None else properties


cdef class Subscribe(Packet):
    packet_type = T_SUBSCRIBE
    _fields = ("packet_id", "subscriptions", "properties")

    def __init__(self, int packet_id=0, list subscriptions=None, dict properties=None):
        self.packet_id = packet_id
        self.subscriptions = [] if subscriptions is None else subscriptions
        self.properties = {} if properties is None else properties


cdef class Suback(Packet):
    packet_type = T_SUBACK
    _fields = ("packet_id", "reason_codes", "properties")

    def __init__(self, int packet_id=0, list reason_codes=None, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = [] if reason_codes is None else reason_codes
        self.properties = {} if properties is None else properties


cdef class Unsubscribe(Packet):
    packet_type = T_UNSUBSCRIBE
    _fields = ("packet_id", "topic_filters", "properties")

    def __init__(self, int packet_id=0, list topic_filters=None, dict properties=None):
        self.packet_id = packet_id
        self.topic_filters = [] if topic_filters is None else topic_filters
        self.properties = {} if properties is None else properties


cdef class Unsuback(Packet):
    packet_type = T_UNSUBACK
    _fields = ("packet_id", "reason_codes", "properties")

    def __init__(self, int packet_id=0, list reason_codes=None, dict properties=None):
        self.packet_id = packet_id
        self.reason_codes = [] if reason_codes is None else reason_codes
        self.properties = {} if properties is None else properties


cdef class Pingreq(Packet):
    packet_type = T_PINGREQ


cdef class Pingresp(Packet):
    packet_type = T_PINGRESP


cdef class Disconnect(Packet):
    packet_type = T_DISCONNECT
    _fields = ("reason_code", "properties")

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = {} if properties is None else properties


cdef class Auth(Packet):
    packet_type = T_AUTH
    _fields = ("reason_code", "properties")

    def __init__(self, int reason_code=0, dict properties=None):
        self.reason_code = reason_code
        self.properties = {} if properties is None else properties


cdef Pingreq _PINGREQ_PACKET = Pingreq()
cdef Pingresp _PINGRESP_PACKET = Pingresp()
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"

# Fixed-header flags each packet type must carry [MQTT-2.1.3-1]; -1: PUBLISH (variable).
cdef int _REQUIRED_FLAGS[16]
_REQUIRED_FLAGS[:] = [0, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0]


# ---------------------------------------------------------------------------
# Decoder


cdef class Decoder:
    """Incremental decoder: ``feed(bytes) -> [packets]``. See docs/codec.md."""

    def __init__(self, bint server_side=True, Py_ssize_t max_packet_size=268435460):
        self._buf = bytearray()
        self._pos = 0
        self.protocol_version = 0
        self.max_packet_size = max_packet_size
        self.server_side = server_side
        self._seen_connect = False
        self._error = None

    def feed(self, data):
        """Decode every complete packet in the input so far; keep the rest."""
        cdef list out = []
        cdef Py_ssize_t used
        if self._error is not None:
            raise self._error
        if type(data) is not bytes and type(data) is not bytearray:
            data = bytes(data)
        try:
            if PyByteArray_GET_SIZE(self._buf) == 0:
                # Common case: nothing buffered, parse straight from the input.
                if type(data) is bytes:
                    used = self._parse(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), out)
                    if used < PyBytes_GET_SIZE(data):
                        self._buf += (<bytes>data)[used:]
                else:
                    used = self._parse(<const unsigned char*>PyByteArray_AS_STRING(data), PyByteArray_GET_SIZE(data), out)
                    if used < PyByteArray_GET_SIZE(data):
                        self._buf += (<bytearray>data)[used:]
            else:
                self._buf += data
                used = self._parse(<const unsigned char*>PyByteArray_AS_STRING(self._buf),
                                   PyByteArray_GET_SIZE(self._buf), out)
                del self._buf[:used]
        except ProtocolError as exc:
            self._error = exc
            raise
        return out

    cdef Py_ssize_t _parse(self, const unsigned char* data, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t i, remaining, total, hdr
        cdef int b, shift
        cdef bint complete
        while n - pos >= 2:
            remaining = 0
            shift = 0
            complete = False
            i = pos + 1
            while i < n and i - pos <= 4:
                b = data[i]
                remaining |= <Py_ssize_t>(b & 0x7F) << shift
                i += 1
                if not (b & 0x80):
                    complete = True
                    break
                shift += 7
            if not complete:
                if i - pos > 4:
                    raise _err("remaining length longer than 4 bytes [MQTT-1.5.5]")
                break  # header incomplete
            hdr = i - pos
            total = hdr + remaining
            if total > self.max_packet_size:
                raise _err(f"packet of {total} bytes exceeds the maximum packet size "
                           f"{self.max_packet_size} [MQTT-3.2.2-15]", PACKET_TOO_LARGE)
            if n - pos < total:
                break
            out.append(self._decode(data[pos], data + pos + hdr, remaining))
            pos += total
        return pos

    cdef object _decode(self, int first, const unsigned char* body, Py_ssize_t n):
        cdef int ptype = first >> 4
        cdef int flags = first & 0x0F
        cdef Reader r
        r.p = body
        r.pos = 0
        r.end = n
        if ptype == 0:
            raise _err("reserved packet type 0 [MQTT-2.1.2]")
        if _REQUIRED_FLAGS[ptype] >= 0 and flags != _REQUIRED_FLAGS[ptype]:
            raise _err(f"reserved flags of {_PACKET_NAMES[ptype]} must be "
                       f"{_REQUIRED_FLAGS[ptype]:04b}, got {flags:04b} [MQTT-2.1.3-1]")
        if self.server_side:
            if not self._seen_connect and ptype != T_CONNECT:
                raise _err("first packet must be CONNECT [MQTT-3.1.0-1]", PROTOCOL_ERROR)
            if ptype in (T_CONNACK, T_SUBACK, T_UNSUBACK, T_PINGRESP):
                raise _err(f"{_PACKET_NAMES[ptype]} is sent only by a server [MQTT-2.1.2]", PROTOCOL_ERROR)
        elif ptype in (T_CONNECT, T_SUBSCRIBE, T_UNSUBSCRIBE, T_PINGREQ):
            raise _err(f"{_PACKET_NAMES[ptype]} is sent only by a client [MQTT-2.1.2]", PROTOCOL_ERROR)
        if ptype == T_PUBLISH:
            pkt = self._publish(flags, &r)
        elif ptype == T_CONNECT:
            pkt = self._connect(flags, &r)
        elif T_PUBACK <= ptype <= T_PUBCOMP:
            pkt = self._puback(ptype, &r)
        elif ptype == T_SUBSCRIBE:
            pkt = self._subscribe(&r)
        elif ptype == T_UNSUBSCRIBE:
            pkt = self._unsubscribe(&r)
        elif ptype == T_PINGREQ or ptype == T_PINGRESP:
            if n:
                raise _err(f"{_PACKET_NAMES[ptype]} must have remaining length 0 [MQTT-3.12.1]")
            return _PINGREQ_PACKET if ptype == T_PINGREQ else _PINGRESP_PACKET
        elif ptype == T_CONNACK:
            pkt = self._connack(flags, &r)
        elif ptype == T_SUBACK:
            pkt = self._suback(&r)
        elif ptype == T_UNSUBACK:
            pkt = self._unsuback(&r)
        else:
            pkt = self._disconnect_or_auth(ptype, &r)
        if r.pos != r.end:
            raise _err(f"{_PACKET_NAMES[ptype]} has {r.end - r.pos} bytes beyond its content "
                       "[MQTT-2.1.4]")
        return pkt

    cdef Connect _connect(self, int flags, Reader* r):
        if self._seen_connect:
            # The broker treats a second CONNECT as a protocol error; decode it so it can say so.
            pass
        cdef Connect c = Connect.__new__(Connect)
        c.protocol_name = _rd_str(r)
        c.protocol_level = _rd_u8(r)
        if not ((c.protocol_name == "MQTT" and c.protocol_level in (4, 5))
                or (c.protocol_name == "MQIsdp" and c.protocol_level == 3)):
            raise _err(f"unsupported protocol {c.protocol_name!r} level {c.protocol_level} "
                       "[MQTT-3.1.2-2]", UNSUPPORTED_PROTOCOL_VERSION)
        cdef bint v5 = c.protocol_level == 5
        if not self._seen_connect:
            self.protocol_version = 5 if v5 else 4
        self._seen_connect = True
        cdef int cf = _rd_u8(r)
        if cf & 0x01:
            raise _err("reserved flag in CONNECT must be 0 [MQTT-3.1.2-3]")
        c.clean_start = (cf & 0x02) != 0
        cdef bint will_flag = (cf & 0x04) != 0
        cdef int will_qos = (cf >> 3) & 0x03
        cdef bint will_retain = (cf & 0x20) != 0
        cdef bint has_password = (cf & 0x40) != 0
        cdef bint has_username = (cf & 0x80) != 0
        if not will_flag and (will_qos or will_retain):
            raise _err("will QoS and retain must be 0 without the will flag [MQTT-3.1.2-11] [MQTT-3.1.2-13]")
        if will_qos == 3:
            raise _err("will QoS 3 [MQTT-3.1.2-12]")
        if has_password and not has_username and not v5:
            raise _err("password flag without user name flag [MQTT-3.1.2-22]")
        c.keepalive = _rd_u16(r)
        c.properties = _rd_props(r, T_CONNECT, True) if v5 else {}
        c.client_id = _rd_str(r)
        c.will = None
        if will_flag:
            w = Will.__new__(Will)
            w.properties = _rd_props(r, WILL_BIT, True) if v5 else {}
            w.topic = _rd_str(r)
            w.payload = _rd_bin(r)
            w.qos = will_qos
            w.retain = will_retain
            c.will = w
        c.username = _rd_str(r) if has_username else None
        c.password = _rd_bin(r) if has_password else None
        return c

    cdef Connack _connack(self, int flags, Reader* r):
        cdef Connack c = Connack.__new__(Connack)
        cdef int ack_flags = _rd_u8(r)
        if ack_flags & 0xFE:
            raise _err("reserved CONNACK flags must be 0 [MQTT-3.2.2-1]")
        c.session_present = ack_flags & 1
        c.reason_code = _rd_u8(r)
        cdef bint v5 = self.protocol_version == 5 or (self.protocol_version == 0 and r.end > 2)
        c.properties = _rd_props(r, T_CONNACK, self.server_side) if v5 else {}
        return c

    cdef Publish _publish(self, int flags, Reader* r):
        cdef Publish p = Publish.__new__(Publish)
        cdef int qos = (flags >> 1) & 0x03
        if qos == 3:
            raise _err("PUBLISH with QoS 3 [MQTT-3.3.1-4]")
        p.qos = qos
        p.dup = (flags & 0x08) != 0
        p.retain = flags & 0x01
        if p.dup and qos == 0:
            raise _err("DUP set on a QoS 0 PUBLISH [MQTT-3.3.1-2]")
        cdef int tlen = _rd_u16(r)
        _need(r, tlen, b"topic name")
        cdef const unsigned char* tp = r.p + r.pos
        r.pos += tlen
        p.topic = _decode_utf8(tp, tlen)
        if memchr(tp, b"+", tlen) != NULL or memchr(tp, b"#", tlen) != NULL:
            raise _err(f"wildcard in PUBLISH topic {p.topic!r} [MQTT-3.3.2-2]", TOPIC_NAME_INVALID)
        if qos:
            p.packet_id = _rd_u16(r)
            if p.packet_id == 0:
                raise _err("PUBLISH QoS > 0 with packet identifier 0 [MQTT-2.2.1-3]", PROTOCOL_ERROR)
        else:
            p.packet_id = 0
        if self.protocol_version == 5:
            p.properties = _rd_props(r, T_PUBLISH, self.server_side)
            if self.server_side and 0x0B in p.properties:
                raise _err("Subscription Identifier in a PUBLISH from a client [MQTT-3.3.4-6]",
                           PROTOCOL_ERROR)
            if tlen == 0 and 0x23 not in p.properties:
                raise _err("empty topic without a Topic Alias [MQTT-3.3.2-1]", PROTOCOL_ERROR)
        else:
            p.properties = {}
            if tlen == 0:
                raise _err("empty PUBLISH topic [MQTT-4.7.3-1]", PROTOCOL_ERROR)
        p.payload = PyBytes_FromStringAndSize(<const char*>r.p + r.pos, r.end - r.pos)
        r.pos = r.end
        return p

    cdef PubAck _puback(self, int ptype, Reader* r):
        cdef PubAck a = PubAck.__new__(PubAck)
        a.packet_type = ptype
        a.packet_id = _rd_u16(r)
        if a.packet_id == 0:
            raise _err(f"{_PACKET_NAMES[ptype]} with packet identifier 0 [MQTT-2.2.1-3]", PROTOCOL_ERROR)
        a.reason_code = 0
        a.properties = {}
        if self.protocol_version == 5:
            if r.pos < r.end:
                a.reason_code = _rd_u8(r)
            if r.pos < r.end:
                a.properties = _rd_props(r, ptype, self.server_side)
        return a

    cdef Subscribe _subscribe(self, Reader* r):
        cdef Subscribe s = Subscribe.__new__(Subscribe)
        s.packet_id = _rd_u16(r)
        if s.packet_id == 0:
            raise _err("SUBSCRIBE with packet identifier 0 [MQTT-2.2.1-3]", PROTOCOL_ERROR)
        cdef bint v5 = self.protocol_version == 5
        s.properties = _rd_props(r, T_SUBSCRIBE, True) if v5 else {}
        cdef list subs = []
        cdef int opts, qos, rh
        while r.pos < r.end:
            flt = _rd_str(r)
            opts = _rd_u8(r)
            qos = opts & 0x03
            if qos == 3:
                raise _err("subscription QoS 3 [MQTT-3.8.3-4]")
            if v5:
                if opts & 0xC0:
                    raise _err("reserved subscription option bits must be 0 [MQTT-3.8.3-5]")
                rh = (opts >> 4) & 0x03
                if rh == 3:
                    raise _err("Retain Handling 3 [MQTT-3.8.3.1]", PROTOCOL_ERROR)
                subs.append((flt, qos, (opts & 0x04) != 0, (opts & 0x08) != 0, rh))
            else:
                if opts & 0xFC:
                    raise _err("reserved subscription option bits must be 0 [MQTT-3.8.3-4]")
                subs.append((flt, qos, False, False, 0))
        if not subs:
            raise _err("SUBSCRIBE without topic filters [MQTT-3.8.3-2]", PROTOCOL_ERROR)
        s.subscriptions = subs
        return s

    cdef Suback _suback(self, Reader* r):
        cdef Suback s = Suback.__new__(Suback)
        s.packet_id = _rd_u16(r)
        s.properties = _rd_props(r, T_SUBACK, False) if self.protocol_version == 5 else {}
        s.reason_codes = [r.p[i] for i in range(r.pos, r.end)]
        r.pos = r.end
        return s

    cdef Unsubscribe _unsubscribe(self, Reader* r):
        cdef Unsubscribe u = Unsubscribe.__new__(Unsubscribe)
        u.packet_id = _rd_u16(r)
        if u.packet_id == 0:
            raise _err("UNSUBSCRIBE with packet identifier 0 [MQTT-2.2.1-3]", PROTOCOL_ERROR)
        u.properties = _rd_props(r, T_UNSUBSCRIBE, True) if self.protocol_version == 5 else {}
        cdef list filters = []
        while r.pos < r.end:
            filters.append(_rd_str(r))
        if not filters:
            raise _err("UNSUBSCRIBE without topic filters [MQTT-3.10.3-2]", PROTOCOL_ERROR)
        u.topic_filters = filters
        return u

    cdef Unsuback _unsuback(self, Reader* r):
        cdef Unsuback u = Unsuback.__new__(Unsuback)
        u.packet_id = _rd_u16(r)
        if self.protocol_version == 5:
            u.properties = _rd_props(r, T_UNSUBACK, False)
            u.reason_codes = [r.p[i] for i in range(r.pos, r.end)]
            r.pos = r.end
        else:
            u.properties = {}
            u.reason_codes = []
        return u

    cdef object _disconnect_or_auth(self, int ptype, Reader* r):
        if ptype == T_AUTH and self.protocol_version != 5:
            raise _err("AUTH exists only in MQTT 5 [MQTT-2.1.2]")
        cdef int rc = 0
        cdef dict props = {}
        if self.protocol_version == 5:
            if r.pos < r.end:
                rc = _rd_u8(r)
            if r.pos < r.end:
                props = _rd_props(r, ptype, self.server_side)
        if ptype == T_DISCONNECT:
            d = Disconnect.__new__(Disconnect)
            (<Disconnect>d).reason_code = rc
            (<Disconnect>d).properties = props
            return d
        a = Auth.__new__(Auth)
        (<Auth>a).reason_code = rc
        (<Auth>a).properties = props
        return a


# ---------------------------------------------------------------------------
# Encoding


cdef inline int _varint_size(Py_ssize_t n) except -1:
    if n < 128:
        return 1
    if n < 16384:
        return 2
    if n < 2097152:
        return 3
    if n <= MAX_VARINT:
        return 4
    raise ValueError(f"{n} does not fit a variable byte integer")


cdef inline Py_ssize_t _w_varint(unsigned char* out, Py_ssize_t pos, Py_ssize_t n):
    while True:
        if n < 128:
            out[pos] = <unsigned char>n
            return pos + 1
        out[pos] = <unsigned char>((n & 0x7F) | 0x80)
        n >>= 7
        pos += 1


cdef inline Py_ssize_t _w_u16(unsigned char* out, Py_ssize_t pos, unsigned int v):
    out[pos] = (v >> 8) & 0xFF
    out[pos + 1] = v & 0xFF
    return pos + 2


cdef inline Py_ssize_t _w_u32(unsigned char* out, Py_ssize_t pos, unsigned long v):
    out[pos] = (v >> 24) & 0xFF
    out[pos + 1] = (v >> 16) & 0xFF
    out[pos + 2] = (v >> 8) & 0xFF
    out[pos + 3] = v & 0xFF
    return pos + 4


cdef inline Py_ssize_t _w_bytes(unsigned char* out, Py_ssize_t pos, const char* p, Py_ssize_t n):
    out[pos] = (n >> 8) & 0xFF
    out[pos + 1] = n & 0xFF
    memcpy(out + pos + 2, p, n)
    return pos + 2 + n


cdef inline const char* _utf8(object s, Py_ssize_t* n) except NULL:
    cdef const char* p = PyUnicode_AsUTF8AndSize(s, n)
    if n[0] > 65535:
        raise ValueError("string longer than 65535 bytes")
    return p


cdef Py_ssize_t _props_size(dict props) except -1:
    """Encoded size of a property block's content (without its length prefix)."""
    cdef Py_ssize_t size = 0
    cdef Py_ssize_t n
    cdef int kind
    for pid, value in props.items():
        if type(pid) is not int or pid <= 0 or pid > 0x2A or _PROP_KIND[<int>pid] == K_NONE:
            raise ValueError(f"unknown property {pid!r}")
        kind = _PROP_KIND[<int>pid]
        if kind == K_PAIR:
            for k, v in value:
                _utf8(k, &n)
                size += 1 + 2 + n
                _utf8(v, &n)
                size += 2 + n
        elif pid == 0x0B:
            for v in (value if type(value) is list else [value]):
                size += 1 + _varint_size(v)
        elif kind == K_BYTE:
            size += 2
        elif kind == K_U16:
            size += 3
        elif kind == K_U32:
            size += 5
        elif kind == K_STR:
            _utf8(value, &n)
            size += 3 + n
        else:
            if len(value) > 65535:
                raise ValueError("binary property longer than 65535 bytes")
            size += 3 + len(value)
    return size


cdef Py_ssize_t _w_props(unsigned char* out, Py_ssize_t pos, dict props) except -1:
    cdef Py_ssize_t n
    cdef const char* p
    cdef int kind
    cdef bytes b
    for pid, value in props.items():
        kind = _PROP_KIND[<int>pid]
        if kind == K_PAIR:
            for k, v in value:
                out[pos] = 0x26
                p = _utf8(k, &n)
                pos = _w_bytes(out, pos + 1, p, n)
                p = _utf8(v, &n)
                pos = _w_bytes(out, pos, p, n)
        elif pid == 0x0B:
            for v in (value if type(value) is list else [value]):
                out[pos] = 0x0B
                pos = _w_varint(out, pos + 1, v)
        else:
            out[pos] = <unsigned char>pid
            pos += 1
            if kind == K_BYTE:
                out[pos] = <unsigned char>value
                pos += 1
            elif kind == K_U16:
                pos = _w_u16(out, pos, value)
            elif kind == K_U32:
                pos = _w_u32(out, pos, value)
            elif kind == K_STR:
                p = _utf8(value, &n)
                pos = _w_bytes(out, pos, p, n)
            else:
                b = bytes(value)
                pos = _w_bytes(out, pos, PyBytes_AS_STRING(b), len(b))
    return pos


def encode_publish(str topic, payload, int qos, bint retain, bint dup, int packet_id,
                   dict properties, int protocol_version):
    """One PUBLISH packet; ``properties`` is ignored below MQTT 5."""
    cdef Py_ssize_t tlen
    cdef const char* tp = _utf8(topic, &tlen)
    if type(payload) is not bytes:
        payload = bytes(payload)
    cdef Py_ssize_t plen = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t psize = 0
    cdef bint v5 = protocol_version == 5
    if qos < 0 or qos > 2:
        raise ValueError(f"QoS {qos}")
    if v5 and properties:
        psize = _props_size(properties)
    cdef Py_ssize_t remaining = 2 + tlen + (2 if qos else 0) + plen
    if v5:
        remaining += _varint_size(psize) + psize
    cdef Py_ssize_t total = 1 + _varint_size(remaining) + remaining
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
    o[0] = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    cdef Py_ssize_t pos = _w_varint(o, 1, remaining)
    pos = _w_bytes(o, pos, tp, tlen)
    if qos:
        pos = _w_u16(o, pos, packet_id)
    if v5:
        pos = _w_varint(o, pos, psize)
        if psize:
            pos = _w_props(o, pos, properties)
    memcpy(o + pos, PyBytes_AS_STRING(payload), plen)
    return out


def encode_ack(int packet_type, int packet_id, int reason_code, int protocol_version):
    """PUBACK / PUBREC / PUBREL / PUBCOMP; v5 omits a zero reason code, as allowed."""
    cdef int first = (packet_type << 4) | (2 if packet_type == T_PUBREL else 0)
    if protocol_version == 5 and reason_code:
        return bytes((first, 3, (packet_id >> 8) & 0xFF, packet_id & 0xFF, reason_code))
    return bytes((first, 2, (packet_id >> 8) & 0xFF, packet_id & 0xFF))


cdef class _Body:
    """A growing packet body for the less frequent packets (simplicity over speed)."""

    cdef bytearray b

    def __cinit__(self):
        self.b = bytearray()

    cdef void u8(self, int v):
        self.b.append(v & 0xFF)

    cdef void u16(self, int v):
        self.b.append((v >> 8) & 0xFF)
        self.b.append(v & 0xFF)

    cdef int string(self, s) except -1:
        cdef Py_ssize_t n
        cdef const char* p = _utf8(s, &n)
        self.u16(n)
        self.b += p[:n]
        return 0

    cdef int binary(self, data) except -1:
        data = bytes(data)
        if len(data) > 65535:
            raise ValueError("binary data longer than 65535 bytes")
        self.u16(len(data))
        self.b += data
        return 0

    cdef int props(self, dict props) except -1:
        cdef Py_ssize_t size = _props_size(props) if props else 0
        cdef unsigned char hdr[4]
        cdef Py_ssize_t hn = _w_varint(hdr, 0, size)
        self.b += (<char*>hdr)[:hn]
        if size:
            buf = PyBytes_FromStringAndSize(NULL, size)
            _w_props(<unsigned char*>PyBytes_AS_STRING(buf), 0, props)
            self.b += buf
        return 0

    cdef bytes packet(self, int first):
        cdef Py_ssize_t n = len(self.b)
        cdef unsigned char hdr[5]
        hdr[0] = first
        cdef Py_ssize_t hn = _w_varint(hdr, 1, n)
        return (<char*>hdr)[:hn] + bytes(self.b)


def encode(packet, int protocol_version):
    """Encode any packet object under ``protocol_version`` (3, 4 or 5)."""
    cdef bint v5 = protocol_version == 5
    cdef _Body body = _Body()
    cdef int flags
    t = type(packet)
    if t is Publish:
        p = <Publish>packet
        return encode_publish(p.topic, p.payload, p.qos, p.retain, p.dup, p.packet_id,
                              p.properties, protocol_version)
    if t is PubAck:
        a = <PubAck>packet
        if v5 and a.properties:
            body.u16(a.packet_id)
            body.u8(a.reason_code)
            body.props(a.properties)
            return body.packet((a.packet_type << 4) | (2 if a.packet_type == T_PUBREL else 0))
        return encode_ack(a.packet_type, a.packet_id, a.reason_code, protocol_version)
    if t is Connect:
        c = <Connect>packet
        level = c.protocol_level
        body.string(c.protocol_name)
        body.u8(level)
        flags = 0x02 if c.clean_start else 0
        w = c.will
        if w is not None:
            flags |= 0x04 | ((<Will>w).qos << 3) | (0x20 if (<Will>w).retain else 0)
        if c.password is not None:
            flags |= 0x40
        if c.username is not None:
            flags |= 0x80
        body.u8(flags)
        body.u16(c.keepalive)
        if level == 5:
            body.props(c.properties)
        body.string(c.client_id)
        if w is not None:
            if level == 5:
                body.props((<Will>w).properties)
            body.string((<Will>w).topic)
            body.binary((<Will>w).payload)
        if c.username is not None:
            body.string(c.username)
        if c.password is not None:
            body.binary(c.password)
        return body.packet(0x10)
    if t is Connack:
        k = <Connack>packet
        body.u8(1 if k.session_present else 0)
        body.u8(k.reason_code)
        if v5:
            body.props(k.properties)
        return body.packet(0x20)
    if t is Subscribe:
        s = <Subscribe>packet
        body.u16(s.packet_id)
        if v5:
            body.props(s.properties)
        for flt, qos, nl, rap, rh in s.subscriptions:
            body.string(flt)
            if v5:
                body.u8(qos | (0x04 if nl else 0) | (0x08 if rap else 0) | (rh << 4))
            else:
                body.u8(qos)
        return body.packet(0x82)
    if t is Suback:
        sa = <Suback>packet
        body.u16(sa.packet_id)
        if v5:
            body.props(sa.properties)
        for rc in sa.reason_codes:
            body.u8(rc if v5 or rc < 0x80 else 0x80)
        return body.packet(0x90)
    if t is Unsubscribe:
        u = <Unsubscribe>packet
        body.u16(u.packet_id)
        if v5:
            body.props(u.properties)
        for flt in u.topic_filters:
            body.string(flt)
        return body.packet(0xA2)
    if t is Unsuback:
        ua = <Unsuback>packet
        body.u16(ua.packet_id)
        if v5:
            body.props(ua.properties)
            for rc in ua.reason_codes:
                body.u8(rc)
        return body.packet(0xB0)
    if t is Pingreq:
        return PINGREQ
    if t is Pingresp:
        return PINGRESP
    if t is Disconnect or t is Auth:
        first = 0xE0 if t is Disconnect else 0xF0
        if not v5:
            if t is Auth:
                raise ValueError("AUTH exists only in MQTT 5")
            return b"\xe0\x00"
        rc = packet.reason_code
        props = packet.properties
        if rc == 0 and not props:
            return bytes((first, 0))
        body.u8(rc)
        if props:
            body.props(props)
        return body.packet(first)
    raise TypeError(f"cannot encode {packet!r}")
