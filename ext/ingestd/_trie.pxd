# Declarations for ingestd._trie: the MQTT subscription trie (contract: docs/codec.md).

cimport cython
from cpython.object cimport PyObject


# One pending branch of a match walk: a '+' child still to be explored.
# The node is a borrowed reference: nothing mutates the trie during a walk
# (the walk runs no Python code: str hashing and comparison only).
cdef struct _Frame:
    PyObject* node
    Py_ssize_t level      # index of the topic level this node will match next


@cython.auto_pickle(False)
cdef class SharedGroup:
    cdef readonly str name            # the {group} of $share/{group}/{filter}
    cdef readonly str topic_filter    # the {filter}, without the $share/{group}/ prefix
    cdef readonly list members        # [(subscriber, options)] in insertion order (the live list)
    cdef dict _positions              # subscriber -> index in members
    cdef Py_ssize_t _cursor           # index next_index() returns next (may be >= len: wraps)

    cpdef Py_ssize_t next_index(self) except -1
    cdef int _set(self, object subscriber, object options) except -1      # 1 added, 0 replaced
    cdef int _discard(self, object subscriber) except -1                  # 1 removed, 0 absent


# A trie node. Most nodes of a real trie have one literal child and at most
# one subscriber (the levels of company/c1/machine/m1/telemetry), so the first
# child and the first subscriber are held inline and a dict is only created
# for the second one: this saves two dicts (~460 bytes) per such node, and
# a lone child is found by comparing characters, without hashing the level.
# Invariants: key1/child1 are set only while children is None; children and
# subs, when not None, hold at least two entries; entry1 is set only while
# subs is None; groups, when not None, is non-empty.
# The trashcan bounds the C recursion of freeing a long chain of nodes (a
# filter of 65,535 empty levels is one), as CPython does for its containers.
@cython.final
@cython.trashcan(True)
@cython.auto_pickle(False)
cdef class _Node:
    cdef str key1                     # level of the only literal child
    cdef _Node child1                 # the only literal child
    cdef dict children                # level (str) -> _Node, when 2+ literal children
    cdef _Node plus                   # child for a '+' level
    cdef _Node hash                   # child for a '#' level (a leaf: '#' is always last)
    cdef tuple entry1                 # (subscriber, options) of the only plain subscriber
    cdef dict subs                    # subscriber -> (subscriber, options), when 2+
    cdef dict groups                  # share name -> SharedGroup

    cdef _Node find(self, str level)
    cdef _Node find_or_add(self, str level)
    cdef int remove_child(self, str level) except -1
    cdef int set_sub(self, object subscriber, object options) except -1   # 1 added, 0 replaced
    cdef int discard_sub(self, object subscriber) except -1               # 1 removed, 0 absent
    cdef bint is_empty(self) noexcept


cdef class SubscriptionTrie:
    cdef _Node _root
    cdef Py_ssize_t _count            # (filter, subscriber) entries, shared included
    # Bumped by every subscribe and every unsubscribe that removes something: a
    # cache of match results (ingestd._inbound) is valid while it is unchanged.
    cdef readonly Py_ssize_t generation

    cdef _Node _find_node(self, str topic_filter, list path)
    cdef int _walk(self, str topic, list out, list shared) except -1
