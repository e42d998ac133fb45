# cython: language_level=3
"""SubscriptionTrie: MQTT topic filters in a tree keyed by topic level.

Each node has a dict of literal children plus dedicated '+' and '#'
children, so matching a topic visits only branches that can match: the work
is proportional to the topic's levels and the matching subscriptions, not to
the number of subscriptions stored. Shared subscriptions
(``$share/{group}/{filter}``) live in a :class:`SharedGroup` on the node of
``filter``. Empty nodes are pruned on unsubscribe.
"""

from cpython.unicode cimport PyUnicode_GetLength, PyUnicode_READ_CHAR


cdef class SharedGroup:
    """The members of one ``$share/{name}/{topic_filter}`` group."""

    def __cinit__(self, str name, str topic_filter):
        self.name = name
        self.topic_filter = topic_filter
        self._index = {}
        self.members = []
        self._cursor = 0

    cpdef Py_ssize_t next_index(self) except -1:
        """A round-robin index into ``members``; advances on every call."""
        cdef Py_ssize_t n = len(self.members)
        if n == 0:
            return 0
        if self._cursor >= n:
            self._cursor = 0
        cdef Py_ssize_t i = self._cursor
        self._cursor = i + 1
        return i

    cdef int _add(self, object subscriber, object options) except -1:
        pos = self._index.get(subscriber)
        if pos is None:
            self._index[subscriber] = len(self.members)
            self.members.append((subscriber, options))
            return 1
        self.members[<Py_ssize_t>pos] = (subscriber, options)
        return 0

    cdef bint _remove(self, object subscriber) except -1:
        pos = self._index.pop(subscriber, None)
        if pos is None:
            return False
        cdef Py_ssize_t p = pos
        del self.members[p]
        for k in range(p, len(self.members)):
            self._index[self.members[k][0]] = k
        return True

    def __len__(self):
        return len(self.members)

    def __repr__(self):
        return f"SharedGroup({self.name!r}, {self.topic_filter!r}, {len(self.members)} members)"


cdef class _Node:
    def __cinit__(self):
        self.children = None
        self.plus = None
        self.hash = None
        self.subs = None
        self.groups = None

    cdef bint is_empty(self):
        return (
            not self.children
            and self.plus is None
            and self.hash is None
            and not self.subs
            and not self.groups
        )


cdef inline tuple _split_shared(str topic_filter):
    """('group', 'filter') for a $share filter, else (None, topic_filter)."""
    if topic_filter.startswith("$share/"):
        rest = topic_filter[7:]
        group, _, flt = rest.partition("/")
        return group, flt
    return None, topic_filter


