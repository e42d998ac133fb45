"""ingestd._trie: matching (MQTT 5 §4.7 / 3.1.1 §4.7), shared groups, pruning, validation.

The contract is docs/codec.md, section ``ingestd._trie``. The randomised
comparison with a reference matcher is in test_trie_property.py.
"""

from __future__ import annotations

import threading

import pytest
from ingestd._trie import (
    SharedGroup,
    SubscriptionTrie,
    validate_topic_filter,
    validate_topic_name,
)


def matched(flt: str, topic: str) -> bool:
    """Whether a trie holding only ``flt`` matches ``topic`` (shared or plain)."""
    t = SubscriptionTrie()
    t.subscribe(flt, "s", None)
    if flt.startswith("$share/"):
        return bool(t.match_shared(topic))
    return bool(t.match(topic))


def names(t: SubscriptionTrie, topic: str) -> list:
    return sorted(sub for sub, _ in t.match(topic))


# ------------------------------------------------------------------ matching

# (filter, topic, matches?) — the examples of MQTT 5 §4.7.1 and §4.7.2
# (identical in 3.1.1 §4.7), then the edge cases around them.
SPEC_CASES = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis", False),
    ("sport/#", "sport", True),  # '#' includes the parent level
    ("sport/#", "sport/", True),
    ("sport/#", "sports", False),
    ("sport/tennis/#", "sport/tennis/player1/ranking", True),
    ("#", "sport", True),
    ("#", "sport/tennis/player1", True),
    ("#", "/", True),
    ("#", "/finance", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/tennis/+", "sport/tennis", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),  # '+' matches an empty level
    ("+", "sport", True),
    ("+", "/finance", False),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+/tennis/#", "sport/tennis", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("+/tennis/#", "sport/badminton", False),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("sport/+/player1", "sport/tennis/player2", False),
    ("sport/+/player1", "sport//player1", True),
    # 4.7.3 topic semantics: levels are compared exactly
    ("/finance", "finance", False),
    ("finance", "/finance", False),
    ("/finance", "/finance", True),
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("Accounts", "Accounts payable", False),
    # empty levels, leading and trailing '/'
    ("/", "/", True),
    ("/", "//", False),
    ("+/+", "/", True),
    ("+", "/", False),
    ("a//b", "a//b", True),
    ("a//b", "a/b", False),
    ("a/+/b", "a//b", True),
    ("a/", "a/", True),
    ("a/", "a", False),
    ("a", "a/", False),
    ("a/+", "a/", True),
    ("a/+", "a", False),
    ("a/#", "a", True),
    ("a/#", "a//", True),
    ("//#", "/", True),
    ("//#", "//x", True),
    ("+/#", "a", True),
    ("+/#", "/", True),
    ("+/+/#", "a", False),
    ("+/+/+", "//", True),
    # a literal level that looks like a prefix or a wildcard neighbour
    ("a/b", "a/bc", False),
    ("a/bc", "a/b", False),
    ("a/b/c", "a/b", False),
    ("a/b", "a/b/c", False),
]

# [MQTT-4.7.2-1]: a wildcard as the first level does not match a topic
# starting with '$'; a literal '$' level then wildcards do.
DOLLAR_CASES = [
    ("#", "$SYS/broker/load", False),
    ("#", "$SYS", False),
    ("#", "$", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS/x", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/+", "$SYS/", True),
    ("$SYS", "$SYS", True),
    ("$", "$", True),
    ("$sys/#", "$SYS/x", False),
    # only the first level is special
    ("a/#", "a/$SYS", True),
    ("a/+", "a/$x", True),
    ("+/$x", "a/$x", True),
    ("#", "a$/b", True),
    ("+", "x$", True),
    # a '$' that is not first in the topic is an ordinary character
    ("#", "/$SYS", True),
    ("+/+", "/$SYS", True),
]

