# Declarations of the compiled MQTT codec (ext/_codec.pyx).
#
# The numbers below are those of ingestd.protocol (PacketType, Prop, Reason);
# tests/test_codec_constants.py checks that the two agree.

cdef enum:
    MQTT_V31 = 3
    MQTT_V311 = 4
    MQTT_V5 = 5

    # Largest remaining length a 4-byte Variable Byte Integer holds [MQTT-5.0 §1.5.5].
    MAX_VBI = 268435455


cdef enum PacketType:
    PT_CONNECT = 1
    PT_CONNACK = 2
    PT_PUBLISH = 3
    PT_PUBACK = 4
    PT_PUBREC = 5
    PT_PUBREL = 6
    PT_PUBCOMP = 7
    PT_SUBSCRIBE = 8
    PT_SUBACK = 9
    PT_UNSUBSCRIBE = 10
    PT_UNSUBACK = 11
    PT_PINGREQ = 12
    PT_PINGRESP = 13
    PT_DISCONNECT = 14
    PT_AUTH = 15


cdef enum Prop:
    PROP_PAYLOAD_FORMAT_INDICATOR = 0x01
    PROP_MESSAGE_EXPIRY_INTERVAL = 0x02
    PROP_CONTENT_TYPE = 0x03
    PROP_RESPONSE_TOPIC = 0x08
    PROP_CORRELATION_DATA = 0x09
    PROP_SUBSCRIPTION_IDENTIFIER = 0x0B
    PROP_SESSION_EXPIRY_INTERVAL = 0x11
    PROP_ASSIGNED_CLIENT_IDENTIFIER = 0x12
    PROP_SERVER_KEEP_ALIVE = 0x13
    PROP_AUTHENTICATION_METHOD = 0x15
    PROP_AUTHENTICATION_DATA = 0x16
    PROP_REQUEST_PROBLEM_INFORMATION = 0x17
    PROP_WILL_DELAY_INTERVAL = 0x18
    PROP_REQUEST_RESPONSE_INFORMATION = 0x19
    PROP_RESPONSE_INFORMATION = 0x1A
    PROP_SERVER_REFERENCE = 0x1C
    PROP_REASON_STRING = 0x1F
    PROP_RECEIVE_MAXIMUM = 0x21
    PROP_TOPIC_ALIAS_MAXIMUM = 0x22
    PROP_TOPIC_ALIAS = 0x23
    PROP_MAXIMUM_QOS = 0x24
    PROP_RETAIN_AVAILABLE = 0x25
    PROP_USER_PROPERTY = 0x26
    PROP_MAXIMUM_PACKET_SIZE = 0x27
    PROP_WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    PROP_SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    PROP_SHARED_SUBSCRIPTION_AVAILABLE = 0x2A
    PROP_MAX_ID = 0x2A


cdef enum Reason:
    RC_SUCCESS = 0x00
    RC_GRANTED_QOS_1 = 0x01
    RC_GRANTED_QOS_2 = 0x02
    RC_DISCONNECT_WITH_WILL_MESSAGE = 0x04
    RC_NO_MATCHING_SUBSCRIBERS = 0x10
    RC_NO_SUBSCRIPTION_EXISTED = 0x11
    RC_CONTINUE_AUTHENTICATION = 0x18
    RC_RE_AUTHENTICATE = 0x19
    RC_UNSPECIFIED_ERROR = 0x80
    RC_MALFORMED_PACKET = 0x81
    RC_PROTOCOL_ERROR = 0x82
    RC_IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    RC_UNSUPPORTED_PROTOCOL_VERSION = 0x84
    RC_CLIENT_IDENTIFIER_NOT_VALID = 0x85
    RC_BAD_USER_NAME_OR_PASSWORD = 0x86
    RC_NOT_AUTHORIZED = 0x87
    RC_SERVER_UNAVAILABLE = 0x88
    RC_SERVER_BUSY = 0x89
    RC_BANNED = 0x8A
    RC_SERVER_SHUTTING_DOWN = 0x8B
    RC_BAD_AUTHENTICATION_METHOD = 0x8C
    RC_KEEP_ALIVE_TIMEOUT = 0x8D
    RC_SESSION_TAKEN_OVER = 0x8E
    RC_TOPIC_FILTER_INVALID = 0x8F
    RC_TOPIC_NAME_INVALID = 0x90
    RC_PACKET_IDENTIFIER_IN_USE = 0x91
    RC_PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RC_RECEIVE_MAXIMUM_EXCEEDED = 0x93
    RC_TOPIC_ALIAS_INVALID = 0x94
    RC_PACKET_TOO_LARGE = 0x95
    RC_MESSAGE_RATE_TOO_HIGH = 0x96
    RC_QUOTA_EXCEEDED = 0x97
    RC_ADMINISTRATIVE_ACTION = 0x98
    RC_PAYLOAD_FORMAT_INVALID = 0x99
    RC_RETAIN_NOT_SUPPORTED = 0x9A
    RC_QOS_NOT_SUPPORTED = 0x9B
    RC_USE_ANOTHER_SERVER = 0x9C
    RC_SERVER_MOVED = 0x9D
    RC_SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    RC_CONNECTION_RATE_EXCEEDED = 0x9F
    RC_MAXIMUM_CONNECT_TIME = 0xA0
    RC_SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    RC_WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


