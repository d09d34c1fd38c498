"""HTTPS without a front proxy: the server's TLS context (``--tls-cert``/``--tls-key``)."""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import ConfigError


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context for the PEM certificate chain ``cert`` and private key ``key``.

    Python's defaults for a server (``ssl.create_default_context``, TLS 1.2 and newer;
    ALPN ``http/1.1``, the only protocol aiohttp speaks). Raises ``ConfigError`` naming
    the file and the reason when either cannot be read or they do not match.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    for path, option, marker, what in (
        (cert, "--tls-cert", b"-----BEGIN CERTIFICATE-----", "PEM certificate"),
        (key, "--tls-key", b"PRIVATE KEY-----", "PEM private key"),
    ):
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{option} {path}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"{option} {path}: {exc.strerror or exc}") from exc
        if marker not in text:
            raise ConfigError(f"{option} {path}: no {what} in it")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        why = "the key does not match the certificate" if exc.reason == "KEY_VALUES_MISMATCH" else None
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: {why or exc.reason or exc.strerror or 'cannot be loaded'}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"--tls-cert {cert} / --tls-key {key}: {exc.strerror or exc}") from exc
    return context
