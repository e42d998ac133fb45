"""Upstream mode: consume from other MQTT brokers into the same routes (see docs/scaling.md).

:class:`Upstreams` (one :class:`Upstream` per ``[[upstream]]``) is started by
``ingestd.app`` after the listeners; nothing else imports this package.
"""

from ingestd.upstream.client import Upstream, UpstreamConnection, Upstreams

__all__ = ["Upstream", "UpstreamConnection", "Upstreams"]