# A bounds-checked cursor over one packet's body (or a property section).
cdef struct Reader:
    const unsigned char* p
    Py_ssize_t pos
    Py_ssize_t end
    int version          # protocol version the body is read under (3, 4 or 5)
    bint server_side     # decoding what a client sent


# An output cursor: with buf == NULL it only counts bytes, so one routine
# both measures a packet and writes it into a preallocated bytes object.
cdef struct Writer:
    char* buf
    Py_ssize_t pos


cdef class _Record:
    cdef tuple _values(self)


cdef class Will(_Record):
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public dict properties


cdef class Connect(_Record):
    cdef public str protocol_name
    cdef public int protocol_level
    cdef public bint clean_start
    cdef public int keepalive
    cdef public str client_id
    cdef public str username
    cdef public bytes password
    cdef public Will will
    cdef public dict properties


cdef class Connack(_Record):
    cdef public bint session_present
    cdef public int reason_code
    cdef public dict properties


cdef class Publish(_Record):
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public bint dup
    cdef public int packet_id
    cdef public dict properties


cdef class PubAck(_Record):
    cdef public int packet_type
    cdef public int packet_id
    cdef public int reason_code
    cdef public dict properties


cdef class Subscribe(_Record):
    cdef public int packet_id
    cdef public list subscriptions
    cdef public dict properties


cdef class Suback(_Record):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties


cdef class Unsubscribe(_Record):
    cdef public int packet_id
    cdef public list topic_filters
    cdef public dict properties


cdef class Unsuback(_Record):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties


cdef class Pingreq(_Record):
    pass


cdef class Pingresp(_Record):
    pass


cdef class Disconnect(_Record):
    cdef public int reason_code
    cdef public dict properties


cdef class Auth(_Record):
    cdef public int reason_code
    cdef public dict properties


cdef class Decoder:
    cdef bytearray _buf            # unconsumed bytes of an incomplete packet (None: none)
    cdef readonly bint server_side
    cdef public int protocol_version
    cdef public Py_ssize_t max_packet_size
    cdef bint _connected           # server side: CONNECT already decoded
    cdef tuple _error              # (message, reason code) once feed has failed
    cdef str _last_topic           # topic of the previous PUBLISH, reused when equal

    cdef Py_ssize_t _parse(self, const unsigned char* data, Py_ssize_t n, list out) except -1
    cdef int _check_type(self, int first) except -1
    cdef object _decode(self, int first, const unsigned char* body, Py_ssize_t n)
    cdef Connect _connect(self, Reader* r)
    cdef Connack _connack(self, Reader* r)
    cdef Publish _publish(self, Reader* r, int flags)
    cdef PubAck _puback(self, Reader* r, int ptype)
    cdef Subscribe _subscribe(self, Reader* r)
    cdef Suback _suback(self, Reader* r)
    cdef Unsubscribe _unsubscribe(self, Reader* r)
    cdef Unsuback _unsuback(self, Reader* r)
    cdef Disconnect _disconnect(self, Reader* r)
    cdef Auth _auth(self, Reader* r)


# One PUBLISH encoded (``properties`` may be None; written only for version 5), for
# compiled callers (ingestd._session writes a session's PUBLISHes with it).
cdef bytes _encode_publish(str topic, object payload, int qos, bint retain, bint dup,
                           int packet_id, dict properties, int version)
