"""The broker's subscription trie: which subscriptions match a topic name.

The contract is docs/codec.md (section ``ingestd._trie``). A
:class:`SubscriptionTrie` stores MQTT topic filters level by level; each node
has its literal children plus dedicated ``+`` and ``#`` children, so
:meth:`SubscriptionTrie.match` follows only branches that can match: its work
is proportional to the topic's levels and to the matches, never to the number
of subscriptions stored.

The match walk reads the topic's characters in place: levels are located in
C, a level is compared with a node's only child without creating a string,
and a string is made for a level only where a node has several children
(a dict lookup needs one), once per level. Pending ``+`` branches go on an
explicit stack, so a topic of 65,535 levels cannot exhaust the C stack.

Shared subscriptions (``$share/{group}/{filter}``, MQTT 5 §4.8.2) are kept in
a :class:`SharedGroup` per (group, filter) on the node of ``filter`` and are
reported by :meth:`SubscriptionTrie.match_shared` only.
"""

cimport cython
from cpython.dict cimport PyDict_GetItemWithError
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.unicode cimport (
    PyUnicode_1BYTE_KIND,
    PyUnicode_DATA,
    PyUnicode_FromObject,
    PyUnicode_GET_LENGTH,
    PyUnicode_KIND,
    PyUnicode_READ,
    PyUnicode_Substring,
)
from libc.string cimport memchr, memcmp


cdef extern from *:
    """
    /* Python < 3.12 may hold a str in the legacy wstr form until it is made
       "ready"; the kind/data macros need the canonical form. */
    #if PY_VERSION_HEX < 0x030C0000
    #define ingestd_trie_unicode_ready(o) PyUnicode_READY(o)
    #else
    #define ingestd_trie_unicode_ready(o) 0
    #endif
    """
    int ingestd_trie_unicode_ready(object o) except -1


cdef enum:
    # Topic levels held in buffers on the C stack; deeper topics use the heap.
    _STACK_LEVELS = 32
    # The longest string MQTT can carry (two-byte length prefix) [MQTT-1.5.4].
    _MAX_UTF8 = 65535


cdef inline str _as_str(object s, str what):
    """``s`` as an exact str (a str subclass is copied), or TypeError."""
    if type(s) is str:
        return <str>s
    if isinstance(s, str):
        return <str>PyUnicode_FromObject(s)
    raise TypeError(f"{what} must be str, not {type(s).__name__}")


# ------------------------------------------------------------ validation


cdef int _text_ok(str s, bint wildcards_ok) except -1:
    """1 if ``s`` is a non-empty MQTT string of at most 65,535 UTF-8 bytes
    without U+0000 [MQTT-4.7.3-1, MQTT-4.7.3-2] or surrogate code points
    [MQTT-1.5.4-1] (and, unless ``wildcards_ok``, without '+' or '#'
    [MQTT-3.3.2-2]), else 0.

    The UTF-8 length is counted from the code points, without encoding.
    """
    ingestd_trie_unicode_ready(s)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s)
    if n == 0 or n > _MAX_UTF8:  # every code point takes at least one byte
        return 0
    cdef int kind = PyUnicode_KIND(s)
    cdef void* data = PyUnicode_DATA(s)
    cdef Py_ssize_t i, utf8 = 0
    cdef Py_UCS4 c
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if c < 0x80:
            if c == 0:
                return 0
            if not wildcards_ok and (c == 0x2B or c == 0x23):  # '+', '#'
                return 0
            utf8 += 1
        elif c < 0x800:
            utf8 += 2
        elif c < 0x10000:
            if 0xD800 <= c <= 0xDFFF:
                return 0
            utf8 += 3
        else:
            utf8 += 4
    return utf8 <= _MAX_UTF8


