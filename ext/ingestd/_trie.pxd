# Declarations for ingestd._trie (see _trie.pyx and docs/codec.md).

cdef class SharedGroup:
    cdef readonly str name
    cdef readonly str topic_filter
    cdef dict _index          # subscriber -> position in members
    cdef public list members  # [(subscriber, options)] in insertion order
    cdef Py_ssize_t _cursor

    cpdef Py_ssize_t next_index(self) except -1
    cdef int _add(self, object subscriber, object options) except -1
    cdef bint _remove(self, object subscriber) except -1


cdef class _Node:
    cdef dict children        # level (str) -> _Node, literal levels only
    cdef _Node plus           # child for '+'
    cdef _Node hash           # child for '#'
    cdef dict subs            # subscriber -> options
    cdef dict groups          # group name -> SharedGroup

    cdef bint is_empty(self)


cdef class SubscriptionTrie:
    cdef _Node _root
    cdef Py_ssize_t _count

    cdef _Node _walk_create(self, list levels)
    cdef int _collect(self, _Node node, list levels, Py_ssize_t i, list out, list shared) except -1