# Unicode levels: the trie compares characters in place, across str storage
# widths (1-, 2- and 4-byte code units), so mix them.
UNICODE_CASES = [
    ("café/+", "café/x", True),
    ("café/+", "cafe/x", False),
    ("a/é", "a/é", True),
    ("a/é", "a/€", False),
    ("a/x", "a/x/€", False),
    ("a/x/+", "a/x/€", True),
    ("a/€", "a/€", True),
    ("a/😀", "a/😀", True),
    ("a/😀/b", "a/😀/b", True),
    ("a/b", "€/b", False),
    ("€/b", "€/b", True),
    ("x/b", "x/b/😀", False),
    ("x/b/#", "x/b/😀", True),
    ("x/é", "x/é😀", False),
    ("x/é😀", "x/é😀", True),
    ("😀/+/#", "😀/é/€", True),
    ("\u0100", "\u0100", True),
    ("\u0100", "\u0101", False),
    ("k/é", "k/é/\u0100", False),
]


@pytest.mark.parametrize(("flt", "topic", "expected"), SPEC_CASES + DOLLAR_CASES + UNICODE_CASES)
def test_match_table(flt, topic, expected):
    assert matched(flt, topic) is expected


@pytest.mark.parametrize(("flt", "topic", "expected"), SPEC_CASES + DOLLAR_CASES + UNICODE_CASES)
def test_match_table_shared(flt, topic, expected):
    """The same rules hold for the filter of a shared subscription."""
    assert matched(f"$share/g/{flt}", topic) is expected


@pytest.mark.parametrize(("flt", "topic", "expected"), SPEC_CASES + DOLLAR_CASES + UNICODE_CASES)
def test_match_table_in_a_crowd(flt, topic, expected):
    """The same answers with neighbours: literal siblings, '+' and '#' branches at every level.

    Neighbours force nodes to have several children (dict lookups instead
    of the single-child comparison) and pending '+' branches.
    """
    t = SubscriptionTrie()
    levels = flt.split("/")
    for i in range(len(levels) + 1):
        prefix = levels[:i]
        if "#" in prefix:
            break
        for extra in ("zz", "+/zz", "zz/#"):
            t.subscribe("/".join([*prefix, extra]), "other", None)
    t.subscribe(flt, "s", None)
    got = [sub for sub, _ in t.match(topic) if sub == "s"]
    assert bool(got) is expected


def test_every_matching_filter_is_reported():
    t = SubscriptionTrie()
    filters = [
        "sport/tennis/player1",
        "sport/tennis/+",
        "sport/+/player1",
        "sport/#",
        "sport/tennis/player1/#",
        "+/+/+",
        "+/tennis/#",
        "#",
    ]
    for f in filters:
        t.subscribe(f, f, None)
    for f in ("sport/tennis", "sport/tennis/player1/x", "+/+", "x/#", "sport/tennis/player2"):
        t.subscribe(f, f, None)
    assert names(t, "sport/tennis/player1") == sorted(filters)
    assert names(t, "$SYS/tennis/player1") == []


def test_subscriber_with_several_matching_filters_appears_once_per_filter():
    t = SubscriptionTrie()
    t.subscribe("a/b", "s", 0)
    t.subscribe("a/+", "s", 1)
    t.subscribe("#", "s", 2)
    assert sorted(t.match("a/b"), key=lambda e: e[1]) == [("s", 0), ("s", 1), ("s", 2)]


def test_match_returns_subscriber_and_options():
    t = SubscriptionTrie()
    opts = {"qos": 1}
    t.subscribe("a/b", "s", opts)
    t.subscribe("a/b", "u", None)
    got = t.match("a/b")
    assert sorted(got, key=repr) == sorted([("s", opts), ("u", None)], key=repr)
    assert next(o for s, o in got if s == "s") is opts
    assert t.match("a/c") == []
    assert t.match_all("a/b") == (t.match("a/b"), [])