cdef int _filter_ok(str s) except -1:
    """1 if ``s`` is a valid topic filter, ``$share/{group}/{filter}`` included."""
    if not _text_ok(s, True):
        return 0
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(s)
    cdef int kind = PyUnicode_KIND(s)
    cdef void* data = PyUnicode_DATA(s)
    cdef Py_ssize_t i, start = 0
    cdef Py_UCS4 c
    if s.startswith("$share/"):
        # The share name: at least one character, none of '/', '+', '#'
        # [MQTT-4.8.2-1, MQTT-4.8.2-2]; then a '/' and a non-empty filter.
        i = 7
        while i < n:
            c = PyUnicode_READ(kind, data, i)
            if c == 0x2F:  # '/'
                break
            if c == 0x2B or c == 0x23:
                return 0
            i += 1
        if i == 7 or i >= n - 1:  # empty group, or no filter after it
            return 0
        start = i + 1
    # '+' and '#' only as a whole level, '#' only as the last one [MQTT-4.7.1-1, -2].
    cdef Py_ssize_t level_start = start
    for i in range(start, n):
        c = PyUnicode_READ(kind, data, i)
        if c == 0x2F:
            level_start = i + 1
        elif c == 0x2B:
            if i != level_start or (i + 1 < n and PyUnicode_READ(kind, data, i + 1) != 0x2F):
                return 0
        elif c == 0x23:
            if i != level_start or i + 1 != n:
                return 0
    return 1


def validate_topic_name(topic):
    """Whether ``topic`` may be a PUBLISH (or Will) topic name.

    Non-empty, no ``+`` or ``#``, no U+0000 and at most 65,535 bytes of
    UTF-8. Lone surrogates are refused as well: they have no UTF-8 encoding
    [MQTT-1.5.4-1], so such a topic could never be sent.
    """
    return _text_ok(_as_str(topic, "topic"), False) == 1


def validate_topic_filter(topic_filter):
    """Whether ``topic_filter`` is a valid SUBSCRIBE / UNSUBSCRIBE topic filter.

    ``+`` and ``#`` only as whole levels, ``#`` only last; non-empty, no
    U+0000, at most 65,535 bytes of UTF-8. ``$share/{group}/{filter}`` needs
    a non-empty group without ``+``, ``#`` or ``/`` and a valid, non-empty
    ``filter``.
    """
    return _filter_ok(_as_str(topic_filter, "topic_filter")) == 1


# ---------------------------------------------------------------- groups


@cython.auto_pickle(False)
cdef class SharedGroup:
    """The members of one shared subscription ``$share/{name}/{topic_filter}``.

    ``members`` is the live list of ``(subscriber, options)`` in the order the
    members joined; subscribing again replaces a member's options in place.
    Read it, do not modify it. :meth:`next_index` is the round-robin cursor
    the broker starts from when it picks a member for a message.
    """

    def __cinit__(self, str name not None, str topic_filter not None):
        self.name = name
        self.topic_filter = topic_filter
        self.members = []
        self._positions = {}
        self._cursor = 0

    cpdef Py_ssize_t next_index(self) except -1:
        """The index in ``members`` to try first; advances on every call.

        Successive calls cycle through ``range(len(members))``. The caller
        may skip members (offline ones, say) from there. Raises
        ``IndexError`` for a group without members (the trie drops such a
        group, so only a stale reference can see one).
        """
        cdef Py_ssize_t n = len(self.members)
        if n == 0:
            raise IndexError("shared group has no members")
        cdef Py_ssize_t i = self._cursor
        if i >= n:
            i = 0
        self._cursor = i + 1
        return i

    cdef int _set(self, object subscriber, object options) except -1:
        pos = self._positions.get(subscriber)
        if pos is not None:
            self.members[<Py_ssize_t>pos] = (subscriber, options)
            return 0
        self._positions[subscriber] = len(self.members)
        self.members.append((subscriber, options))
        return 1

    cdef int _discard(self, object subscriber) except -1:
        pos = self._positions.pop(subscriber, None)
        if pos is None:
            return 0
        cdef Py_ssize_t p = pos, k
        del self.members[p]
        for k in range(p, len(self.members)):
            self._positions[self.members[k][0]] = k
        # Keep pointing at the same next member: those after p moved down one.
        if p < self._cursor:
            self._cursor -= 1
        return 1

    def __len__(self):
        return len(self.members)

    def __repr__(self):
        return (
            f"SharedGroup(name={self.name!r}, topic_filter={self.topic_filter!r}, "
            f"members={len(self.members)})"
        )


# ----------------------------------------------------------------- nodes


