# Declarations of ingestd._message (ext/ingestd/_message.pyx).

cimport cython


@cython.final
@cython.no_gc
cdef class Message:
    cdef public str topic
    cdef public bytes payload
    cdef public int qos
    cdef public bint retain
    cdef public dict properties
    cdef public str client_id
    cdef public object username      # str or None
    cdef public object received_at   # float, time.time()
    cdef public object expires_at    # float (time.monotonic() deadline) or None


# A Message from compiled code, without argument parsing (the fields as given).
cdef Message new_message(str topic, bytes payload, int qos, bint retain, dict properties,
                         str client_id, object username, object received_at,
                         object expires_at)