def test_empty_trie():
    t = SubscriptionTrie()
    assert len(t) == 0
    assert t._node_count() == 0
    assert t.match("a") == []
    assert t.match("") == []
    assert t.match_shared("a") == []
    assert t.match_all("a") == ([], [])


def test_many_subscribers_on_one_node():
    t = SubscriptionTrie()
    for i in range(1000):
        assert t.subscribe("a/+/c", i, i * 2)
    assert len(t) == 1000
    assert sorted(t.match("a/b/c")) == [(i, i * 2) for i in range(1000)]


def test_many_children_on_one_node():
    t = SubscriptionTrie()
    for i in range(1000):
        t.subscribe(f"a/{i}/c", i, None)
    for i in (0, 1, 500, 999):
        assert names(t, f"a/{i}/c") == [i]
    assert names(t, "a/1000/c") == []
    assert t._node_count() == 1 + 1000 * 2


# --------------------------------------------------------------- deep topics


def test_topics_deeper_than_the_stack_buffers():
    t = SubscriptionTrie()
    deep = "/".join(f"l{i}" for i in range(100))
    t.subscribe(deep, "exact", None)
    t.subscribe("/".join(["+"] * 100), "plus", None)
    t.subscribe("/".join(["+"] * 50) + "/#", "half", None)
    t.subscribe("l0/#", "root", None)
    assert names(t, deep) == ["exact", "half", "plus", "root"]
    assert names(t, deep + "/x") == ["half", "root"]
    assert names(t, "/".join(f"l{i}" for i in range(40))) == ["root"]


@pytest.mark.parametrize("n", [31, 32, 33, 34, 64])
def test_level_counts_around_the_stack_buffer_size(n):
    t = SubscriptionTrie()
    topic = "/".join(f"x{i}" for i in range(n))
    t.subscribe(topic, "exact", None)
    t.subscribe("/".join(["+"] * n), "plus", None)
    t.subscribe("/".join(["+"] * (n - 1)) + "/#", "hash", None)
    assert names(t, topic) == ["exact", "hash", "plus"]
    assert names(t, topic + "/more") == ["hash"]
    assert names(t, "/".join(f"x{i}" for i in range(n - 1))) == ["hash"]


def test_topic_of_65535_levels():
    """The walk keeps pending '+' branches on an explicit stack, not the C stack."""
    t = SubscriptionTrie()
    empty_levels = "/" * 65534  # 65535 empty levels
    # Every node of both chains has a literal and a '+' child: worst case for branching.
    t.subscribe("#", "hash", None)
    for k in range(0, 200):
        t.subscribe("/" * k + "+/#", ("plus", k), None)
    t.subscribe(empty_levels, "exact", None)
    got = t.match(empty_levels)
    assert len(got) == 1 + 200 + 1
    assert ("exact", None) in got


def test_deepest_filter_is_freed_without_deep_c_recursion():
    """Freeing a chain of 65,535 nodes must not recurse once per node (a client
    can subscribe to such a filter): on a 1 MiB thread stack that would crash
    the process."""
    done = []

    def run() -> None:
        t = SubscriptionTrie()
        t.subscribe("/" * 65534, "deep", None)
        t.subscribe("/" * 30000 + "+/#", "branch", None)
        assert len(t.match("/" * 65534)) == 2
        assert t._node_count() == 65535 + 2
        del t
        t = SubscriptionTrie()
        t.subscribe("/" * 65534, "deep", None)
        assert t.unsubscribe("/" * 65534, "deep")
        assert t._node_count() == 0
        done.append(True)

    old = threading.stack_size(1 << 20)
    try:
        th = threading.Thread(target=run)
        th.start()
        th.join()
    finally:
        threading.stack_size(old)
    assert done == [True]


def test_unicode_topic_with_wide_first_level_and_ascii_dict_keys():
    t = SubscriptionTrie()
    t.subscribe("€/a", 1, None)
    t.subscribe("€/b", 2, None)  # '€' node now has a dict of children
    t.subscribe("€/😀", 3, None)
    assert names(t, "€/a") == [1]
    assert names(t, "€/b") == [2]
    assert names(t, "€/😀") == [3]
    assert names(t, "€/c") == []


