"""How the agent checks the server's certificate: always, against the system's CAs or
``--ca-file``; there is no insecure mode.

A certificate that does not verify (unknown CA, expired, another host's) is a fault of
configuration, not of the network: ``connect`` says why and exits 1 instead of retrying.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from relay_protocol import RelayError

from .errors import AgentConfigError

#: OpenSSL's reason when the peer answered the TLS handshake with something that is not
#: TLS: a plain-HTTP server behind an https:// URL. Also a configuration fault.
NOT_TLS_REASON = "WRONG_VERSION_NUMBER"


class CertificateRefused(RelayError):
    """The server's certificate (or its lack of TLS) makes the connection impossible."""


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying TLS client context: the system's CAs, or those in the PEM ``ca_file``.

    Raises ``AgentConfigError`` naming ``ca_file`` if it is missing, unreadable or holds
    no PEM certificate."""
    context = ssl.create_default_context()
    if ca_file is None:
        return context
    if not ca_file.is_file():
        raise AgentConfigError(f"--ca-file {ca_file}: no such file")
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise AgentConfigError(f"--ca-file {ca_file}: no PEM CA certificate in it ({exc.reason})") from exc
    except OSError as exc:
        raise AgentConfigError(f"--ca-file {ca_file}: {exc.strerror or exc}") from exc
    return context


def certificate_problem(exc: BaseException, host: str) -> CertificateRefused | None:
    """The ``CertificateRefused`` an exception from a TLS handshake with ``host`` means,
    or None if it is a network failure worth retrying."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        return CertificateRefused(
            f"cannot verify the certificate of {host}: {why} (a private CA needs --ca-file)"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason == NOT_TLS_REASON:
        return CertificateRefused(f"{host} does not speak TLS on this port (is the URL http://?)")
    return None