@cython.final
@cython.trashcan(True)
@cython.auto_pickle(False)
cdef class _Node:
    """One level of the trie (internal; see _trie.pxd for the layout)."""

    cdef _Node find(self, str level):
        """The literal child for ``level``, or None."""
        if self.children is not None:
            return <_Node>self.children.get(level)
        if self.child1 is not None and self.key1 == level:
            return self.child1
        return None

    cdef _Node find_or_add(self, str level):
        """The literal child for ``level``, created if missing."""
        cdef _Node child = self.find(level)
        if child is not None:
            return child
        child = _Node.__new__(_Node)
        if self.children is not None:
            self.children[level] = child
        elif self.child1 is None:
            self.key1 = level
            self.child1 = child
        else:
            self.children = {self.key1: self.child1, level: child}
            self.key1 = None
            self.child1 = None
        return child

    cdef int remove_child(self, str level) except -1:
        """Detach the (existing) literal child for ``level``."""
        if self.children is None:
            self.key1 = None
            self.child1 = None
            return 0
        del self.children[level]
        if len(self.children) == 1:  # back to the inline form
            for key, child in self.children.items():
                self.key1 = key
                self.child1 = child
            self.children = None
        return 0

    cdef int set_sub(self, object subscriber, object options) except -1:
        cdef tuple entry = (subscriber, options)
        cdef object current
        if self.subs is not None:
            added = subscriber not in self.subs
            self.subs[subscriber] = entry
            return 1 if added else 0
        if self.entry1 is None:
            self.entry1 = entry
            return 1
        current = self.entry1[0]
        if current is subscriber or current == subscriber:
            self.entry1 = entry
            return 0
        self.subs = {current: self.entry1, subscriber: entry}
        self.entry1 = None
        return 1

    cdef int discard_sub(self, object subscriber) except -1:
        cdef object current
        if self.subs is not None:
            if self.subs.pop(subscriber, None) is None:
                return 0
            if len(self.subs) == 1:  # back to the inline form
                for entry in self.subs.values():
                    self.entry1 = entry
                self.subs = None
            return 1
        if self.entry1 is None:
            return 0
        current = self.entry1[0]
        if current is subscriber or current == subscriber:
            self.entry1 = None
            return 1
        return 0

    cdef bint is_empty(self) noexcept:
        # children/subs/groups are None whenever they would be empty.
        return (
            self.child1 is None
            and self.children is None
            and self.plus is None
            and self.hash is None
            and self.entry1 is None
            and self.subs is None
            and self.groups is None
        )


cdef inline int _emit(_Node node, list out, list shared) except -1:
    """Append the subscriptions stored on ``node`` to the result lists."""
    if out is not None:
        if node.entry1 is not None:
            out.append(node.entry1)
        elif node.subs is not None:
            for entry in node.subs.values():
                out.append(entry)
    if shared is not None and node.groups is not None:
        for group in node.groups.values():
            shared.append(group)
    return 0


cdef inline bint _level_is(str key, const char* data, int kind, Py_ssize_t start,
                           Py_ssize_t length) noexcept:
    """Whether ``key`` equals the topic characters [start, start + length)."""
    if PyUnicode_GET_LENGTH(key) != length:
        return False
    cdef int key_kind = PyUnicode_KIND(key)
    cdef const char* key_data = <const char*>PyUnicode_DATA(key)
    if key_kind == kind:
        return memcmp(key_data, data + start * kind, length * kind) == 0
    if key_kind > kind:  # key holds a code point the topic's storage cannot
        return False
    cdef Py_ssize_t j
    for j in range(length):
        if PyUnicode_READ(key_kind, <void*>key_data, j) != PyUnicode_READ(kind, <void*>data, start + j):
            return False
    return True


