"""Unit tests of ingestd.broker.acl: the acl_file format and Mosquitto 2.0's decisions.

The differential test against a real mosquitto is tests/test_acl_mosquitto.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.broker.acl import READ, WRITE, AclEntry, AclFile, topic_matches
from ingestd.errors import ConfigError


def acl(text: str, **kw: object) -> AclFile:
    return AclFile.parse(text, source="test.acl", **kw)  # type: ignore[arg-type]


def bad(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        acl(text)
    assert ei.value.key == "mqtt.acl_file"
    assert ei.value.path == "test.acl"
    return str(ei.value)


# ----------------------------------------------------------------- parsing


def test_access_words_and_default_readwrite() -> None:
    a = acl("topic read r\ntopic write w\ntopic readwrite rw\ntopic deny d\ntopic plain\n")
    assert [(e.topic, e.access) for e in a.entries] == [
        ("r", READ),
        ("w", WRITE),
        ("rw", READ | WRITE),
        ("d", 0),
        ("plain", READ | WRITE),
    ]
    assert a.entries[3].deny
    assert [e.line for e in a.entries] == [1, 2, 3, 4, 5]


def test_one_word_after_topic_is_the_topic_even_an_access_word() -> None:
    # strtok_r: the access word is only taken when something follows it.
    a = acl("topic read\ntopic deny\n")
    assert [(e.topic, e.access) for e in a.entries] == [("read", 3), ("deny", 3)]


def test_topic_may_contain_spaces_and_is_trimmed() -> None:
    a = acl("topic read   a b/c d  \n")
    assert a.entries[0].topic == "a b/c d"
    assert a.entries[0].access == READ


def test_tab_is_not_a_word_separator() -> None:
    a = acl("topic read\tfoo\n")
    assert (a.entries[0].topic, a.entries[0].access) == ("read\tfoo", READ | WRITE)
    assert "line 1" in bad("\ttopic read a\n")
    assert "line 1" in bad("topic\tread a\n")


def test_comments_blank_lines_and_whitespace() -> None:
    a = acl("# comment\n\n   \n\t\n  topic   read   a/b  \r\n#topic read x\ntopic read last")
    assert [(e.topic, e.line) for e in a.entries] == [("a/b", 5), ("last", 7)]


def test_indented_and_trailing_comments_are_errors() -> None:
    assert "line 2" in bad("topic read a\n  # indented\n")
    msg = bad("topic read a # trailing\n")
    assert "line 1" in msg and "invalid ACL topic" in msg


def test_nul_ends_the_line() -> None:
    a = acl("topic read a/b\0 garbage + #\n")
    assert a.entries[0].topic == "a/b"


def test_unknown_access_word_names_file_line_and_word() -> None:
    msg = bad("topic read a\n\ntopic READ b\n")
    assert msg.startswith("test.acl: mqtt.acl_file: line 3:")
    assert "'READ'" in msg


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("topic\n", 1),
        ("pattern\n", 1),
        ("topic read a\nuser\n", 2),
        ("user   \n", 1),
        ("topic read a/#/b\n", 1),
        ("topic read a/b#\n", 1),
        ("topic read a+/b\n", 1),
        ("pattern read +%u\n", 1),
        ("topics read a\n", 1),
        ("user x\ntopic read a\nbogus line\n", 3),
        ("topic read " + "a/" * 201 + "b\n", 1),
        ("topic read " + "a" * 65536 + "\n", 1),
    ],
)
def test_malformed_lines(text: str, line: int) -> None:
    assert f"line {line}:" in bad(text)


def test_limits_are_inclusive() -> None:
    acl("topic read " + "a/" * 200 + "b\n")
    acl("topic read " + "a" * 65535 + "\n")


def test_load_reads_the_file_and_reports_its_path(tmp_path: Path) -> None:
    p = tmp_path / "acl"
    p.write_bytes(b"user alice\ntopic read a/#\n")
    a = AclFile.load(p)
    assert a.source == str(p)
    assert a.entries == (AclEntry("a/#", READ, 2, False, "alice"),)
    p.write_bytes(b"user alice\ntopic nope a/#\n")
    with pytest.raises(ConfigError) as ei:
        AclFile.load(p)
    assert str(ei.value).startswith(f"{p}: mqtt.acl_file: line 2:")
    with pytest.raises(ConfigError, match="cannot read"):
        AclFile.load(tmp_path / "missing")


def test_invalid_utf8_is_accepted_but_matches_nothing() -> None:
    a = AclFile.parse(b"topic read caf\xe9/#\ntopic read ok\n")
    c = a.for_client(None, "c")
    assert c.may_read("ok")
    assert not c.may_read("caf\u00e9/x")


def test_pattern_without_substitution_warns() -> None:
    a = acl("pattern read plain/topic\npattern read a/%u\n")
    assert len(a.warnings) == 1 and "line 1" in a.warnings[0]


def test_user_name_is_the_trimmed_rest_of_the_line() -> None:
    a = acl("user   John Smith  \ntopic read a\n")
    assert a.entries[0].username == "John Smith"
    assert a.may_read("John Smith", "c", "a")
    assert not a.may_read("John", "c", "a")


# --------------------------------------------------------------- decisions


def test_topic_lines_before_any_user_are_for_anonymous_clients_only() -> None:
    a = acl("topic readwrite open/#\nuser alice\ntopic read alice/#\n")
    assert a.may_read(None, "c1", "open/x")
    assert a.may_publish(None, "c1", "open/x")
    assert not a.may_read("alice", "c2", "open/x")
    assert not a.may_read("bob", "c3", "open/x")
    assert a.may_read("alice", "c2", "alice/x")
    assert not a.may_read(None, "c1", "alice/x")


def test_read_write_are_separate() -> None:
    a = acl("user d\ntopic write tele/d/#\ntopic read cmd/d\n")
    c = a.for_client("d", "d-1")
    assert c.may_publish("tele/d/t") and not c.may_read("tele/d/t")
    assert c.may_read("cmd/d") and not c.may_publish("cmd/d")
    assert not c.may_read("cmd/d/x") and not c.may_publish("other")


def test_default_is_deny() -> None:
    c = acl("").for_client("alice", "c")
    assert not c.may_read("a") and not c.may_publish("a")


def test_user_sections_are_merged() -> None:
    a = acl("user a\ntopic read x\nuser b\ntopic read y\nuser a\ntopic write z\n")
    c = a.for_client("a", "c")
    assert c.may_read("x") and c.may_publish("z") and not c.may_read("y")


def test_deny_wins_whatever_the_order() -> None:
    for text in (
        "user u\ntopic readwrite a/#\ntopic deny a/secret/#\n",
        "user u\ntopic deny a/secret/#\ntopic readwrite a/#\n",
    ):
        c = acl(text).for_client("u", "c")
        assert c.may_read("a/public") and c.may_publish("a/public")
        assert not c.may_read("a/secret") and not c.may_publish("a/secret/x")


def test_user_grant_beats_deny_pattern_but_user_deny_beats_patterns() -> None:
    text = (
        "user alice\ntopic read company/alice/locked/#\ntopic deny company/alice/hidden\n"
        "pattern readwrite company/%u/#\npattern deny company/%u/locked/#\n"
    )
    c = acl(text).for_client("alice", "c")
    assert c.may_read("company/alice/locked/x")  # the user list is checked first
    assert not c.may_publish("company/alice/locked/x")  # write falls to the patterns
    assert not c.may_read("company/alice/hidden")  # user deny beats the pattern grant
    assert c.may_publish("company/alice/data")
    b = acl(text).for_client("bob", "c")
    assert not b.may_read("company/bob/locked/x") and b.may_read("company/bob/x")


def test_patterns_substitute_username_and_client_id() -> None:
    a = acl("pattern readwrite t/%u/#\npattern read d/%c/cfg\npattern write x/%u-%c\n")
    c = a.for_client("u1", "dev1")
    assert c.may_read("t/u1") and c.may_publish("t/u1/a/b")
    assert c.may_read("d/dev1/cfg") and not c.may_publish("d/dev1/cfg")
    assert c.may_publish("x/u1-dev1")
    assert not c.may_read("t/u2/a") and not c.may_read("d/dev2/cfg")


def test_username_patterns_are_skipped_for_anonymous_clients() -> None:
    a = acl("pattern readwrite t/%u/#\npattern read d/%c\n")
    c = a.for_client(None, "dev1")
    assert c.may_read("d/dev1")
    assert not c.may_read("t/%u/x") and not c.may_read("t//x")


def test_empty_username_is_anonymous() -> None:
    c = acl("topic read anon\npattern read t/%u/#\npattern read d/%c\n").for_client("", "c")
    assert c.username is None
    assert c.may_read("anon") and c.may_read("d/c")
    assert not c.may_read("t//x")


def test_wildcard_characters_in_username_or_client_id_deny_patterns() -> None:
    a = acl("user ev+il\ntopic read own/#\npattern readwrite t/%u/#\npattern read d/%c\n")
    assert not a.may_read("+", "c", "t/anything")
    assert not a.may_read("a#", "c", "t/a#/x")
    assert not a.may_read("ok", "c+1", "t/ok/x")  # client id: even for a %u pattern
    assert not a.may_read("ok", "c#", "d/c#")
    assert a.may_read("ev+il", "c", "own/x")  # the user list is checked before that rule
    assert a.may_read("ok", "c1", "t/ok/x")


def test_wildcard_characters_without_patterns_are_no_special_case() -> None:
    a = acl("user a+b\ntopic read x\n")
    assert a.may_read("a+b", "c#", "x")


def test_slash_in_username_is_not_refused() -> None:
    # Mosquitto 2.0 only refuses '+' and '#': "acme/x" gets company/acme/x/#.
    a = acl("pattern readwrite company/%u/#\n")
    assert a.may_read("acme/x", "c", "company/acme/x/data")
    assert not a.may_read("acme/x", "c", "company/acme/data")


def test_substitution_is_not_limited_to_whole_levels() -> None:
    a = acl("pattern read pre%usuf/%c%c\n")
    assert a.may_read("U", "C", "preUsuf/CC")


def test_hash_matches_the_parent_level_and_plus_one_level() -> None:
    a = acl("topic read a/#\ntopic read +/x/#\ntopic write +\n")
    c = a.for_client(None, "c")
    assert c.may_read("a") and c.may_read("a/b/c") and not c.may_read("ab")
    assert c.may_read("q/x") and c.may_read("q/x/y") and not c.may_read("q/y")
    assert c.may_publish("top") and not c.may_publish("top/x")


def test_dollar_topics_need_an_entry_starting_with_dollar() -> None:
    a = acl("topic readwrite #\ntopic readwrite +/#\ntopic read $SYS/#\ntopic readwrite $app/+\n")
    c = a.for_client(None, "c")
    assert c.may_read("x/y")
    assert not c.may_read("$other/x")
    assert c.may_read("$SYS/broker/uptime")
    assert c.may_read("$app/x") and c.may_publish("$app/x")


def test_sys_is_never_writable_except_bridge_state() -> None:
    a = acl("topic readwrite $SYS/#\ntopic readwrite $SYSTEM/#\npattern write $SYS/c/%c\n")
    c = a.for_client(None, "b1")
    assert c.may_read("$SYS/broker/uptime") and not c.may_publish("$SYS/broker/uptime")
    assert not c.may_publish("$SYS/c/b1")
    assert c.may_publish("$SYS/broker/connection/b1/state")
    assert not c.may_publish("$SYSTEM/x") and c.may_read("$SYSTEM/x")  # a prefix test
    assert not acl("").for_client(None, "b1").may_publish("$SYS/broker/connection/b1/state")


def test_share_topics_are_never_read_or_written() -> None:
    a = acl("topic readwrite $share/#\ntopic readwrite $shared/#\ntopic readwrite #\n")
    c = a.for_client(None, "c")
    assert not c.may_publish("$share/g/x") and not c.may_read("$share/g/x")
    assert not c.may_read("$shared/x")
    assert c.may_subscribe("$share/g/x")


def test_username_starting_with_dollar_reaches_dollar_topics_through_patterns() -> None:
    c = acl("pattern read %u/#\n").for_client("$SYS", "c")
    assert c.may_read("$SYS/broker/uptime")


def test_a_topic_name_with_wildcards_or_empty_matches_nothing() -> None:
    c = acl("topic readwrite #\ntopic readwrite a/+\n").for_client(None, "c")
    assert c.may_read("a/b")
    assert not c.may_read("a/+") and not c.may_publish("a/#") and not c.may_read("")


def test_subscribe_is_always_granted() -> None:
    a = acl("user alice\ntopic read a/#\n")
    for u, f in [("alice", "#"), ("alice", "b/+"), (None, "$SYS/#"), ("bob", "a/b")]:
        assert a.may_subscribe(u, "c", f)


def test_decision_cache_is_bounded_and_never_changes_answers() -> None:
    a = acl("pattern readwrite t/%u/#\ntopic read x\n", cache_size=3)
    c = a.for_client("u", "c")
    topics = [f"t/u/{i}" for i in range(10)] + [f"t/v/{i}" for i in range(10)]
    for _ in range(3):
        for t in topics:
            assert c.may_read(t) == t.startswith("t/u/")
            assert len(c._cache) <= 3
    long_topic = "t/u/" + "x" * 300
    assert c.may_read(long_topic) and long_topic not in c._cache
    nocache = acl("pattern read t/%u\n", cache_size=0).for_client("u", "c")
    assert nocache.may_read("t/u") and nocache.may_read("t/u") and not nocache._cache


def test_compiled_rules_are_shared_between_clients() -> None:
    a = acl("user alice\ntopic read a\npattern read t/%u\n")
    c1, c2 = a.for_client("alice", "c1"), a.for_client("alice", "c2")
    assert c1._user is c2._user and c1._patterns is c2._patterns
    assert a.for_client("bob", "c1")._patterns is not c1._patterns


# ---------------------------------------------------------------- properties


def reference_access(a: AclFile, username: str | None, cid: str, topic: str, access: int) -> bool:
    """The C algorithm, step by step, over the parsed entries (no trie, no cache)."""
    bridge_state = topic_matches("$SYS/broker/connection/+/state", topic)
    if topic.startswith("$SYS") and access == WRITE and not bridge_state:
        return False
    if topic.startswith("$share"):
        return False

    def ordered(entries: list[AclEntry]) -> list[AclEntry]:
        out: list[AclEntry] = []
        for e in entries:  # add__acl: deny entries go to the front of the list
            if e.deny:
                out.insert(0, e)
            else:
                out.append(e)
        return out

    users = [e for e in a.entries if not e.pattern and e.username == username]
    for e in ordered(users):
        if topic_matches(e.topic, topic):
            if e.deny:
                return False
            if e.access & access:
                return True
    patterns = ordered([e for e in a.entries if e.pattern])
    if patterns and (
        (username is not None and any(ch in username for ch in "+#"))
        or any(ch in cid for ch in "+#")
    ):
        return False
    for e in patterns:
        if "%u" in e.topic and username is None:
            continue
        t = e.topic.replace("%c", cid)
        if username is not None:
            t = t.replace("%u", username)
        if topic_matches(t, topic):
            if e.deny:
                return False
            if e.access & access:
                return True
    return False


LEVEL = st.sampled_from(["a", "b", "c", "", "$SYS", "$x", "u1", "dev"])
ACL_LEVEL = st.sampled_from(["a", "b", "", "+", "%u", "%c", "$SYS", "$x", "u1"])


@st.composite
def acl_topics(draw: st.DrawFn) -> str:
    levels = draw(st.lists(ACL_LEVEL, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "a"


@st.composite
def acl_texts(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["topic", "pattern", "user"]))
        if kind == "user":
            lines.append(f"user {draw(st.sampled_from(['u1', 'u2', 'u+']))}")
        else:
            word = draw(st.sampled_from(["read", "write", "readwrite", "deny", ""]))
            lines.append(f"{kind} {word} {draw(acl_topics())}".replace("  ", " "))
    return "\n".join(lines) + "\n"


topics = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(bool)
usernames = st.sampled_from([None, "u1", "u2", "u+", "a/b", "$SYS"])
client_ids = st.sampled_from(["dev", "c1", "c#", "a"])


@settings(max_examples=400, deadline=None)
@given(acl_texts(), usernames, client_ids, st.lists(topics, min_size=1, max_size=6))
def test_compiled_decisions_equal_the_step_by_step_algorithm(
    text: str, username: str | None, cid: str, ts: list[str]
) -> None:
    a = acl(text, cache_size=2)
    c = a.for_client(username, cid)
    for t in ts + ts:  # twice: cached answers too
        assert c.may_read(t) == reference_access(a, username, cid, t, READ), (t, "read")
        assert c.may_publish(t) == reference_access(a, username, cid, t, WRITE), (t, "write")


@settings(max_examples=200, deadline=None)
@given(acl_texts(), acl_topics(), usernames, client_ids, topics)
def test_a_matching_deny_in_the_user_list_always_wins(
    text: str, deny: str, username: str | None, cid: str, topic: str
) -> None:
    deny = deny.replace("%u", "a").replace("%c", "b")
    header = f"user {username}\n" if username else ""
    a = acl(header + f"topic deny {deny}\n" + text.replace("user ", "user x"))
    if topic_matches(deny, topic):
        assert not a.may_read(username, cid, topic)
        assert not a.may_publish(username, cid, topic)


TENANT = st.text(alphabet="abcxyz-_.0$", min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(TENANT, TENANT, st.lists(st.sampled_from(["x", "y", "", "a"]), max_size=3))
def test_two_tenants_never_read_each_other(me: str, other: str, rest: list[str]) -> None:
    a = acl("pattern readwrite company/%u/#\n")
    topic = "/".join(["company", other, *rest])
    mine = other == me
    assert a.may_read(me, "c", topic) == mine
    assert a.may_publish(me, "c", topic) == mine


@settings(max_examples=300, deadline=None)
@given(acl_topics(), topics)
def test_trie_matching_equals_reference_matching(flt: str, topic: str) -> None:
    flt = flt.replace("%u", "u1").replace("%c", "c")
    c = acl(f"topic read {flt}\n").for_client(None, "c")
    expected = topic_matches(flt, topic) and not topic.startswith("$share")
    assert c.may_read(topic) == expected


@pytest.mark.parametrize(
    ("flt", "topic", "expected"),
    [
        ("foo/#", "foo", True),
        ("foo/#", "foo/", True),
        ("+/#", "foo", True),
        ("+/+/#", "foo", False),
        ("foo/+", "foo/", True),
        ("foo/+", "foo", False),
        ("+", "/", False),
        ("+/+", "/", True),
        ("/#", "/", True),
        ("foo", "foo/", False),
        ("foo/", "foo", False),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS", True),
        ("$SYS/+", "$SYS/x", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
    ],
)
def test_topic_matches_follows_mosquitto_topic_matches_sub(
    flt: str, topic: str, expected: bool
) -> None:
    assert topic_matches(flt, topic) is expected
    c = acl(f"topic read {flt}\n").for_client(None, "c")  # the trie path
    assert c.may_read(topic) is expected