def test_str_subclass_topic():
    class Topic(str):
        pass

    t = SubscriptionTrie()
    t.subscribe("a/b", "s", None)
    t.subscribe("a/c", "u", None)
    assert names(t, Topic("a/b")) == ["s"]


@pytest.mark.parametrize("method", ["match", "match_shared", "match_all"])
def test_match_rejects_non_str(method):
    t = SubscriptionTrie()
    with pytest.raises(TypeError):
        getattr(t, method)(None)
    with pytest.raises(TypeError):
        getattr(t, method)(b"a/b")


# ------------------------------------------------------- subscribe semantics


def test_subscribe_returns_true_when_new_false_when_replaced():
    t = SubscriptionTrie()
    assert t.subscribe("a/b", "s", 1) is True
    assert t.subscribe("a/b", "s", 2) is False
    assert t.match("a/b") == [("s", 2)]
    assert len(t) == 1
    assert t.subscribe("a/b", "u", 3) is True
    assert t.subscribe("a/b", "s", 4) is False
    assert sorted(t.match("a/b")) == [("s", 4), ("u", 3)]
    assert t.subscribe("a/b", "u", 5) is False
    assert sorted(t.match("a/b")) == [("s", 4), ("u", 5)]
    assert len(t) == 2


def test_same_subscriber_on_different_filters_counts_separately():
    t = SubscriptionTrie()
    assert t.subscribe("a", "s", None)
    assert t.subscribe("a/#", "s", None)
    assert t.subscribe("$share/g/a", "s", None)
    assert t.subscribe("$share/h/a", "s", None)
    assert len(t) == 4


def test_subscribers_are_compared_by_equality_like_dict_keys():
    t = SubscriptionTrie()
    assert t.subscribe("a", ("client", 1), 1)
    assert not t.subscribe("a", ("client", 1), 2)  # an equal tuple is the same subscriber
    assert t.match("a") == [(("client", 1), 2)]
    assert t.unsubscribe("a", ("client", 1))
    assert len(t) == 0


def test_unhashable_subscriber_is_refused():
    t = SubscriptionTrie()
    with pytest.raises(TypeError):
        t.subscribe("a", [], None)
    with pytest.raises(TypeError):
        t.unsubscribe("a", {})
    assert len(t) == 0
    assert t._node_count() == 0


@pytest.mark.parametrize(
    "flt", ["", "a#", "a/#/b", "a+", "+a", "#/a", "a\x00b", "$share/g", "$share//x", "$share/g+/x"]
)
def test_subscribe_refuses_invalid_filters(flt):
    t = SubscriptionTrie()
    with pytest.raises(ValueError):
        t.subscribe(flt, "s", None)
    assert len(t) == 0
    assert t._node_count() == 0
    assert t.unsubscribe(flt, "s") is False


def test_options_may_be_any_object_even_none():
    t = SubscriptionTrie()
    sentinel = object()
    t.subscribe("x", 1, sentinel)
    t.subscribe("x", 2, None)
    assert dict(t.match("x")) == {1: sentinel, 2: None}


