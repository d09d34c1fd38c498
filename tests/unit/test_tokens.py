"""Tokens: signing, verification (HS256 only), the bearer header and the secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path

import jwt
import pytest

from relay_server import tokens
from relay_server.errors import AuthError, ConfigError
from relay_server.tokens import Claims, bearer, issue, load_secret, verify

SECRET = b"s" * 64
OTHER_SECRET = b"o" * 64


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, object], payload: dict[str, object], secret: bytes = SECRET) -> str:
    """A JWT whose header says whatever we like, HMAC-SHA256-signed with ``secret``."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _payload(**overrides: object) -> dict[str, object]:
    payload: dict[str, object] = {
        "sub": "alice",
        "names": ["alice", "alice-*"],
        "jti": "0123abcd",
        "iat": int(time.time()),
        "exp": int(time.time()) + 3600,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


# -- issue / verify ------------------------------------------------------------


def test_issue_then_verify_round_trip() -> None:
    token, claims = issue(SECRET, "alice", ["alice", "alice-*"], ttl=3600, now=time.time())
    assert claims.user == "alice"
    assert claims.names == ["alice", "alice-*"]
    assert len(claims.token_id) == 32
    assert verify(SECRET, token) == claims


def test_issue_sets_exp_from_now_and_ttl() -> None:
    now = time.time()
    token, claims = issue(SECRET, "alice", ["alice"], ttl=600, now=now)
    assert claims.expires_at == int(now) + 600
    payload = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert payload == {
        "sub": "alice",
        "names": ["alice"],
        "jti": claims.token_id,
        "iat": int(now),
        "exp": int(now) + 600,
    }
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_each_token_gets_its_own_id() -> None:
    ids = {issue(SECRET, "alice", ["alice"], ttl=60)[1].token_id for _ in range(20)}
    assert len(ids) == 20


def test_expired_token_is_refused() -> None:
    token, _ = issue(SECRET, "alice", ["alice"], ttl=60, now=time.time() - 3600)
    with pytest.raises(AuthError, match=r"^token expired$"):
        verify(SECRET, token)


def test_token_signed_with_another_secret_is_refused() -> None:
    token, _ = issue(OTHER_SECRET, "alice", ["alice"], ttl=60)
    with pytest.raises(AuthError, match="signature invalid"):
        verify(SECRET, token)


def test_tampered_payload_is_refused() -> None:
    token, _ = issue(SECRET, "alice", ["alice"], ttl=60)
    header, _, signature = token.split(".")
    evil = _b64(json.dumps(_payload(sub="admin", names=["*"])).encode())
    with pytest.raises(AuthError, match="signature invalid"):
        verify(SECRET, f"{header}.{evil}.{signature}")


def test_alg_none_is_refused() -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = _b64(json.dumps(_payload()).encode())
    with pytest.raises(AuthError):
        verify(SECRET, f"{header}.{body}.")


def test_hs512_signed_with_the_right_secret_is_refused() -> None:
    token = jwt.encode(_payload(), SECRET, algorithm="HS512")
    assert jwt.decode(token, SECRET, algorithms=["HS512"])["sub"] == "alice"  # a valid token...
    with pytest.raises(AuthError, match="malformed"):
        verify(SECRET, token)  # ...but only HS256 is accepted


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "HS384"])
def test_a_header_naming_another_algorithm_is_refused(alg: str) -> None:
    # An HMAC-SHA256 signature under a header that claims another algorithm:
    # the classic key-confusion shape.
    token = _forge({"alg": alg, "typ": "JWT"}, _payload())
    with pytest.raises(AuthError, match="malformed"):
        verify(SECRET, token)


def test_forged_hs256_header_with_the_right_secret_is_accepted() -> None:
    # Control for the test above: the forger itself makes valid HS256 tokens.
    assert verify(SECRET, _forge({"alg": "HS256", "typ": "JWT"}, _payload())).user == "alice"


