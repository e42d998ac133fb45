"""RetainedStore: the last retained message per topic, matched by topic filter.

A tree keyed by topic level, so a subscription's filter walks only the
branches it can match: delivering retained messages for
``company/acme/machine/+/status`` does not scan every retained topic.

Bounds: ``max_messages`` in all (``mqtt.max_retained_messages``) and, when
``max_per_tree`` is set (``mqtt.max_retained_per_tree``), per topic tree: the
topics whose first ``tree_levels`` levels are equal share one count, so one
tenant (``company/acme/...``) cannot take the whole store. Replacing or
deleting a topic's retained message is never refused. The broker's own
``$SYS/`` statistics (a fixed set, :mod:`ingestd.broker.sysinfo`) count in
``len()`` but not against those limits, so they never take a client's room.
"""

from __future__ import annotations

from collections.abc import Iterator

from ingestd.broker.message import Message


class _Node:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.message: Message | None = None


# What RetainedStore.set refuses a new retained topic for (the config keys).
FULL = "max_retained_messages"
TREE_FULL = "max_retained_per_tree"


class RetainedStore:
    """Retained messages by topic. Bounded by ``max_messages`` (and ``max_per_tree``)."""

    def __init__(
        self, max_messages: int = 1_000_000, max_per_tree: int = 0, tree_levels: int = 2
    ) -> None:
        self._root = _Node()
        self._count = 0  # clients' retained topics (the ones the limits count)
        self._own = 0  # the broker's own $SYS/ topics
        self.max_messages = max_messages
        self.max_per_tree = max_per_tree
        self.tree_levels = tree_levels
        # tree (the first tree_levels levels of a topic) -> retained topics under it;
        # kept only with a per-tree limit.
        self._per_tree: dict[str, int] = {}

    def __len__(self) -> int:
        return self._count + self._own

    def tree(self, topic: str) -> str:
        """The tree ``topic`` counts against: its first ``tree_levels`` levels."""
        return "/".join(topic.split("/", self.tree_levels)[: self.tree_levels])

    def in_tree(self, tree: str) -> int:
        """Retained messages counted against ``tree`` (with a per-tree limit)."""
        return self._per_tree.get(tree, 0)

    def set(self, message: Message) -> str | None:
        """Store (or replace) the retained message of its topic.

        An empty payload deletes it [MQTT-3.3.1-6]. Returns None when done, or
        the limit that refuses a topic with no retained message yet
        (:data:`FULL`, :data:`TREE_FULL`); the caller counts and logs it.
        """
        topic = message.topic
        if not message.payload:
            self.delete(topic)
            return None
        own = topic.startswith("$SYS/")
        node = self._root
        levels = topic.split("/")
        for level in levels:
            child = node.children.get(level)
            if child is None:
                refused = None if own else self._refuses(topic)
                if refused is not None:
                    return refused
                child = node.children[level] = _Node()
            node = child
        if node.message is None and own:
            self._own += 1
        elif node.message is None:
            refused = self._refuses(topic)  # the node existed (a deeper topic made it)
            if refused is not None:
                return refused
            self._count += 1
            if self.max_per_tree:
                tree = self.tree(topic)
                self._per_tree[tree] = self._per_tree.get(tree, 0) + 1
        node.message = message
        return None

    def _refuses(self, topic: str) -> str | None:
        """The limit a new retained topic would pass, or None."""
        if self._count >= self.max_messages:
            return FULL
        if self.max_per_tree and self._per_tree.get(self.tree(topic), 0) >= self.max_per_tree:
            return TREE_FULL
        return None

    def get(self, topic: str) -> Message | None:
        node: _Node | None = self._root
        for level in topic.split("/"):
            assert node is not None
            node = node.children.get(level)
            if node is None:
                return None
        return node.message if node is not None else None

    def delete(self, topic: str) -> bool:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.message is None:
            return False
        node.message = None
        if topic.startswith("$SYS/"):
            self._own -= 1
        else:
            self._count -= 1
        if self.max_per_tree and not topic.startswith("$SYS/"):
            tree = self.tree(topic)
            left = self._per_tree[tree] - 1
            if left:
                self._per_tree[tree] = left
            else:
                del self._per_tree[tree]
        # Prune empty branches so deleted topics cost no memory.
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.message is None and not child.children:
                del parent.children[level]
            else:
                break
        return True

    def match(self, topic_filter: str) -> Iterator[Message]:
        """Every retained message whose topic matches ``topic_filter``.

        Wildcards at the first level do not match topics starting with ``$``
        [MQTT-4.7.2-1].
        """
        yield from self._walk(self._root, topic_filter.split("/"), 0)

    def _walk(self, node: _Node, levels: list[str], i: int) -> Iterator[Message]:
        if i == len(levels):
            if node.message is not None:
                yield node.message
            return
        level = levels[i]
        if level == "#":
            # '#' matches the parent level too ("a/#" matches "a").
            if node.message is not None and i > 0:
                yield node.message
            yield from self._all(node, skip_dollar=(i == 0))
        elif level == "+":
            for name, child in node.children.items():
                if i == 0 and name.startswith("$"):
                    continue
                yield from self._walk(child, levels, i + 1)
        else:
            exact = node.children.get(level)
            if exact is not None:
                yield from self._walk(exact, levels, i + 1)

    def _all(self, node: _Node, skip_dollar: bool) -> Iterator[Message]:
        stack = [
            child
            for name, child in node.children.items()
            if not (skip_dollar and name.startswith("$"))
        ]
        while stack:
            n = stack.pop()
            if n.message is not None:
                yield n.message
            stack.extend(n.children.values())

    def messages(self) -> Iterator[Message]:
        """Every retained message (for persistence)."""
        if self._root.message is not None:
            yield self._root.message
        yield from self._all(self._root, skip_dollar=False)