def test_transitions_between_single_and_several_entries():
    """One child / one subscriber is stored inline; a second one switches to a dict and back."""
    t = SubscriptionTrie()
    t.subscribe("a/b", "s1", 1)
    assert names(t, "a/b") == ["s1"]
    t.subscribe("a/c", "s2", 2)  # 'a' gets a second child
    t.subscribe("a/b", "s3", 3)  # 'a/b' gets a second subscriber
    assert names(t, "a/b") == ["s1", "s3"]
    assert names(t, "a/c") == ["s2"]
    assert t.unsubscribe("a/c", "s2")  # back to one child
    assert names(t, "a/b") == ["s1", "s3"]
    assert names(t, "a/c") == []
    assert t.unsubscribe("a/b", "s1")  # back to one subscriber
    assert t.match("a/b") == [("s3", 3)]
    assert not t.subscribe("a/b", "s3", 4)  # replacing the inline entry
    assert t.match("a/b") == [("s3", 4)]
    t.subscribe("a/d", "s4", 5)
    t.subscribe("a/e", "s5", 6)
    assert names(t, "a/d") == ["s4"]
    assert names(t, "a/e") == ["s5"]
    assert names(t, "a/b") == ["s3"]
    for f, s in (("a/b", "s3"), ("a/d", "s4"), ("a/e", "s5")):
        assert t.unsubscribe(f, s)
    assert len(t) == 0
    assert t._node_count() == 0


# --------------------------------------------------------------- unsubscribe


def test_unsubscribe_returns_whether_it_existed():
    t = SubscriptionTrie()
    t.subscribe("a/b", "s", None)
    assert t.unsubscribe("a/b", "u") is False
    assert t.unsubscribe("a/c", "s") is False
    assert t.unsubscribe("a", "s") is False
    assert t.unsubscribe("a/b/c", "s") is False
    assert t.unsubscribe("a/+", "s") is False
    assert t.unsubscribe("$share/g/a/b", "s") is False
    assert len(t) == 1
    assert t.unsubscribe("a/b", "s") is True
    assert t.unsubscribe("a/b", "s") is False
    assert len(t) == 0
    assert t.match("a/b") == []


@pytest.mark.parametrize(
    ("filters", "nodes"),
    [
        (["a"], 1),
        (["a/b/c"], 3),
        (["a/b/c", "a/b/d"], 4),
        (["a/+/#"], 3),
        (["+", "#", "a"], 3),
        (["/"], 2),
        (["a/b", "a/+", "a/#", "a"], 4),
        (["$share/g/a/b", "a/b"], 2),
        (["$share/g/a/b", "$share/h/a/b/c"], 3),
    ],
)
def test_node_count_and_full_pruning(filters, nodes):
    t = SubscriptionTrie()
    for i, f in enumerate(filters):
        t.subscribe(f, i, None)
    assert t._node_count() == nodes
    for i, f in enumerate(filters):
        assert t.unsubscribe(f, i)
    assert t._node_count() == 0
    assert len(t) == 0


def test_pruning_stops_at_nodes_still_in_use():
    t = SubscriptionTrie()
    t.subscribe("a/b/c/d", 1, None)
    t.subscribe("a/b", 2, None)
    t.subscribe("a/+/x", 3, None)
    assert t._node_count() == 6  # a, b, c, d, +, x
    assert t.unsubscribe("a/b/c/d", 1)
    assert t._node_count() == 4  # c and d pruned, b keeps its subscriber
    assert names(t, "a/b") == [2]
    assert t.unsubscribe("a/b", 2)
    assert t._node_count() == 3  # b pruned, a still has '+'
    assert names(t, "a/q/x") == [3]
    assert t.unsubscribe("a/+/x", 3)
    assert t._node_count() == 0


def test_unsubscribing_one_of_several_subscribers_keeps_the_node():
    t = SubscriptionTrie()
    t.subscribe("a/b", 1, None)
    t.subscribe("a/b", 2, None)
    assert t.unsubscribe("a/b", 1)
    assert t._node_count() == 2
    assert names(t, "a/b") == [2]


def test_failed_unsubscribe_prunes_nothing():
    t = SubscriptionTrie()
    t.subscribe("a/b/c", 1, None)
    assert not t.unsubscribe("a/b/c", 2)
    assert not t.unsubscribe("a/b", 1)
    assert t._node_count() == 3
    assert names(t, "a/b/c") == [1]


