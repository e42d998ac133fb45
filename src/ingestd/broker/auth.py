"""Auth: who may connect, and who may read and write which topic (one place).

:meth:`Auth.authenticate` decides a CONNECT from its user name and password
(``mqtt.allow_anonymous`` and the ``mqtt.password_file`` written by ``ingestd
passwd``, see :mod:`ingestd.broker.passwords`). :meth:`Auth.may_subscribe`
and :meth:`Auth.may_publish` are the authorisation decisions; today every
authenticated client may do both (ACLs are a later change, and belong here:
the compiled fast path must then ask :meth:`may_publish` too).
"""

from __future__ import annotations

from ingestd.broker.hooks import ClientInfo
from ingestd.broker.passwords import load_password_file, verify_password
from ingestd.config import MqttConfig
from ingestd.mqtt.constants import Reason


class Auth:
    """The broker's authentication and authorisation decisions."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        # user -> stored hash, read once at start-up (None: no password file).
        self.passwords: dict[str, str] | None = (
            load_password_file(config.password_file) if config.password_file else None
        )

    def authenticate(self, username: str | None, password: bytes | None, peer: str) -> int:
        """0 to accept a CONNECT, else its v5 CONNACK reason code."""
        if self.passwords is None:
            return 0 if (self.config.allow_anonymous or username) else Reason.NOT_AUTHORIZED
        if username is None:
            return 0 if self.config.allow_anonymous else Reason.NOT_AUTHORIZED
        stored = self.passwords.get(username)
        if stored is None or password is None or not verify_password(stored, password):
            return Reason.BAD_USER_NAME_OR_PASSWORD
        return 0

    def may_subscribe(self, client: ClientInfo | None, topic_filter: str) -> bool:
        """May ``client`` subscribe to ``topic_filter``? (Every client may, for now.)"""
        return True

    def may_publish(self, client: ClientInfo | None, topic: str) -> bool:
        """May ``client`` publish to ``topic``? (Every client may, for now.)"""
        return True
