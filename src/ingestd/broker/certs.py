"""The user name a TLS client certificate stands for (Mosquitto's
``use_identity_as_username`` / ``use_subject_as_username``).

The TLS layer (``ingestd.app``'s SSL context, ``server.tls_cafile``) has
verified the certificate against the CA before any of this runs; here a
verified certificate, as :meth:`ssl.SSLSocket.getpeercert` returns it, is
turned into a user name:

- ``cn``: the subject's first Common Name, as Mosquitto;
- ``san_email`` / ``san_dns`` / ``san_uri``: the first subjectAltName of that
  kind (an ingestd extension: devices whose identity is a URI or a DNS name);
- ``subject``: the whole subject as OpenSSL prints it with ``-nameopt
  RFC2253`` (what Mosquitto's use_subject_as_username gives): last RDN
  first, ``CN=dev-1,O=Acme,C=DE``, short attribute names, RFC 2253 escapes,
  bytes past ASCII as ``\\XX``.

A name holding a NUL character is refused (as Mosquitto refuses a CN with an
embedded NUL).
"""

from __future__ import annotations

from typing import Any

from ingestd.config import ServerConfig

# OpenSSL's short names of the attributes Python reports by their long names.
_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "street",
    "domainComponent": "DC",
    "userId": "UID",
    "surname": "SN",
    "givenName": "GN",
    "title": "title",
    "initials": "initials",
    "generationQualifier": "generationQualifier",
    "dnQualifier": "dnQualifier",
    "pseudonym": "pseudonym",
    "serialNumber": "serialNumber",
    "emailAddress": "emailAddress",
    "name": "name",
    "businessCategory": "businessCategory",
    "postalCode": "postalCode",
}

_SAN_KINDS = {"san_email": "email", "san_dns": "DNS", "san_uri": "URI"}
_RFC2253_SPECIAL = frozenset(',+"\\<>;')


def identity_mode(server: ServerConfig) -> str | None:
    """What a TLS client's user name is taken from: ``"subject"``, the
    ``tls_identity_field`` (``"cn"``, ``"san_email"``, ...), or None (from CONNECT)."""
    if server.tls_use_subject_as_username:
        return "subject"
    if server.tls_use_identity_as_username:
        return server.tls_identity_field
    return None


def certificate_username(cert: dict[str, Any] | None, mode: str) -> str | None:
    """The user name ``cert`` (``getpeercert()``'s dict) gives in ``mode``; None if
    there is no certificate or it has no such field."""
    if not cert:
        return None
    name: str | None = None
    if mode == "subject":
        subject = cert.get("subject")
        name = rfc2253(subject) if subject else None
    elif mode == "cn":
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    name = value
                    break
            if name is not None:
                break
    else:
        kind = _SAN_KINDS[mode]
        for key, value in cert.get("subjectAltName", ()):
            if key == kind:
                name = value
                break
    if name is None or not name or "\x00" in name:
        return None
    return name


def rfc2253(subject: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    """A certificate subject as ``openssl x509 -noout -subject -nameopt RFC2253`` prints it."""
    return ",".join(
        "+".join(f"{_SHORT_NAMES.get(key, key)}={_escape(value)}" for key, value in rdn)
        for rdn in reversed(subject)
    )


def _escape(value: str) -> str:
    out: list[str] = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        code = ord(ch)
        if code < 0x20 or code == 0x7F:
            out.append(f"\\{code:02X}")
        elif code > 0x7F:
            out.extend(f"\\{b:02X}" for b in ch.encode())
        elif ch in _RFC2253_SPECIAL or (ch == "#" and i == 0) or (ch == " " and i in (0, last)):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
