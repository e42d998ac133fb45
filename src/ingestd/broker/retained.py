"""RetainedStore: the last retained message per topic, matched by topic filter.

A tree keyed by topic level, so a subscription's filter walks only the
branches it can match: delivering retained messages for
``company/acme/machine/+/status`` does not scan every retained topic.
"""

from __future__ import annotations

from collections.abc import Iterator

from ingestd.broker.message import Message


class _Node:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.message: Message | None = None


class RetainedStore:
    """Retained messages by topic. Bounded by ``max_messages``."""

    def __init__(self, max_messages: int = 1_000_000) -> None:
        self._root = _Node()
        self._count = 0
        self.max_messages = max_messages

    def __len__(self) -> int:
        return self._count

    def set(self, message: Message) -> bool:
        """Store (or replace) the retained message of its topic.

        An empty payload deletes it [MQTT-3.3.1-6]. Returns False when the
        store is full and the topic had no retained message (the caller counts
        the drop).
        """
        if not message.payload:
            self.delete(message.topic)
            return True
        node = self._root
        levels = message.topic.split("/")
        for level in levels:
            child = node.children.get(level)
            if child is None:
                if self._count >= self.max_messages and self.get(message.topic) is None:
                    return False
                child = node.children[level] = _Node()
            node = child
        if node.message is None:
            self._count += 1
        node.message = message
        return True

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
        self._count -= 1
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
