"""Mosquitto-compatible topic ACLs: the ``acl_file`` format and its decisions.

This module reimplements the behaviour of Mosquitto 2.0's default ACL check
(``src/security_default.c``: ``aclfile__parse``, ``add__acl``,
``add__acl_pattern``, ``acl__find_acls``, ``mosquitto_acl_check_default``;
``src/security.c``: ``mosquitto_acl_check``, ``acl__check_dollar``;
``lib/util_topic.c``: ``mosquitto_sub_topic_check``,
``mosquitto_topic_matches_sub``). It was checked against the source of
v2.0.11 (the version Debian 12 ships, used by ``tests/test_acl_mosquitto.py``)
and is unchanged in that respect up to v2.0.20. Nothing here does I/O after
:meth:`AclFile.load`; nothing is asynchronous. It is over 600 lines because it
is one specification (the file format and the decisions of Mosquitto's
default check, written out below) and its implementation, reviewed together.

File format (``aclfile__parse``)
--------------------------------
The file is read line by line (``\\n`` ends a line; a last line without one
counts; a NUL byte ends the line, as in C).

1. Trailing white space (C ``isspace``: space, ``\\t \\n \\v \\f \\r``) is
   removed first; a line that is then empty is skipped.
2. A line whose *first character* is ``#`` is a comment. A ``#`` after
   leading spaces is not: `` # x`` is the keyword ``#`` and an error, and
   there are no trailing comments (``topic a #c`` is an invalid topic).
3. Words are separated by spaces only (``strtok_r(buf, " ")``); leading
   spaces are skipped, a tab is part of a word. So ``\\ttopic a`` is an
   error, and ``topic read\\tfoo`` grants readwrite on the topic
   ``read\\tfoo``.
4. ``topic [ACCESS] TOPIC`` / ``pattern [ACCESS] TOPIC``: the second word is
   ACCESS if anything follows it, else it is the TOPIC and ACCESS is
   ``readwrite`` (so ``topic read`` grants readwrite on the topic ``read``).
   The TOPIC is the rest of the line with its leading/trailing white space
   removed (``misc__trimblanks``), so it may contain spaces. ACCESS is one
   of ``read``, ``write``, ``readwrite``, ``deny`` (case-sensitive); any
   other word is an error. ``topic``/``pattern`` alone is an error.
5. TOPIC must pass ``mosquitto_sub_topic_check``: ``+`` and ``#`` only as a
   whole level, ``#`` only last, at most 65,535 bytes and 200 ``/``.
   ``%u``/``%c`` are not checked against the man page's rule that they fill
   a whole level: ``foo%ubar`` is accepted and substituted in place.
6. ``user NAME``: NAME is the rest of the line, trimmed (it may contain
   spaces). Following ``topic`` lines belong to NAME. ``user`` alone is an
   error. Two sections for one name are merged (``add__acl`` finds the user).
7. ``topic`` lines before the first ``user`` line belong to *anonymous*
   clients only (no username), not to every client (``add__acl`` with
   ``user == NULL``; ``acl__find_acls`` gives that list only to clients
   without a username).
8. ``pattern`` lines apply to every client wherever they appear. A pattern
   without ``%u`` or ``%c`` is accepted with a warning (:attr:`AclFile.warnings`).
9. Any other first word is an error. An error stops Mosquitto from starting;
   here :meth:`AclFile.load` raises :class:`~ingestd.errors.ConfigError`
   naming the file, the line number and the reason.

Decisions (``mosquitto_acl_check`` then ``mosquitto_acl_check_default``)
------------------------------------------------------------------------
A client that sent an empty username is anonymous (``handle__connect``
drops a zero-length username), here as in Mosquitto.

Access is ``write`` for a PUBLISH (and a Will), ``read`` for every delivery
of a message to a subscriber (retained messages included), ``subscribe``
for each filter of a SUBSCRIBE.

A. ``$`` topics first (``acl__check_dollar``): a topic starting with
   ``$SYS`` (a plain prefix test, ``$SYSTEM/x`` included) may not be written
   unless it matches ``$SYS/broker/connection/+/state``; reading goes on to
   the ACL. A topic starting with ``$share`` can never be read or written.
   Other ``$`` topics go on to the ACL.
B. SUBSCRIBE is always allowed: Mosquitto 2.0's default check returns
   success for ``MOSQ_ACL_SUBSCRIBE`` without looking at the file
   (``/* FIXME - implement ACL subscription strings. */``). What a client
   receives is limited by the ``read`` check of every delivered message,
   against its concrete topic. :meth:`ClientAcl.may_subscribe` is True.
C. The client's user list (the ``user`` section of its username, or the
   anonymous list) is checked first: ``deny`` entries are put at the front
   of the list, so any matching ``deny`` entry denies; otherwise an entry
   matching with the wanted access allows.
D. Only then, if the file has any ``pattern``: a client whose username or
   client id contains ``+`` or ``#`` is denied (``strpbrk(…, "+#")``; a
   ``/`` is *not* refused). A pattern with ``%u`` is skipped for an
   anonymous client. ``%c`` and ``%u`` are replaced by the client id and the
   username; then, as in C: any matching ``deny`` pattern denies, else a
   matching pattern with the wanted access allows.
E. Otherwise access is denied.

A topic name that is empty or contains ``+``/``#`` matches nothing (the C
matcher returns an error), so every access to it is denied. UNSUBSCRIBE is
always allowed, like SUBSCRIBE. A Will is checked with ``write`` when it is
sent; retained messages with ``read`` when they are delivered.

Matching is ``mosquitto_topic_matches_sub``: MQTT topic-filter matching by
level, ``#`` matching the parent level too (``a/#`` matches ``a``), and a
topic starting with ``$`` matched only by an entry starting with ``$``.

Consequences worth knowing: a grant in a ``user`` section beats a ``deny``
pattern (C before D); a ``deny`` in a ``user`` section beats every pattern;
a user named ``a/b`` with ``pattern readwrite company/%u/#`` gets
``company/a/b/#``, inside the tenant ``a``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from ingestd._trie import SubscriptionTrie, validate_topic_filter
from ingestd.errors import ConfigError

__all__ = ["READ", "WRITE", "AclEntry", "AclFile", "ClientAcl", "filters_intersect"]

#: Access bits, as Mosquitto's ``MOSQ_ACL_READ`` / ``MOSQ_ACL_WRITE``.
READ = 1
WRITE = 2
_DENY = 4  # a matching deny entry (MOSQ_ACL_NONE)

_ACCESS_WORDS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": 0}
_C_SPACE = " \t\n\v\f\r"  # C isspace() in the C locale
_MAX_TOPIC_BYTES = 65535
_TOPIC_HIERARCHY_LIMIT = 200  # lib/util_topic.c, WITH_BROKER
_CONFIG_KEY = "mqtt.acl_file"
_SYS_BRIDGE_STATE = "$SYS/broker/connection/+/state"

#: Default bound of a ClientAcl's per-topic decision cache.
DEFAULT_CACHE_SIZE = 1024
#: Longer topics are decided every time: 1,024 cached 64 KiB topics would be 64 MiB per client.
_CACHE_MAX_TOPIC = 256


@dataclass(frozen=True, slots=True)
class AclEntry:
    """One ``topic`` or ``pattern`` line: ``access`` is READ|WRITE bits, 0 for deny."""

    topic: str
    access: int
    line: int
    pattern: bool
    username: str | None = None  # the user section of a topic line (None: anonymous)

    @property
    def deny(self) -> bool:
        return self.access == 0


def topic_matches(acl_topic: str, topic: str) -> bool:
    """Whether the (valid) filter ``acl_topic`` matches the topic name ``topic``.

    The semantics of ``mosquitto_topic_matches_sub`` for valid input: by
    level, ``+`` one level, ``#`` the rest including none (``a/#`` matches
    ``a``), and a ``$`` topic only matched by a filter starting with ``$``.
    """
    if not acl_topic or not topic:
        return False
    if (acl_topic[0] == "$") != (topic[0] == "$"):
        return False
    subs = acl_topic.split("/")
    levels = topic.split("/")
    n = len(levels)
    for i, s in enumerate(subs):
        if s == "#":
            return True
        if i >= n:
            return False
        if s != "+" and s != levels[i]:
            return False
    return len(subs) == n


def filters_intersect(a: str, b: str) -> bool:
    """Whether some topic name is matched by both (valid) filters ``a`` and ``b``.

    Matching as :func:`topic_matches`: ``+`` one level, ``#`` the rest
    including none, and a topic whose first level starts with ``$`` is
    matched only by a filter whose first level is that literal level.
    """
    la = a.split("/")
    lb = b.split("/")
    na = len(la)
    nb = len(lb)
    i = 0
    while True:
        x = la[i] if i < na else None
        y = lb[i] if i < nb else None
        if x is None and y is None:
            return True
        if x == "#" or y == "#":
            if i == 0:
                other = y if x == "#" else x
                # '#' first never matches a '$' topic; '#' against '#'/'+' matches plain ones.
                return other is None or not other.startswith("$")
            return True  # the common prefix so far plus whatever the other needs
        if x is None or y is None:
            return False
        if x == "+" or y == "+":
            if i == 0 and (x.startswith("$") or y.startswith("$")):
                return False
        elif x != y:
            return False
        i += 1


def _sub_topic_ok(topic: str) -> str | None:
    """None if ``topic`` passes ``mosquitto_sub_topic_check``, else the reason."""
    size = len(topic.encode("utf-8", "surrogateescape"))
    if size > _MAX_TOPIC_BYTES:
        return f"topic is {size} bytes long (at most {_MAX_TOPIC_BYTES})"
    levels = topic.split("/")
    if len(levels) - 1 > _TOPIC_HIERARCHY_LIMIT:
        return f"topic has more than {_TOPIC_HIERARCHY_LIMIT} '/'"
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return "'+' must be a whole topic level"
        if "#" in level and (level != "#" or i != last):
            return "'#' must be the whole last topic level"
    return None


def _substitute(topic: str, username: str | None, client_id: str) -> str:
    """Replace ``%c`` and ``%u`` left to right, as the copy loop of the default check."""
    out: list[str] = []
    i = 0
    n = len(topic)
    while i < n:
        ch = topic[i]
        if ch == "%" and i < n - 1:
            nxt = topic[i + 1]
            if nxt == "c":
                out.append(client_id)
                i += 2
                continue
            if nxt == "u" and username is not None:
                out.append(username)
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)


class _Rules:
    """A compiled list of (filter, access) entries: which ones match a topic.

    Entries go into a :class:`SubscriptionTrie` (subscriber = entry index,
    options = access bits or ``_DENY``), so a lookup costs the topic's levels,
    not the number of entries. Filters the trie refuses but Mosquitto's
    matcher would still compare (a substituted pattern over 65,535 bytes,
    an empty one) are kept in a short list matched in Python; filters that
    can match no valid topic (undecodable bytes, ``$share/...``: those topics
    are refused before the ACL) are dropped.
    """

    __slots__ = ("_slow", "_trie", "empty", "readable")

    def __init__(self, entries: Iterable[tuple[str, int]]) -> None:
        trie = SubscriptionTrie()
        slow: list[tuple[str, int]] = []
        readable: list[str] = []
        count = 0
        for i, (flt, access) in enumerate(entries):
            flags = access if access else _DENY
            if flt.startswith("$share"):
                continue  # acl__check_dollar denies every $share topic first
            try:
                flt.encode("utf-8")
            except UnicodeEncodeError:
                continue  # invalid UTF-8 in the file: no MQTT topic can equal it
            if flags & READ and flt:
                readable.append(flt)
            if flt and validate_topic_filter(flt):
                trie.subscribe(flt, i, flags)
            else:
                slow.append((flt, flags))
            count += 1
        self._trie = trie if len(trie) else None
        self._slow = slow
        self.empty = count == 0
        # The filters that grant read (deny entries left out: see ClientAcl.may_read_any).
        self.readable = tuple(readable)

    def flags(self, topic: str) -> int:
        """OR of the flags (READ, WRITE, _DENY) of every entry matching ``topic``."""
        bits = 0
        if self._trie is not None:
            for _entry, flags in self._trie.match(topic):
                bits |= flags
        for flt, flags in self._slow:
            if topic_matches(flt, topic):
                bits |= flags
        return bits


def dollar_mask(topic: str) -> int:
    """The accesses ``acl__check_dollar`` lets through to the ACL for ``topic``."""
    if topic.startswith("$SYS"):
        return READ | WRITE if topic_matches(_SYS_BRIDGE_STATE, topic) else READ
    if topic.startswith("$share"):
        return 0
    return READ | WRITE


class ClientAcl:
    """The ACL of one connected client (username, client id), precompiled.

    Ask :meth:`may_publish` for each PUBLISH (and the Will), :meth:`may_read`
    for each message about to be delivered, :meth:`may_subscribe` for each
    SUBSCRIBE filter. Decisions for a topic are cached (both accesses at
    once); the cache holds at most ``cache_size`` topics of at most 256
    characters and is emptied when full. A ClientAcl is a snapshot of its :class:`AclFile`: after a reload,
    make new ones.
    """

    __slots__ = (
        "_cache",
        "_cache_size",
        "_dangerous",
        "_patterns",
        "_user",
        "client_id",
        "decided",
        "username",
    )

    def __init__(
        self,
        username: str | None,
        client_id: str,
        user_rules: _Rules | None,
        pattern_rules: _Rules | None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.username = username
        self.client_id = client_id
        self._user = user_rules
        self._patterns = pattern_rules
        # mosquitto_acl_check_default: with patterns loaded, a username or
        # client id containing + or # is denied everything the user list
        # did not grant.
        self._dangerous = pattern_rules is not None and (
            (username is not None and ("+" in username or "#" in username))
            or "+" in client_id
            or "#" in client_id
        )
        # topic -> bits; ``decided`` is it too, for hot paths that inline the lookup.
        self._cache: dict[str, int] = {}
        self.decided = self._cache
        self._cache_size = max(0, cache_size)

    def access(self, topic: str) -> int:
        """The accesses (READ | WRITE bits) this client has on the topic name ``topic``."""
        cache = self._cache
        bits = cache.get(topic)
        if bits is None:
            bits = self._decide(topic)
            if len(topic) > _CACHE_MAX_TOPIC:
                return bits  # bound the cache's memory too, not just its length
            if len(cache) >= self._cache_size:
                cache.clear()
                if not self._cache_size:
                    return bits
            cache[topic] = bits
        return bits

    def _decide(self, topic: str) -> int:
        if not topic or "+" in topic or "#" in topic:
            return 0  # not a topic name: mosquitto_topic_matches_sub matches nothing
        mask = dollar_mask(topic) if topic[0] == "$" else READ | WRITE
        if not mask:
            return 0
        granted = 0
        if self._user is not None:
            flags = self._user.flags(topic)
            if flags & _DENY:
                return 0
            granted = flags & (READ | WRITE)
        if granted != READ | WRITE and self._patterns is not None and not self._dangerous:
            flags = self._patterns.flags(topic)
            if not flags & _DENY:
                granted |= flags & (READ | WRITE)
        return granted & mask

    def may_publish(self, topic: str) -> bool:
        """Whether a PUBLISH (or Will) to ``topic`` is allowed (``MOSQ_ACL_WRITE``)."""
        bits = self._cache.get(topic)  # the hot path: one dict lookup
        if bits is None:
            bits = self.access(topic)
        return bool(bits & WRITE)

    def may_read(self, topic: str) -> bool:
        """Whether a message on ``topic`` may be delivered to this client (``MOSQ_ACL_READ``)."""
        bits = self._cache.get(topic)
        if bits is None:
            bits = self.access(topic)
        return bool(bits & READ)

    def may_subscribe(self, topic_filter: str) -> bool:
        """Whether SUBSCRIBE to ``topic_filter`` is granted: always, as in Mosquitto 2.0.

        The filter must already be valid (the broker refuses malformed filters
        before any ACL check, as Mosquitto does). Delivery is still checked
        per message by :meth:`may_read`.
        """
        return True

    def may_read_any(self, topic_filter: str) -> bool:
        """Whether some topic ``topic_filter`` matches could be readable (ingestd's SUBSCRIBE
        check; Mosquitto grants all). Sound: True when the filter intersects an entry
        granting read (``deny`` ignored), so a filter that could deliver something
        readable is never refused; deliveries are still checked by :meth:`may_read`."""
        if topic_filter.startswith("$share"):
            return False  # a $share topic is never readable (acl__check_dollar)
        if self._user is not None:
            for flt in self._user.readable:
                if filters_intersect(flt, topic_filter):
                    return True
        if self._patterns is not None and not self._dangerous:
            for flt in self._patterns.readable:
                if filters_intersect(flt, topic_filter):
                    return True
        return False

    def __repr__(self) -> str:
        return f"<ClientAcl username={self.username!r} client_id={self.client_id!r}>"


class AclFile:
    """A parsed Mosquitto ``acl_file``; see the module docstring for the rules."""

    def __init__(
        self,
        entries: list[AclEntry],
        *,
        source: str = "<acl>",
        warnings: list[str] | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.source = source
        self.entries = tuple(entries)
        self.warnings = list(warnings or ())
        self.cache_size = cache_size
        # Per user section (None: the anonymous list), in file order.
        self._users: dict[str | None, list[AclEntry]] = {}
        self._patterns: list[AclEntry] = []
        for e in entries:
            if e.pattern:
                self._patterns.append(e)
            else:
                self._users.setdefault(e.username, []).append(e)
        self._uses_u = any("%u" in e.topic for e in self._patterns)
        self._uses_c = any("%c" in e.topic for e in self._patterns)
        self._user_rules: dict[tuple[str | None, tuple[str, ...]], _Rules] = {}
        self._pattern_rules: dict[tuple[str | None, str | None], _Rules] = {}
        self._clients: dict[tuple[str | None, str], ClientAcl] = {}

    # ------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, cache_size: int = DEFAULT_CACHE_SIZE) -> AclFile:
        """Parse the file at ``path``; ConfigError (key ``mqtt.acl_file``) if unreadable or malformed."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(
                f"cannot read the ACL file: {e.strerror or e}", path=name, key=_CONFIG_KEY
            ) from e
        return cls.parse(data, source=name, cache_size=cache_size)

    @classmethod
    def parse(
        cls, data: str | bytes, *, source: str = "<acl>", cache_size: int = DEFAULT_CACHE_SIZE
    ) -> AclFile:
        """Parse ACL file contents (``bytes`` are decoded as UTF-8, keeping invalid bytes)."""
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        entries: list[AclEntry] = []
        warnings: list[str] = []
        user: str | None = None

        def fail(lineno: int, reason: str) -> ConfigError:
            return ConfigError(f"line {lineno}: {reason}", path=source, key=_CONFIG_KEY)

        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file ended with a newline
        for lineno, raw in enumerate(lines, 1):
            line = raw.split("\0", 1)[0].rstrip(_C_SPACE)
            if not line or line[0] == "#":
                continue
            keyword, pos = _word(line, 0)
            if keyword is None:
                continue  # only spaces: strtok_r finds no token
            if keyword in ("topic", "pattern"):
                access_s, pos = _word(line, pos)
                if access_s is None:
                    raise fail(lineno, f"'{keyword}' without a topic")
                rest = line[pos:] if pos < len(line) else None
                if rest is not None:
                    topic = rest.strip(_C_SPACE)
                    if access_s not in _ACCESS_WORDS:
                        raise fail(
                            lineno,
                            f"invalid access type {access_s!r} "
                            "(expected read, write, readwrite or deny)",
                        )
                    access = _ACCESS_WORDS[access_s]
                else:
                    topic, access = access_s, READ | WRITE
                reason = _sub_topic_ok(topic)
                if reason is not None:
                    raise fail(lineno, f"invalid ACL topic {topic!r}: {reason}")
                is_pattern = keyword == "pattern"
                if is_pattern and "%c" not in topic and "%u" not in topic:
                    warnings.append(
                        f"{source}: line {lineno}: ACL pattern {topic!r} does not contain '%c' or '%u'"
                    )
                entries.append(
                    AclEntry(
                        topic=topic,
                        access=access,
                        line=lineno,
                        pattern=is_pattern,
                        username=None if is_pattern else user,
                    )
                )
            elif keyword == "user":
                if pos >= len(line):
                    raise fail(lineno, "'user' without a username")
                user = line[pos:].strip(_C_SPACE)
            else:
                raise fail(lineno, f"invalid line (expected topic, pattern or user): {line!r}")
        return cls(entries, source=source, warnings=warnings, cache_size=cache_size)

    # ----------------------------------------------------------- decisions

    def for_client(
        self, username: str | None, client_id: str, grants: tuple[str, ...] = ()
    ) -> ClientAcl:
        """A new :class:`ClientAcl` for a client that connected with ``username`` and ``client_id``.

        ``grants``: filters granted readwrite as if in the user's section (a
        tenant prefix from the credentials table). The user list is compiled
        once per username and the patterns once per distinct substitution, and
        shared between clients. An empty username is no username: Mosquitto
        reads a zero-length string as NULL (``packet__read_binary``).
        """
        if username == "":
            username = None
        user_key = (username, grants)
        user_rules = self._user_rules.get(user_key)
        if user_rules is None and (grants or username in self._users):
            entries = [(e.topic, e.access) for e in self._users.get(username, ())]
            user_rules = _Rules(entries + [(g, READ | WRITE) for g in grants])
            if len(self._user_rules) >= 65_536:
                self._user_rules.clear()
            self._user_rules[user_key] = user_rules
        pattern_rules: _Rules | None = None
        if self._patterns:
            key = (username if self._uses_u else None, client_id if self._uses_c else None)
            pattern_rules = self._pattern_rules.get(key)
            if pattern_rules is None:
                pattern_rules = _Rules(
                    (_substitute(e.topic, username, client_id), e.access)
                    for e in self._patterns
                    if username is not None or "%u" not in e.topic
                )
                if len(self._pattern_rules) >= 4096:
                    self._pattern_rules.clear()
                self._pattern_rules[key] = pattern_rules
        return ClientAcl(username, client_id, user_rules, pattern_rules, self.cache_size)

    def _client(self, username: str | None, client_id: str) -> ClientAcl:
        key = (username, client_id)
        acl = self._clients.get(key)
        if acl is None:
            if len(self._clients) >= 256:
                self._clients.clear()
            acl = self._clients[key] = self.for_client(username, client_id)
        return acl

    def may_publish(self, username: str | None, client_id: str, topic: str) -> bool:
        """Whether the client may PUBLISH to ``topic`` (prefer ``for_client(...).may_publish``)."""
        return self._client(username, client_id).may_publish(topic)

    def may_read(self, username: str | None, client_id: str, topic: str) -> bool:
        """Whether a message on ``topic`` may be delivered to the client."""
        return self._client(username, client_id).may_read(topic)

    def may_subscribe(self, username: str | None, client_id: str, topic_filter: str) -> bool:
        """Whether SUBSCRIBE to ``topic_filter`` is granted (always, as Mosquitto 2.0)."""
        return self._client(username, client_id).may_subscribe(topic_filter)

    def __repr__(self) -> str:
        return f"<AclFile {self.source!r}: {len(self.entries)} entries>"


def _word(line: str, pos: int) -> tuple[str | None, int]:
    """The next space-separated word from ``pos`` and the position after its delimiter.

    ``strtok_r(…, " ", …)``: skip spaces, the word ends at the next space
    (which is consumed), only ' ' is a delimiter.
    """
    n = len(line)
    while pos < n and line[pos] == " ":
        pos += 1
    if pos >= n:
        return None, n
    end = line.find(" ", pos)
    if end < 0:
        return line[pos:], n
    return line[pos:end], end + 1