def test_plain_and_shared_on_the_same_node_are_independent():
    t = SubscriptionTrie()
    t.subscribe("a/b", "s", 1)
    t.subscribe("$share/g/a/b", "s", 2)
    assert t.unsubscribe("a/b", "s")
    assert t.match("a/b") == []
    assert [g.members for g in t.match_shared("a/b")] == [[("s", 2)]]
    assert t._node_count() == 2
    assert t.unsubscribe("$share/g/a/b", "s")
    assert t._node_count() == 0


def test_churn_leaves_no_nodes_behind():
    t = SubscriptionTrie()
    filters = [f"company/{c}/machine/{m}/telemetry" for c in range(10) for m in range(10)]
    filters += ["company/+/machine/+/telemetry", "company/#", "$share/ingest/company/+/#"]
    for rnd in range(3):
        for i, f in enumerate(filters):
            assert t.subscribe(f, (rnd, i), None)
        assert len(t) == len(filters)
        assert len(t.match("company/3/machine/4/telemetry")) == 3
        for i, f in enumerate(reversed(filters)):
            assert t.unsubscribe(f, (rnd, len(filters) - 1 - i))
        assert len(t) == 0
        assert t._node_count() == 0


# ------------------------------------------------------------ shared groups


def test_shared_subscriptions_are_only_reported_by_match_shared():
    t = SubscriptionTrie()
    assert t.subscribe("$share/workers/jobs/+", "w1", {"qos": 1})
    assert t.match("jobs/1") == []
    [g] = t.match_shared("jobs/1")
    assert isinstance(g, SharedGroup)
    assert g.name == "workers"
    assert g.topic_filter == "jobs/+"
    assert g.members == [("w1", {"qos": 1})]
    assert len(g) == 1
    assert "workers" in repr(g)
    assert t.match_shared("jobs") == []
    assert t.match_shared("other/1") == []


def test_match_all_returns_both_kinds():
    t = SubscriptionTrie()
    t.subscribe("a/+", "plain", 0)
    t.subscribe("$share/g/a/#", "shared", 1)
    subs, groups = t.match_all("a/b")
    assert subs == [("plain", 0)]
    assert [(g.name, g.topic_filter, g.members) for g in groups] == [("g", "a/#", [("shared", 1)])]


def test_members_keep_insertion_order_and_resubscribe_replaces_in_place():
    t = SubscriptionTrie()
    for name in ("c", "a", "b"):
        assert t.subscribe("$share/g/t", name, 0)
    assert not t.subscribe("$share/g/t", "a", 9)
    [g] = t.match_shared("t")
    assert g.members == [("c", 0), ("a", 9), ("b", 0)]
    assert len(t) == 3


def test_group_object_is_stable_and_members_is_live():
    t = SubscriptionTrie()
    t.subscribe("$share/g/t", 1, None)
    [g] = t.match_shared("t")
    t.subscribe("$share/g/t", 2, None)
    [g2] = t.match_shared("t")
    assert g2 is g
    assert g.members == [(1, None), (2, None)]


def test_groups_are_per_name_and_filter():
    t = SubscriptionTrie()
    t.subscribe("$share/g/a/+", 1, None)
    t.subscribe("$share/h/a/+", 2, None)
    t.subscribe("$share/g/a/#", 3, None)
    t.subscribe("$share/g/a/b", 4, None)
    groups = t.match_shared("a/b")
    got = sorted((g.name, g.topic_filter, [m for m, _ in g.members]) for g in groups)
    assert got == [("g", "a/#", [3]), ("g", "a/+", [1]), ("g", "a/b", [4]), ("h", "a/+", [2])]
    assert len(t) == 4


def test_share_filter_keeps_inner_levels_verbatim():
    t = SubscriptionTrie()
    t.subscribe("$share/g//a/", 1, None)
    t.subscribe("$share/g/$share/x", 2, None)  # inner filter starting with $share
    assert [g.topic_filter for g in t.match_shared("/a/")] == ["/a/"]
    assert [g.topic_filter for g in t.match_shared("$share/x")] == ["$share/x"]
    assert t.match("$share/x") == []


