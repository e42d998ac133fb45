"""The in-broker representation of an application message.

:class:`Message` is compiled (ext/ingestd/_message.pyx: one is built per
inbound PUBLISH); its fields and methods are typed in ``ingestd/_message.pyi``.
"""

from ingestd._message import Message

__all__ = ["Message"]
