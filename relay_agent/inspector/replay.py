"""Replaying an exchange to the local service, as it was or edited first.

A replay takes the path of a tunnel request: ``forward.forward`` with the agent's pooled
client session and configuration (so ``--host-header``, the exact header bytes and the
TLS checks apply alike), through a link recorded like any stream, so that it appears in
the list as a new exchange whose ``replay_of`` is the original. The link gives the body
and takes the response, which the recording keeps.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp

from relay_protocol import RelayError, RequestHead, ResponseHead
from relay_protocol.headers import header_value, is_websocket_upgrade
from relay_protocol.heads import TOKEN

from ..background import Background
from ..client import LocalClient
from ..config import AgentConfig
from ..forward import ForwardFailed, forward
from .recorder import MAX_BODY, Exchange, Recorder, RecordingLink
from .views import replay_refusal

#: Bytes of an edited body: what the recorder keeps of one, so that a replay can always
#: be shown, replayed again and copied as curl.
MAX_EDITED_BODY = MAX_BODY
# Controls a header value may not hold (RFC 9110 §5.5: field-content is visible
# characters, space, tab and obs-text; CR, LF and NUL would split or end the line).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_FIELDS = frozenset({"method", "target", "headers", "body", "body_base64"})


class LocalService(Protocol):
    """What a replay needs of the tunnel: its clients to the local service and its configuration."""

    local: LocalClient
    client: aiohttp.ClientSession
    config: AgentConfig


class EditRefused(ValueError):
    """A replay that cannot be made as asked; ``status`` is the API's answer (400, 409, 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def encode(text: str, what: str) -> bytes:
    """Text from the page back to the bytes it stands for (``views.text`` reversed)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise EditRefused(400, f"{what} holds a character that is no byte: {exc.reason}") from exc


def edited(original: Exchange, edits: Any) -> tuple[RequestHead, bytes]:
    """The request to replay: ``original``'s, with what ``edits`` changes. ``edits`` is the
    API's JSON: ``{}`` (as it was) or any of ``{"method": "PUT", "target": "/path?q",
    "headers": [[name, value], ...], "body": TEXT}`` (or ``"body_base64"`` instead of
    ``"body"``). An edited request is framed by what it sends, never by what the edits
    say: any Content-Length and Transfer-Encoding they give are dropped, and a
    Content-Length of the body's length is set when there is a body (or the original had
    a Content-Length), so a body is never sent chunked nor read as two requests. Raises
    ``EditRefused``."""
    if not isinstance(edits, dict):
        raise EditRefused(400, "the replay's edits must be a JSON object")
    if unknown := sorted(set(edits) - _FIELDS):
        raise EditRefused(400, f"unknown fields {', '.join(unknown)}; use {', '.join(sorted(_FIELDS))}")
    head = original.head
    if is_websocket_upgrade(head.method, head.headers):
        raise EditRefused(409, "a websocket cannot be replayed")
    method = _string(edits, "method", head.method)
    if method.upper() in ("CONNECT", "TRACE"):
        raise EditRefused(400, f"the relay never forwards {method.upper()}: a replay cannot send it")
    target = _target(_string(edits, "target", "")) if "target" in edits else head.target
    headers = _headers(edits["headers"]) if "headers" in edits else head.headers
    if is_websocket_upgrade(method, headers):
        raise EditRefused(400, "an edited replay cannot be a websocket upgrade: drop Upgrade or Connection")
    if "body" in edits and "body_base64" in edits:
        raise EditRefused(400, "give body or body_base64, not both")
    if "body" in edits:
        body = encode(_string(edits, "body", ""), "body")
    elif "body_base64" in edits:
        try:
            body = base64.b64decode(_string(edits, "body_base64", ""), validate=True)
        except binascii.Error as exc:
            raise EditRefused(400, f"body_base64 is not base64: {exc}") from exc
    else:
        if (refusal := replay_refusal(original)) is not None:
            raise EditRefused(409, f"this exchange cannot be replayed as it was: {refusal}; send a body")
        body = original.request.data()
    if len(body) > MAX_EDITED_BODY:
        raise EditRefused(413, f"a body of {len(body)} bytes is over the limit of {MAX_EDITED_BODY}")
    event_id = head.event_id
    if edits:
        if _names_framing(headers):
            raise EditRefused(
                400,
                "Connection cannot name Content-Length or Transfer-Encoding: "
                "an edited replay is framed by the body it sends",
            )
        headers = _framed(headers, body, header_value(head.headers, b"content-length") is not None)
        if header_value(headers, b"x-relay-event-id") != head.event_id.encode():
            event_id = ""  # no longer a delivery of that event
    try:
        return RequestHead(method, target, headers, client=head.client, event_id=event_id), body
    except RelayError as exc:  # BadHead: a method, target or header HTTP does not allow
        raise EditRefused(400, f"cannot send this request: {exc}") from exc


def _target(text: str) -> bytes:
    """An edited target: printable ASCII without spaces, as HTTP sends it."""
    if not all("!" <= c <= "~" for c in text):
        raise EditRefused(
            400, "the target must be printable ASCII without spaces: percent-encode the rest (é as %C3%A9)"
        )
    return text.encode("ascii")


def _framed(
    headers: tuple[tuple[bytes, bytes], ...], body: bytes, had_length: bool
) -> tuple[tuple[bytes, bytes], ...]:
    """``headers`` without the Content-Length and Transfer-Encoding an edit gave, and with
    the Content-Length of ``body`` when there is one or the original had one (in the
    place of the first Content-Length given, else last)."""
    framing = (b"content-length", b"transfer-encoding")
    place = next((i for i, (n, _) in enumerate(headers) if n.lower() == b"content-length"), None)
    kept = [(n, v) for i, (n, v) in enumerate(headers) if n.lower() not in framing or i == place]
    if not (body or had_length):
        return tuple(pair for pair in kept if pair[0].lower() != b"content-length")
    length = str(len(body)).encode()
    if place is None:
        return (*kept, (b"Content-Length", length))
    return tuple((n, length) if n.lower() == b"content-length" else (n, v) for n, v in kept)


def _names_framing(headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    """Whether a Connection header names a framing header: the forward would strip it as
    hop-by-hop (RFC 9110 §7.6.1) and send the body chunked."""
    return any(
        token.strip().lower() in (b"content-length", b"transfer-encoding")
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    )


def _string(edits: dict[str, Any], field: str, default: str) -> str:
    value = edits.get(field, default)
    if not isinstance(value, str):
        raise EditRefused(400, f"{field} must be a string")
    return value


def _headers(value: Any) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(value, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in value
    ):
        raise EditRefused(400, 'headers must be a list of [name, value] strings: [["Accept", "*/*"], ...]')
    for name, field in value:
        if not (name.isascii() and TOKEN.match(name.encode("ascii"))):
            raise EditRefused(
                400,
                f"the header name {name!r} is not a token (RFC 9110 §5.6.2: letters, digits, !#$%&'*+-.^_`|~"
                ")",
            )
        if _CONTROL.search(field):
            raise EditRefused(
                400, f"the value of {name} may hold no control character but tab (RFC 9110 §5.5)"
            )
    return tuple((encode(name, "a header name"), encode(field, "a header value")) for name, field in value)


class _LocalLink:
    """The far end of a replay: gives the body, drops the response (the recording keeps it)."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def body(self) -> AsyncIterator[bytes]:
        if self._body:
            yield self._body

    def whole_body(self) -> bytes | None:
        whole, self._body = self._body, b""
        return whole

    async def respond(self, head: ResponseHead, end: bool, body: bytes = b"") -> None:
        pass

    async def send_body(self, chunk: bytes, end: bool = False) -> None:
        pass

    async def reset(self, code: int, reason: str) -> None:
        pass


def start_replay(
    service: LocalService,
    recorder: Recorder,
    background: Background,
    head: RequestHead,
    body: bytes,
    replay_of: int,
) -> Exchange:
    """Record a new exchange for the replay and forward it in the background; the
    exchange is returned at once (the page follows it in the list as it runs)."""
    has_body = bool(body) or header_value(head.headers, b"content-length") is not None
    recording = recorder.record(head, has_body, _LocalLink(body), replay_of=replay_of, body=body)
    background.spawn(_forward(service, head, has_body, recording), f"replay {recording.exchange.id}")
    return recording.exchange


async def _forward(
    service: LocalService, head: RequestHead, has_body: bool, recording: RecordingLink
) -> None:
    status: int | str = "error"  # a bug: Background logs it
    error = ""
    try:
        status = await forward(service.local, service.client, service.config, head, has_body, recording)
    except ForwardFailed as exc:
        status, error = exc.status, str(exc)
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    finally:
        recording.finish(status, error)
