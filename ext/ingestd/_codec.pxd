# Declarations for ingestd._codec: the sans-IO MQTT 3.1.1/5.0 codec (see _codec.pyx, docs/codec.md).

cdef enum PacketTypeC:
    T_CONNECT = 1
    T_CONNACK = 2
    T_PUBLISH = 3
    T_PUBACK = 4
    T_PUBREC = 5
    T_PUBREL = 6
    T_PUBCOMP = 7
    T_SUBSCRIBE = 8
    T_SUBACK = 9
    T_UNSUBSCRIBE = 10
    T_UNSUBACK = 11
    T_PINGREQ = 12
    T_PINGRESP = 13
    T_DISCONNECT = 14
    T_AUTH = 15

# Property value kinds
cdef enum PropKind:
    K_NONE = 0
    K_BYTE = 1
    K_U16 = 2
    K_U32 = 3
    K_VARINT = 4
    K_STR = 5
    K_BIN = 6
    K_PAIR = 7

# "packet" bit used for will properties in the allowed-packets masks
cdef enum:
    WILL_BIT = 0

cdef struct Reader:
    const unsigned char* p
    Py_ssize_t pos
    Py_ssize_t end


cdef class Packet:
    pass


cdef class Will:
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public dict properties


cdef class Connect(Packet):
    cdef public str protocol_name
    cdef public int protocol_level
    cdef public bint clean_start
    cdef public int keepalive
    cdef public str client_id
    cdef public object username
    cdef public object password
    cdef public object will
    cdef public dict properties


cdef class Connack(Packet):
    cdef public bint session_present
    cdef public int reason_code
    cdef public dict properties


cdef class Publish(Packet):
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public bint dup
    cdef public int packet_id
    cdef public dict properties


cdef class PubAck(Packet):
    cdef public int packet_type
    cdef public int packet_id
    cdef public int reason_code
    cdef public dict properties


cdef class Subscribe(Packet):
    cdef public int packet_id
    cdef public list subscriptions
    cdef public dict properties


cdef class Suback(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties


cdef class Unsubscribe(Packet):
    cdef public int packet_id
    cdef public list topic_filters
    cdef public dict properties


cdef class Unsuback(Packet):
    cdef public int packet_id
    cdef public list reason_codes
    cdef public dict properties


cdef class Pingreq(Packet):
    pass


cdef class Pingresp(Packet):
    pass


cdef class Disconnect(Packet):
    cdef public int reason_code
    cdef public dict properties


cdef class Auth(Packet):
    cdef public int reason_code
    cdef public dict properties


cdef class Decoder:
    cdef bytearray _buf
    cdef Py_ssize_t _pos
    cdef public int protocol_version
    cdef public Py_ssize_t max_packet_size
    cdef readonly bint server_side
    cdef bint _seen_connect
    cdef object _error

    cdef Py_ssize_t _parse(self, const unsigned char* data, Py_ssize_t n, list out) except -1
    cdef object _decode(self, int first, const unsigned char* body, Py_ssize_t n)
    cdef Connect _connect(self, int flags, Reader* r)
    cdef Connack _connack(self, int flags, Reader* r)
    cdef Publish _publish(self, int flags, Reader* r)
    cdef PubAck _puback(self, int ptype, Reader* r)
    cdef Subscribe _subscribe(self, Reader* r)
    cdef Suback _suback(self, Reader* r)
    cdef Unsubscribe _unsubscribe(self, Reader* r)
    cdef Unsuback _unsuback(self, Reader* r)
    cdef object _disconnect_or_auth(self, int ptype, Reader* r)
