"""ingestd._trie against a naive reference: random filters, topics and (un)subscribe sequences.

The reference keeps every subscription in a dict and matches a filter
against a topic level by level; the trie must agree on every match, on the
return values of subscribe/unsubscribe, on len(), on the shared groups (name,
filter, members in order) and, after pruning, on its number of nodes.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from ingestd._trie import SubscriptionTrie, validate_topic_filter, validate_topic_name

# Small alphabets so that filters and topics collide often. Non-ASCII levels
# of each str width (1, 2 and 4 bytes per character) exercise the in-place
# level comparison across widths.
TOPIC_LEVELS = ["", "a", "b", "$sys", "$", "é", "€", "😀", "a€"]
FILTER_LEVELS = [*TOPIC_LEVELS, "+"]
GROUPS = ["g1", "g2"]
SUBSCRIBERS = [0, 1, 2]


def ref_match(topic_filter: str, topic: str) -> bool:
    """MQTT §4.7 matching, the plain way: level by level."""
    f = topic_filter.split("/")
    t = topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):  # [MQTT-4.7.2-1]
        return False
    for i, level in enumerate(f):
        if level == "#":  # the rest, including no level at all ("a/#" matches "a")
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def split_share(topic_filter: str) -> tuple[str | None, str]:
    if topic_filter.startswith("$share/"):
        group, _, flt = topic_filter[len("$share/") :].partition("/")
        return group, flt
    return None, topic_filter


class Reference:
    """The same operations as SubscriptionTrie over a plain dict."""

    def __init__(self) -> None:
        # (group or None, filter) -> {subscriber: options}, insertion-ordered
        self.entries: dict[tuple[str | None, str], dict[object, object]] = {}

    def subscribe(self, topic_filter: str, subscriber: object, options: object) -> bool:
        key = split_share(topic_filter)
        members = self.entries.setdefault(key, {})
        new = subscriber not in members
        members[subscriber] = options
        return new

    def unsubscribe(self, topic_filter: str, subscriber: object) -> bool:
        key = split_share(topic_filter)
        members = self.entries.get(key)
        if members is None or subscriber not in members:
            return False
        del members[subscriber]
        if not members:
            del self.entries[key]
        return True

    def __len__(self) -> int:
        return sum(len(m) for m in self.entries.values())

    def match(self, topic: str) -> Counter:
        return Counter(
            (sub, opts)
            for (group, flt), members in self.entries.items()
            if group is None and ref_match(flt, topic)
            for sub, opts in members.items()
        )

    def match_shared(self, topic: str) -> list:
        return sorted(
            (group, flt, list(members.items()))
            for (group, flt), members in self.entries.items()
            if group is not None and ref_match(flt, topic)
        )

    def node_count(self) -> int:
        """A trie node per distinct level prefix of a stored filter."""
        prefixes = set()
        for _, flt in self.entries:
            levels = tuple(flt.split("/"))
            prefixes.update(levels[:k] for k in range(1, len(levels) + 1))
        return len(prefixes)


@st.composite
def filters(draw) -> str:
    # [""] would be the empty string, which is not a filter.
    levels = draw(
        st.lists(st.sampled_from(FILTER_LEVELS), min_size=1, max_size=4).filter(lambda v: v != [""])
    )
    if draw(st.booleans()):
        levels = [*levels[:3], "#"] if draw(st.booleans()) else ["#"]
    flt = "/".join(levels)
    if draw(st.integers(0, 3)) == 0:
        flt = f"$share/{draw(st.sampled_from(GROUPS))}/{flt}"
    return flt


topics = st.lists(st.sampled_from(TOPIC_LEVELS), min_size=1, max_size=5).map("/".join)

operations = st.lists(
    st.tuples(
        st.sampled_from(["sub", "sub", "unsub"]),
        filters(),
        st.sampled_from(SUBSCRIBERS),
        st.integers(0, 2),
    ),
    max_size=40,
)


def shared_view(groups: list) -> list:
    return sorted((g.name, g.topic_filter, list(g.members)) for g in groups)


def check_same(trie: SubscriptionTrie, ref: Reference, topic: str) -> None:
    plain, groups = trie.match_all(topic)
    assert Counter(plain) == ref.match(topic), topic
    assert Counter(trie.match(topic)) == ref.match(topic), topic
    assert shared_view(groups) == ref.match_shared(topic), topic
    assert shared_view(trie.match_shared(topic)) == ref.match_shared(topic), topic


@settings(max_examples=400, deadline=None)
@given(ops=operations, probe=st.lists(topics, min_size=1, max_size=10))
def test_trie_agrees_with_reference(ops, probe):
    trie = SubscriptionTrie()
    ref = Reference()
    for op, flt, sub, opts in ops:
        if op == "sub":
            assert trie.subscribe(flt, sub, opts) == ref.subscribe(flt, sub, opts)
        else:
            assert trie.unsubscribe(flt, sub) == ref.unsubscribe(flt, sub)
        assert len(trie) == len(ref)
    assert trie._node_count() == ref.node_count()
    for topic in probe:
        check_same(trie, ref, topic)
    # Everything removed again: nothing left behind.
    for (group, flt), members in list(ref.entries.items()):
        full = flt if group is None else f"$share/{group}/{flt}"
        for sub in list(members):
            assert trie.unsubscribe(full, sub)
            ref.unsubscribe(full, sub)
            assert len(trie) == len(ref)
    assert len(trie) == 0
    assert trie._node_count() == 0
    for topic in probe:
        assert trie.match_all(topic) == ([], [])


@settings(max_examples=300, deadline=None)
@given(flts=st.lists(filters(), min_size=1, max_size=30), topic=topics)
def test_each_filter_alone_and_all_together(flts, topic):
    """Every filter matches alone exactly as the reference says, and together they add up."""
    together = SubscriptionTrie()
    expected_plain = 0
    expected_shared = set()
    for i, flt in enumerate(flts):
        group, inner = split_share(flt)
        hit = ref_match(inner, topic)
        alone = SubscriptionTrie()
        alone.subscribe(flt, i, None)
        plain, shared = alone.match_all(topic)
        assert (bool(plain) if group is None else bool(shared)) is hit, (flt, topic)
        assert not (shared if group is None else plain)
        if together.subscribe(flt, i, None) and hit:
            if group is None:
                expected_plain += 1
            else:
                expected_shared.add((group, inner))
    plain, shared = together.match_all(topic)
    assert len(plain) == expected_plain
    assert {(g.name, g.topic_filter) for g in shared} == expected_shared


# ------------------------------------------------------------------ validation


def ref_validate_filter(s: str) -> bool:
    if not s or "\x00" in s or len(s.encode("utf-8", "surrogatepass")) > 65535:
        return False
    if any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        return False
    if s.startswith("$share/"):
        group, sep, s = s[len("$share/") :].partition("/")
        if not sep or not group or "+" in group or "#" in group or not s:
            return False
    levels = s.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return False
        elif level != "+" and ("+" in level or "#" in level):
            return False
    return True


def ref_validate_name(s: str) -> bool:
    return (
        bool(s)
        and not any(c in s for c in "+#\x00")
        and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)
        and len(s.encode("utf-8", "surrogatepass")) <= 65535
    )


PIECES = ["a", "/", "+", "#", "$share", "$share/", "g", "\x00", "é", "€", "😀", "\ud800", ""]
strings = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)


@settings(max_examples=1000, deadline=None)
@given(s=strings)
def test_validators_agree_with_reference(s):
    assert validate_topic_filter(s) is ref_validate_filter(s)
    assert validate_topic_name(s) is ref_validate_name(s)


@settings(max_examples=200, deadline=None)
@given(flt=filters())
def test_generated_filters_are_valid(flt):
    assert validate_topic_filter(flt)


@settings(max_examples=200, deadline=None)
@given(topic=topics)
def test_generated_topics_are_valid_names(topic):
    assert validate_topic_name(topic) is (topic != "")