def test_next_index_round_robin():
    t = SubscriptionTrie()
    for m in "abc":
        t.subscribe("$share/g/t", m, None)
    [g] = t.match_shared("t")
    assert [g.next_index() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    t.subscribe("$share/g/t", "d", None)
    assert [g.next_index() for _ in range(5)] == [1, 2, 3, 0, 1]


def test_next_index_after_members_leave():
    t = SubscriptionTrie()
    for m in "abcd":
        t.subscribe("$share/g/t", m, None)
    [g] = t.match_shared("t")
    assert [g.next_index() for _ in range(2)] == [0, 1]  # next up: "c"
    t.unsubscribe("$share/g/t", "a")  # before the cursor
    assert g.members[g.next_index()][0] == "c"
    t.unsubscribe("$share/g/t", "d")  # after the cursor
    assert [g.members[g.next_index()][0] for _ in range(3)] == ["b", "c", "b"]
    t.unsubscribe("$share/g/t", "c")
    assert [g.next_index() for _ in range(3)] == [0, 0, 0]


def test_next_index_is_always_in_range():
    t = SubscriptionTrie()
    for m in range(5):
        t.subscribe("$share/g/t", m, None)
    [g] = t.match_shared("t")
    for remove in range(4, 0, -1):
        for _ in range(7):
            assert 0 <= g.next_index() < len(g.members)
        t.unsubscribe("$share/g/t", remove)


def test_empty_group_is_removed():
    t = SubscriptionTrie()
    t.subscribe("$share/g/t", 1, None)
    t.subscribe("$share/g/t", 2, None)
    [g] = t.match_shared("t")
    assert t.unsubscribe("$share/g/t", 1)
    assert g.members == [(2, None)]
    assert t.unsubscribe("$share/g/t", 2)
    assert t.match_shared("t") == []
    assert g.members == []
    with pytest.raises(IndexError):
        g.next_index()
    assert t._node_count() == 0
    assert not t.unsubscribe("$share/g/t", 2)
    t.subscribe("$share/g/t", 3, None)
    [g3] = t.match_shared("t")
    assert g3 is not g  # a new group, fresh cursor
    assert g3.members == [(3, None)]


def test_unsubscribe_shared_needs_the_right_group():
    t = SubscriptionTrie()
    t.subscribe("$share/g/t", 1, None)
    assert not t.unsubscribe("$share/h/t", 1)
    assert not t.unsubscribe("t", 1)
    assert not t.unsubscribe("$share/g/t", 2)
    assert len(t) == 1


def test_shared_group_attributes_are_read_only():
    t = SubscriptionTrie()
    t.subscribe("$share/g/t", 1, None)
    [g] = t.match_shared("t")
    with pytest.raises(AttributeError):
        g.name = "x"
    with pytest.raises(AttributeError):
        g.members = []


def test_dollar_rule_applies_to_shared_filters():
    t = SubscriptionTrie()
    t.subscribe("$share/g/#", 1, None)
    t.subscribe("$share/g/+/x", 2, None)
    t.subscribe("$share/g/$SYS/#", 3, None)
    assert [g.topic_filter for g in t.match_shared("$SYS/x")] == ["$SYS/#"]
    assert sorted(g.topic_filter for g in t.match_shared("a/x")) == ["#", "+/x"]


# ------------------------------------------------------------------- len


def test_len_counts_plain_and_shared_entries():
    t = SubscriptionTrie()
    t.subscribe("a", 1, None)
    t.subscribe("a", 2, None)
    t.subscribe("a", 1, "replaced")
    t.subscribe("$share/g/a", 1, None)
    t.subscribe("$share/g/a", 2, None)
    t.subscribe("$share/g/a", 2, "replaced")
    t.subscribe("$share/h/a", 1, None)
    assert len(t) == 5
    t.unsubscribe("$share/g/a", 2)
    t.unsubscribe("a", 9)
    assert len(t) == 4
    assert "4" in repr(t)


# ---------------------------------------------------------------- validation

VALID_NAMES = [
    "a",
    "/",
    "//",
    "/a",
    "a/",
    "a//b",
    "sport/tennis/player1",
    "$SYS/broker",
    "$share/g/x",  # a name, not a filter: no special meaning here
    " ",
    "Accounts payable",
    "café/€/😀",
    "a" * 65535,
    "é" * 32767,  # 65534 bytes
    "€" * 21845,  # 65535 bytes
    "😀" * 16383 + "abc",  # 65535 bytes
]
INVALID_NAMES = [
    "",
    "+",
    "#",
    "a/+",
    "a/#",
    "a+",
    "sport/tennis#",
    "a\x00b",
    "\x00",
    "a" * 65536,
    "é" * 32768,  # 65536 bytes
    "€" * 21846,
    "😀" * 16384,
    "a/\ud800",  # a lone surrogate has no UTF-8 encoding
    "\udfff",
]

VALID_FILTERS = [
    "#",
    "+",
    "/",
    "//",
    "+/+",
    "/+",
    "+/",
    "a/#",
    "/#",
    "+/#",
    "+/tennis/#",
    "sport/tennis/#",
    "sport/tennis/+",
    "sport/+/player1",
    "sport/tennis/player1",
    "$SYS/#",
    "$SYS/monitor/+",
    "$share",  # no '/' after it: an ordinary first level
    "$sharex/g",
    "$share/g/#",
    "$share/g/+",
    "$share/g//",
    "$share/g/a/+/b/#",
    "$share/group-1.x/a",
    "$share/g/$share/x",
    "café/+/😀",
    "a" * 65535,
    "$share/g/" + "a" * (65535 - 9),
]
INVALID_FILTERS = [
    "",
    "a#",
    "sport/tennis#",
    "a/#/b",
    "sport/tennis/#/ranking",
    "#/",
    "##",
    "a+",
    "+a",
    "sport+",
    "a/+b",
    "a/b+/c",
    "++",
    "+#",
    "a\x00",
    "\x00",
    "a/\ud800",
    "a" * 65536,
    "é" * 32768,
    "$share/g",
    "$share/g/",
    "$share/",
    "$share//x",
    "$share//",
    "$share/g+/x",
    "$share/g#/x",
    "$share/+/x",
    "$share/#/x",
    "$share/g/a#",
    "$share/g/#/a",
    "$share/g\x00/x",
    "$share/g/" + "a" * (65535 - 8),
]


@pytest.mark.parametrize("name", VALID_NAMES, ids=lambda s: repr(s[:20]))
def test_valid_topic_names(name):
    assert validate_topic_name(name) is True


@pytest.mark.parametrize("name", INVALID_NAMES, ids=lambda s: repr(s[:20]))
def test_invalid_topic_names(name):
    assert validate_topic_name(name) is False


@pytest.mark.parametrize("flt", VALID_FILTERS, ids=lambda s: repr(s[:20]))
def test_valid_topic_filters(flt):
    assert validate_topic_filter(flt) is True


@pytest.mark.parametrize("flt", INVALID_FILTERS, ids=lambda s: repr(s[:20]))
def test_invalid_topic_filters(flt):
    assert validate_topic_filter(flt) is False


def test_every_valid_filter_can_be_subscribed_and_removed():
    t = SubscriptionTrie()
    for i, f in enumerate(VALID_FILTERS):
        assert t.subscribe(f, i, None)
    assert len(t) == len(VALID_FILTERS)
    for i, f in enumerate(VALID_FILTERS):
        assert t.unsubscribe(f, i)
    assert t._node_count() == 0


@pytest.mark.parametrize("func", [validate_topic_name, validate_topic_filter])
def test_validators_need_str(func):
    with pytest.raises(TypeError):
        func(None)
    with pytest.raises(TypeError):
        func(b"a")