@pytest.mark.parametrize("claim", ["exp", "sub", "jti"])
def test_missing_required_claim_is_refused(claim: str) -> None:
    token = jwt.encode(_payload(**{claim: None}), SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match=rf"^token lacks the {claim} claim$"):
        verify(SECRET, token)


@pytest.mark.parametrize(
    "overrides",
    [
        {"names": None},
        {"names": "alice"},
        {"names": ["alice", 7]},
        {"sub": 42},
        {"jti": 1234},
    ],
)
def test_claims_of_the_wrong_type_are_refused(overrides: dict[str, object]) -> None:
    token = jwt.encode(_payload(**overrides), SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="malformed"):
        verify(SECRET, token)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "....", "Bearer x"])
def test_garbage_is_refused_as_malformed(token: str) -> None:
    with pytest.raises(AuthError, match="malformed"):
        verify(SECRET, token)


def test_verify_returns_claims() -> None:
    token = jwt.encode(_payload(jti="t1", exp=2_000_000_000), SECRET, algorithm="HS256")
    assert verify(SECRET, token) == Claims("alice", ["alice", "alice-*"], "t1", 2_000_000_000)


# -- bearer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("Bearer   abc  ", "abc"),
    ],
)
def test_bearer_extracts_the_token(header: str, token: str) -> None:
    assert bearer(header) == token


@pytest.mark.parametrize("header", [None, ""])
def test_bearer_without_header(header: str | None) -> None:
    with pytest.raises(AuthError, match="missing Authorization header"):
        bearer(header)


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer    ", "Basic abc", "Token abc", "abc"])
def test_bearer_refuses_other_schemes_and_empty_tokens(header: str) -> None:
    with pytest.raises(AuthError, match="Bearer <token>"):
        bearer(header)


# -- load_secret -----------------------------------------------------------------


def test_load_secret_creates_a_private_file_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = load_secret(data_dir)
    path = data_dir / tokens.SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 2 * tokens.SECRET_BYTES  # hex
    int(first, 16)
    assert path.read_bytes() == first + b"\n"
    mtime = path.stat().st_mtime_ns
    assert load_secret(data_dir) == first
    assert path.stat().st_mtime_ns == mtime


def test_load_secret_reuses_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / tokens.SECRET_FILE).write_bytes(b"x" * 40 + b"\n")
    assert load_secret(tmp_path) == b"x" * 40


@pytest.mark.parametrize("content", [b"", b"\n", b"short\n"])
def test_load_secret_refuses_an_empty_or_short_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / tokens.SECRET_FILE).write_bytes(content)
    with pytest.raises(ConfigError):
        load_secret(tmp_path)


def test_two_data_dirs_get_different_secrets(tmp_path: Path) -> None:
    assert load_secret(tmp_path / "a") != load_secret(tmp_path / "b")


def test_tokens_survive_a_restart(tmp_path: Path) -> None:
    token, claims = issue(load_secret(tmp_path), "alice", ["alice"], ttl=60)
    assert verify(load_secret(tmp_path), token) == claims


def test_relay_secret_env_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_secret(tmp_path)  # a file exists...
    value = "e" * tokens.MIN_SECRET_LENGTH
    monkeypatch.setenv(tokens.SECRET_ENV, value)
    assert load_secret(tmp_path) == value.encode()  # ...and is ignored


def test_relay_secret_env_creates_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tokens.SECRET_ENV, "e" * 48)
    assert load_secret(tmp_path / "data") == b"e" * 48
    assert not (tmp_path / "data" / tokens.SECRET_FILE).exists()


def test_too_short_relay_secret_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tokens.SECRET_ENV, "e" * (tokens.MIN_SECRET_LENGTH - 1))
    with pytest.raises(ConfigError, match="RELAY_SECRET must be at least 32 characters"):
        load_secret(tmp_path)
    assert os.listdir(tmp_path) == []
