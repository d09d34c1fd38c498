"""Tokens: JWTs signed with the server's secret, and the secret itself.

A token carries ``sub`` (the user), ``names`` (name patterns the user may
claim), ``exp``, ``iat`` and ``jti`` (its id, for revocation). One algorithm is
accepted, HS256, whatever a token's header says.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from .errors import AuthError, ConfigError

ALGORITHM = "HS256"
#: Bytes of randomness in a generated secret: 256 bits, HS256's own strength.
SECRET_BYTES = 32
SECRET_FILE = "secret"
SECRET_ENV = "RELAY_SECRET"
#: Shortest secret accepted from RELAY_SECRET: a shorter HMAC key is guessable.
MIN_SECRET_LENGTH = 32


@dataclass(frozen=True)
class Claims:
    user: str
    names: list[str]
    token_id: str
    expires_at: int


def load_secret(data_dir: Path) -> bytes:
    """The signing secret: RELAY_SECRET if set, else the data dir's file, made on first use.

    Raises ``ConfigError`` for a secret shorter than ``MIN_SECRET_LENGTH``.
    """
    env = os.environ.get(SECRET_ENV)
    if env:
        if len(env) < MIN_SECRET_LENGTH:
            raise ConfigError(f"{SECRET_ENV} must be at least {MIN_SECRET_LENGTH} characters")
        return env.encode()
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        # Written whole to a private file, then linked into place: another
        # process never sees a half-written secret, and the first one wins.
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".secret-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_hex(SECRET_BYTES).encode() + b"\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    value = path.read_bytes().strip()
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{path} holds a secret under {MIN_SECRET_LENGTH} characters: remove it")
    return value


def issue(
    secret: bytes, user: str, names: list[str], ttl: int, now: float | None = None
) -> tuple[str, Claims]:
    """Sign a new token; returns it with its claims (for the store)."""
    issued = int(now if now is not None else time.time())
    claims = Claims(user, names, uuid.uuid4().hex, issued + ttl)
    payload = {
        "sub": user,
        "names": names,
        "jti": claims.token_id,
        "iat": issued,
        "exp": claims.expires_at,
    }
    return jwt.encode(payload, secret, algorithm=ALGORITHM), claims


def verify(secret: bytes, token: str) -> Claims:
    """Check signature, algorithm, expiry and required claims; raises ``AuthError``."""
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub", "jti"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise AuthError("token signature invalid (signed by another server?)") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"token lacks the {exc.claim} claim") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError("token malformed") from exc
    names = payload.get("names")
    user = payload["sub"]
    if not isinstance(user, str) or not isinstance(payload["jti"], str):
        raise AuthError("token malformed")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise AuthError("token malformed: names must be a list")
    return Claims(user, names, payload["jti"], int(payload["exp"]))


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer ...`` header; raises ``AuthError``."""
    if not header:
        raise AuthError("missing Authorization header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization must be 'Bearer <token>'")
    return token.strip()