cdef tuple _split_shared(str topic_filter):
    """(group, filter) of a valid ``$share/{group}/{filter}``, else (None, topic_filter)."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    cdef Py_ssize_t j = topic_filter.find("/", 7)
    return topic_filter[7:j], topic_filter[j + 1:]


# ------------------------------------------------------------------ trie


cdef class SubscriptionTrie:
    """MQTT topic filters -> subscribers, matched by topic name.

    A subscriber is any hashable object; ``options`` is any object, handed
    back with the subscriber by the ``match`` methods. ``len()`` is the
    number of (filter, subscriber) entries, shared ones included.
    """

    def __cinit__(self):
        self._root = _Node.__new__(_Node)
        self._count = 0
        self.generation = 0

    def __len__(self):
        return self._count

    def __repr__(self):
        return f"<SubscriptionTrie: {self._count} subscriptions>"

    def subscribe(self, object topic_filter, object subscriber, object options):
        """Add ``subscriber`` on ``topic_filter`` with ``options``.

        Returns True if the subscription is new, False if it existed and its
        options were replaced [MQTT-3.8.4-3]. ``$share/{group}/{filter}``
        joins (or updates) that shared group. Raises ``ValueError`` for an
        invalid filter (see :func:`validate_topic_filter`) and ``TypeError``
        for an unhashable subscriber.
        """
        topic_filter = _as_str(topic_filter, "topic_filter")
        hash(subscriber)
        if not _filter_ok(topic_filter):
            raise ValueError(f"invalid topic filter: {topic_filter!r}")
        group_name, flt = _split_shared(topic_filter)
        cdef _Node node = self._root
        for level in (<str>flt).split("/"):
            if level == "+":
                if node.plus is None:
                    node.plus = _Node.__new__(_Node)
                node = node.plus
            elif level == "#":
                if node.hash is None:
                    node.hash = _Node.__new__(_Node)
                node = node.hash
            else:
                node = node.find_or_add(level)
        cdef int added
        cdef SharedGroup group
        if group_name is None:
            added = node.set_sub(subscriber, options)
        else:
            if node.groups is None:
                node.groups = {}
            group = node.groups.get(group_name)
            if group is None:
                group = SharedGroup(group_name, flt)
                node.groups[group_name] = group
            added = group._set(subscriber, options)
        self._count += added
        self.generation += 1
        return added == 1

    cdef _Node _find_node(self, str topic_filter, list path):
        """The node of a (plain) filter, or None; appends the nodes above it to ``path``."""
        cdef _Node node = self._root
        for level in topic_filter.split("/"):
            path.append(node)
            if level == "+":
                node = node.plus
            elif level == "#":
                node = node.hash
            else:
                node = node.find(level)
            if node is None:
                return None
        return node

    def unsubscribe(self, object topic_filter, object subscriber):
        """Remove ``subscriber`` from ``topic_filter``; True if it was subscribed.

        A shared group left without members is dropped, and so is every node
        left without subscriptions or children.
        """
        topic_filter = _as_str(topic_filter, "topic_filter")
        hash(subscriber)
        if not _filter_ok(topic_filter):
            return False
        group_name, flt = _split_shared(topic_filter)
        cdef list path = []
        cdef _Node node = self._find_node(flt, path)
        if node is None:
            return False
        cdef SharedGroup group
        if group_name is None:
            if not node.discard_sub(subscriber):
                return False
        else:
            if node.groups is None:
                return False
            group = node.groups.get(group_name)
            if group is None or not group._discard(subscriber):
                return False
            if not group.members:
                del node.groups[group_name]
                if not node.groups:
                    node.groups = None
        self._count -= 1
        self.generation += 1
        # Prune upwards while the node just left is empty.
        cdef list levels = (<str>flt).split("/")
        cdef Py_ssize_t k = len(levels) - 1
        cdef _Node parent
        while k >= 0 and node.is_empty():
            parent = path[k]
            level = levels[k]
            if level == "+":
                parent.plus = None
            elif level == "#":
                parent.hash = None
            else:
                parent.remove_child(level)
            node = parent
            k -= 1
        return True

    cdef int _walk(self, str topic, list out, list shared) except -1:
        """Collect the matches of ``topic`` into ``out`` (plain) and ``shared`` (groups);
        either may be None to skip that kind."""
        ingestd_trie_unicode_ready(topic)
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(topic)
        cdef int kind = PyUnicode_KIND(topic)
        cdef const char* data = <const char*>PyUnicode_DATA(topic)

        # Level i is topic[start[i] : start[i + 1] - 1]; start[nlev] = n + 1.
        cdef Py_ssize_t start_buf[_STACK_LEVELS + 1]
        cdef PyObject* key_buf[_STACK_LEVELS]       # level strings made so far (owned)
        cdef _Frame stack_buf[_STACK_LEVELS + 1]
        cdef Py_ssize_t* start = start_buf
        cdef PyObject** keys = key_buf
        cdef _Frame* stack = stack_buf
        cdef void* heap = NULL
        cdef Py_ssize_t nlev = 1, i
        cdef const char* p
        cdef const char* end = data + n
        if kind == PyUnicode_1BYTE_KIND:
            p = data
            while True:
                p = <const char*>memchr(p, 0x2F, end - p)
                if p == NULL:
                    break
                p += 1
                if nlev <= _STACK_LEVELS:
                    start_buf[nlev] = p - data
                nlev += 1
        else:
            for i in range(n):
                if PyUnicode_READ(kind, <void*>data, i) == 0x2F:
                    if nlev <= _STACK_LEVELS:
                        start_buf[nlev] = i + 1
                    nlev += 1
        if nlev > _STACK_LEVELS:
            # One block for the three arrays; the stack holds at most one frame
            # per level (frames are pushed at strictly increasing levels).
            heap = PyMem_Malloc((nlev + 1) * (sizeof(Py_ssize_t) + sizeof(_Frame))
                                + nlev * sizeof(PyObject*))
            if heap == NULL:
                raise MemoryError()
            stack = <_Frame*>heap
            start = <Py_ssize_t*>(stack + nlev + 1)
            keys = <PyObject**>(start + nlev + 1)
            nlev = 1
            for i in range(n):
                if PyUnicode_READ(kind, <void*>data, i) == 0x2F:
                    start[nlev] = i + 1
                    nlev += 1
        start[0] = 0
        start[nlev] = n + 1
        for i in range(nlev):
            keys[i] = NULL

        # A topic starting with '$' is not matched by '+' or '#' as the first
        # level of a filter [MQTT-4.7.2-1]; those are the root's children.
        cdef bint dollar = n > 0 and PyUnicode_READ(kind, <void*>data, 0) == 0x24
        cdef Py_ssize_t sp = 1, level_start, level_len
        cdef _Node node
        cdef PyObject* found
        cdef object key
        stack[0].node = <PyObject*>self._root
        stack[0].level = 0
        try:
            while sp:
                sp -= 1
                node = <_Node>stack[sp].node
                i = stack[sp].level
                while True:
                    # '#' matches the rest, this level included: "a/#" matches "a".
                    if node.hash is not None and not (dollar and i == 0):
                        _emit(node.hash, out, shared)
                    if i == nlev:
                        _emit(node, out, shared)
                        break
                    if node.plus is not None and not (dollar and i == 0):
                        stack[sp].node = <PyObject*>node.plus
                        stack[sp].level = i + 1
                        sp += 1
                    level_start = start[i]
                    level_len = start[i + 1] - 1 - level_start
                    if node.children is not None:
                        if keys[i] == NULL:
                            key = PyUnicode_Substring(topic, level_start, level_start + level_len)
                            Py_INCREF(key)
                            keys[i] = <PyObject*>key
                        found = PyDict_GetItemWithError(node.children, <object>keys[i])
                        if found == NULL:
                            break
                        node = <_Node>found
                    elif node.child1 is not None and _level_is(
                        node.key1, data, kind, level_start, level_len
                    ):
                        node = node.child1
                    else:
                        break
                    i += 1
        finally:
            for i in range(nlev):
                Py_XDECREF(keys[i])
            PyMem_Free(heap)
        return 0

    def match(self, object topic):
        """[(subscriber, options)] of every plain subscription matching ``topic``.

        A subscriber subscribed with several matching filters appears once
        per filter. The tuples are shared with the trie's storage.
        """
        cdef list out = []
        self._walk(_as_str(topic, "topic"), out, None)
        return out

    def match_shared(self, object topic):
        """[SharedGroup] of every shared subscription whose filter matches ``topic``."""
        cdef list shared = []
        self._walk(_as_str(topic, "topic"), None, shared)
        return shared

    def match_all(self, object topic):
        """``(match(topic), match_shared(topic))`` in one walk."""
        cdef list out = []
        cdef list shared = []
        self._walk(_as_str(topic, "topic"), out, shared)
        return out, shared

    def _node_count(self):
        """Number of nodes below the root (for tests of pruning); O(nodes)."""
        cdef list todo = [self._root]
        cdef Py_ssize_t count = -1  # the root is not counted
        cdef _Node node
        while todo:
            node = todo.pop()
            count += 1
            if node.child1 is not None:
                todo.append(node.child1)
            if node.children is not None:
                todo.extend(node.children.values())
            if node.plus is not None:
                todo.append(node.plus)
            if node.hash is not None:
                todo.append(node.hash)
        return count