cdef class SubscriptionTrie:
    """Topic filters -> subscribers, matched by topic name."""

    def __cinit__(self):
        self._root = _Node()
        self._count = 0

    def __len__(self):
        return self._count

    cdef _Node _walk_create(self, list levels):
        cdef _Node node = self._root
        cdef _Node child
        for level in levels:
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            elif level == "#":
                if node.hash is None:
                    node.hash = _Node()
                node = node.hash
            else:
                if node.children is None:
                    node.children = {}
                child = node.children.get(level)
                if child is None:
                    child = _Node()
                    node.children[level] = child
                node = child
        return node

    def subscribe(self, str topic_filter, object subscriber, object options):
        """Add ``subscriber`` with ``options``; True if new, False if its options were replaced."""
        group, flt = _split_shared(topic_filter)
        cdef _Node node = self._walk_create(flt.split("/"))
        cdef SharedGroup g
        if group is None:
            if node.subs is None:
                node.subs = {}
            new = subscriber not in node.subs
            node.subs[subscriber] = options
        else:
            if node.groups is None:
                node.groups = {}
            g = node.groups.get(group)
            if g is None:
                g = SharedGroup(group, flt)
                node.groups[group] = g
            new = g._add(subscriber, options) == 1
        if new:
            self._count += 1
        return new

    def unsubscribe(self, str topic_filter, object subscriber):
        """Remove one subscription; True if it existed. Empty nodes are pruned."""
        group, flt = _split_shared(topic_filter)
        cdef list path = []  # (parent, key) pairs; key is a level, '+' or '#'
        cdef _Node node = self._root
        cdef _Node child
        for level in flt.split("/"):
            if level == "+":
                child = node.plus
            elif level == "#":
                child = node.hash
            else:
                child = node.children.get(level) if node.children is not None else None
            if child is None:
                return False
            path.append((node, level))
            node = child
        cdef SharedGroup g
        if group is None:
            if node.subs is None or subscriber not in node.subs:
                return False
            del node.subs[subscriber]
        else:
            if node.groups is None:
                return False
            g = node.groups.get(group)
            if g is None or not g._remove(subscriber):
                return False
            if not g.members:
                del node.groups[group]
        self._count -= 1
        cdef _Node parent
        for parent, level in reversed(path):
            if level == "+":
                child = parent.plus
            elif level == "#":
                child = parent.hash
            else:
                child = parent.children[level]
            if not child.is_empty():
                break
            if level == "+":
                parent.plus = None
            elif level == "#":
                parent.hash = None
            else:
                del parent.children[level]
        return True

    cdef int _collect(self, _Node node, list levels, Py_ssize_t i, list out, list shared) except -1:
        cdef Py_ssize_t n = len(levels)
        cdef _Node child
        cdef bint dollar
        while True:
            # '#' below this node matches the rest (and this level itself: "a/#" matches "a").
            dollar = i == 0 and (<str>levels[0]).startswith("$")
            child = node.hash
            if child is not None and not dollar:
                if child.subs:
                    out.extend(child.subs.items())
                if child.groups:
                    shared.extend(child.groups.values())
            if i == n:
                if node.subs:
                    out.extend(node.subs.items())
                if node.groups:
                    shared.extend(node.groups.values())
                return 0
            child = node.plus
            if child is not None and not dollar:
                if node.children is not None:
                    literal = node.children.get(levels[i])
                    if literal is not None:
                        self._collect(<_Node>literal, levels, i + 1, out, shared)
                node = child
                i += 1
                continue
            if node.children is None:
                return 0
            literal = node.children.get(levels[i])
            if literal is None:
                return 0
            node = <_Node>literal
            i += 1

    def match(self, str topic):
        """[(subscriber, options)] of every plain subscription matching ``topic``."""
        cdef list out = []
        cdef list shared = []
        self._collect(self._root, topic.split("/"), 0, out, shared)
        return out

    def match_shared(self, str topic):
        """[SharedGroup] of every $share subscription matching ``topic``."""
        cdef list out = []
        cdef list shared = []
        self._collect(self._root, topic.split("/"), 0, out, shared)
        return shared

    def match_all(self, str topic):
        """(plain matches, shared groups) in one walk."""
        cdef list out = []
        cdef list shared = []
        self._collect(self._root, topic.split("/"), 0, out, shared)
        return out, shared

    def _node_count(self):
        """Number of nodes below the root (tests check pruning with it)."""
        cdef list stack = [self._root]
        cdef Py_ssize_t count = 0
        cdef _Node node
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            if node.plus is not None:
                stack.append(node.plus)
            if node.hash is not None:
                stack.append(node.hash)
            count += 1
        return count - 1


cdef inline bint _has_nul(str s):
    return "\x00" in s


def validate_topic_name(str topic):
    """A valid PUBLISH topic: non-empty, no wildcards, no U+0000, at most 65535 UTF-8 bytes."""
    if not topic or "+" in topic or "#" in topic or _has_nul(topic):
        return False
    return len(topic.encode("utf-8", "surrogatepass")) <= 65535


def validate_topic_filter(str topic_filter):
    """A valid SUBSCRIBE filter, '$share/{group}/{filter}' included."""
    if not topic_filter or _has_nul(topic_filter):
        return False
    if len(topic_filter.encode("utf-8", "surrogatepass")) > 65535:
        return False
    flt = topic_filter
    if topic_filter.startswith("$share/"):
        group, sep, flt = topic_filter[7:].partition("/")
        if not sep or not group or not flt or "+" in group or "#" in group:
            return False
    cdef list levels = flt.split("/")
    cdef Py_ssize_t last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "#":
            if i != last:
                return False
        elif level == "+":
            pass
        elif "+" in level or "#" in level:
            return False
    return True
