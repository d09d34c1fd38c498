"""How the agent checks certificates.

The relay server's: always, against the system's CAs or ``--ca-file``; there is no
insecure mode. A certificate that does not verify (unknown CA, expired, another host's) is a
fault of configuration, not of the network: ``connect`` says why and exits 1 instead of
retrying.

The local service's (an https:// ``--forward``): not by default, as the local hop is the
user's own machine and dev servers use self-signed or dev-CA certificates (ngrok does the
same for local upstreams); ``--forward-ca FILE`` verifies against that CA and
``--forward-verify`` against the system's store.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from relay_protocol import RelayError

from .errors import AgentConfigError

#: OpenSSL's reason when the peer answered the TLS handshake with something that is not
#: TLS: a plain-HTTP server behind an https:// URL. Also a configuration fault.
NOT_TLS_REASON = "WRONG_VERSION_NUMBER"


class CertificateRefused(RelayError):
    """The server's certificate (or its lack of TLS) makes the connection impossible."""


def client_context(ca_file: Path | None, option: str = "--ca-file") -> ssl.SSLContext:
    """A verifying TLS client context: the system's CAs, or those in the PEM ``ca_file``.

    Raises ``AgentConfigError`` naming ``option`` and the file if it is missing,
    unreadable or holds no PEM certificate."""
    context = ssl.create_default_context()
    if ca_file is None:
        return context
    if not ca_file.is_file():
        raise AgentConfigError(f"{option} {ca_file}: no such file")
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise AgentConfigError(f"{option} {ca_file}: no PEM CA certificate in it ({exc.reason})") from exc
    except OSError as exc:
        raise AgentConfigError(f"{option} {ca_file}: {exc.strerror or exc}") from exc
    return context


def forward_context(ca_file: Path | None, verify: bool) -> ssl.SSLContext | bool:
    """The check of an https:// local service's certificate: a context verifying against
    ``ca_file`` (``--forward-ca``) or the system's store (``--forward-verify``), else False
    (not verified). Raises ``AgentConfigError`` as ``client_context``."""
    if ca_file is None and not verify:
        return False
    return client_context(ca_file, "--forward-ca")


#: OpenSSL's verification codes (``X509_V_ERR_*``) a hint can be given for.
_UNKNOWN_ISSUER = frozenset({18, 19, 20, 21})  # self-signed, self-signed in chain, no issuer, no first issuer
_NOT_IN_TIME = frozenset({9, 10})  # not yet valid, expired
_OTHER_NAME = 62  # hostname mismatch


def tls_problem(exc: BaseException, host: str, ca_option: str, name_hint: str) -> str | None:
    """What an exception from a TLS handshake with ``host`` says about the configuration
    (a certificate that does not verify, with a hint fitting the cause: ``ca_option`` for
    an unknown CA, ``name_hint`` for another host's certificate; no TLS on the port), or
    None if it is something else (a network failure)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or str(exc)
        if exc.verify_code in _UNKNOWN_ISSUER:
            hint = f" ({ca_option} must name the CA that signed it)"
        elif exc.verify_code in _NOT_IN_TIME:
            hint = " (the certificate must be renewed, or this machine's clock is wrong)"
        elif exc.verify_code == _OTHER_NAME:
            hint = f" (it was issued for other names: {name_hint})"
        else:
            hint = ""
        return f"cannot verify the certificate of {host}: {why}{hint}"
    if isinstance(exc, ssl.SSLError) and exc.reason == NOT_TLS_REASON:
        return f"{host} does not speak TLS on this port (is the URL http://?)"
    return None


#: Seconds to find out whether a port that did not answer HTTP speaks TLS instead.
TLS_SNIFF_TIMEOUT = 5.0


async def speaks_tls(host: str, port: int) -> bool:
    """True if a TLS handshake with ``host:port`` completes (its certificate unchecked: only
    the question "is this TLS?" is asked, and nothing is sent after the handshake)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(TLS_SNIFF_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def certificate_problem(exc: BaseException, host: str) -> CertificateRefused | None:
    """The ``CertificateRefused`` an exception from a TLS handshake with the relay server
    ``host`` means, or None if it is a network failure worth retrying."""
    problem = tls_problem(exc, host, "a private CA needs --ca-file, and it", "check the server URL")
    return CertificateRefused(problem) if problem is not None else None
