"""How the inspector shows a body: decided here, drawn by the page (``static/app.js``).

``render`` picks one kind from the body's ``Content-Type`` (and, without one, from the
bytes themselves) and prepares what the page needs for it::

    kind     when                                                   data
    empty    no bytes                                               -
    json     a JSON type (application/json, */*+json), or none,     "tree": the document
             and the bytes parse as JSON                            as nodes (below)
    form     application/x-www-form-urlencoded, multipart/form-data "fields": [[name, value], ...]
    markup   an XML or HTML type (text/xml, */*+xml, text/html)     "text"
    text     text/*, JSON or XML that does not parse, or no type    "text"
             and bytes that are UTF-8 text
    image    a raster image type (png, jpeg, gif, webp, bmp, icon)  - (the page loads the bytes)
    hex      anything else                                          "hex": dump lines

A JSON tree's node is ``[type, payload]``: ``["object", [[key, NODE], ...]]`` (keys in
their order, repeats kept), ``["array", [NODE, ...]]``, ``["string", "text"]``,
``["number", "1E+2"]``, ``["boolean", true]`` or ``["null", null]``. A number is its
literal as the body wrote it: ``820982911946154508``, ``10.10`` and ``1e400`` are shown
as sent, not as a float would print them (or as ``Infinity``, which is not JSON).

Every kind also says ``size`` (the whole body), ``shown`` (bytes rendered) and, when
they apply, ``truncated`` (only the first ``recorder.MAX_BODY`` bytes were kept),
``decoded`` (the gzip or deflate ``Content-Encoding`` undone for display) and ``lossy``
(bytes that are not UTF-8 replaced by U+FFFD in a text). Nothing a body holds can make
``render`` raise: any bytes end as text or hex.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import zlib
from typing import Any
from urllib.parse import parse_qsl

#: Bytes of a hex dump: 2,048 lines of 16 bytes is what a person scrolls through; the
#: raw bytes of the whole kept body stay a click away.
MAX_HEX = 32 * 1024
#: Nesting a JSON tree may have: deeper documents (``[[[[...]]]]``) are shown as text,
#: which neither a reader nor the page's recursive drawing gets lost in.
MAX_JSON_DEPTH = 100
#: Fields shown of a form: more than a table anyone reads.
MAX_FORM_FIELDS = 1000
#: Bytes a compressed body may grow to when it is decoded for display: as much as the
#: recorder keeps of a body (a zip bomb stops there).
MAX_DECODED = 1024 * 1024

_IMAGE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/bmp",
        "image/x-icon",
        "image/vnd.microsoft.icon",
    }
)
# Controls other than tab, LF and CR: bytes that make a body binary rather than text.
_BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """``text/html; charset=utf-8`` as ``("text/html", {"charset": "utf-8"})``, lowercased."""
    if not content_type:
        return "", {}
    main, *params = content_type.split(";")
    parsed = {}
    for param in params:
        key, _, value = param.partition("=")
        parsed[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), parsed


def render(
    body: bytes, content_type: str | None, content_encoding: str | None = None, *, complete: bool = True
) -> dict[str, Any]:
    """The page's view of ``body`` (see the module's table). ``complete`` is False when
    only its start was kept: then it is never parsed, only shown as text or hex."""
    size = len(body)
    shown: dict[str, Any] = {"size": size}
    if not complete:
        shown["truncated"] = True
    if not body:
        return {**shown, "kind": "empty", "shown": 0}
    encoding = (content_encoding or "").strip().lower()
    if complete and encoding in ("gzip", "x-gzip", "deflate"):
        decoded = _decompress(body, encoding)
        if decoded is None:
            return {**shown, **_hex(body)}  # not what it says it is
        body = decoded
        shown["decoded"] = encoding
    elif encoding not in ("", "identity"):
        return {**shown, **_hex(body)}  # br, or compressed and cut short: the bytes as they are
    kind, params = media_type(content_type)
    if kind == "application/octet-stream":
        return {**shown, **_hex(body)}
    if kind in _IMAGE_TYPES and complete:
        return {**shown, "kind": "image", "shown": len(body)}
    text, lossy = _text(body, params.get("charset"))
    if lossy:
        shown["lossy"] = True
    if complete and (_is_json_type(kind) or (not kind and body.lstrip()[:1] in (b"{", b"["))):
        tree = _json(text) if not lossy else None
        if tree is not None:
            return {**shown, "kind": "json", "shown": len(body), "tree": tree}
    if complete and kind == "application/x-www-form-urlencoded":
        fields = parse_qsl(text, keep_blank_values=True, max_num_fields=None)[:MAX_FORM_FIELDS]
        return {**shown, "kind": "form", "shown": len(body), "fields": [list(f) for f in fields]}
    if complete and kind == "multipart/form-data" and "boundary" in params:
        parts = _multipart(body, content_type or "")
        if parts is not None:
            return {**shown, "kind": "form", "shown": len(body), "fields": parts}
    is_markup = kind in ("text/xml", "application/xml", "text/html") or kind.endswith("+xml")
    if (kind.startswith("text/") or is_markup or _is_json_type(kind) or not lossy) and not _BINARY.search(
        text
    ):
        return {**shown, "kind": "markup" if is_markup else "text", "shown": len(body), "text": text}
    return {**shown, **_hex(body)}


def _is_json_type(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def _text(body: bytes, charset: str | None) -> tuple[str, bool]:
    """The body as text: in its declared charset if Python knows it, else UTF-8; and
    whether any bytes had to be replaced."""
    for codec in (charset, "utf-8"):
        if not codec:
            continue
        try:
            return body.decode(codec), False
        except UnicodeDecodeError:
            break  # the declared charset is wrong or the bytes are not text
        except (LookupError, TypeError, ValueError):
            # A charset Python does not know, or one that is no text codec for bytes
            # ("undefined" and "punycode" raise UnicodeError, others TypeError).
            continue
    return body.decode("utf-8", "replace"), True


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class _Number:
    """A JSON number as the body wrote it."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


class _Object:
    """A JSON object as the body wrote it: its pairs in order, repeated keys and all."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def _json(text: str) -> list[Any] | None:
    """The document as a tree of nodes (see the module's docstring); None if ``text`` is
    not strict JSON (NaN and Infinity are not: the page's own parser would refuse them)
    or is nested deeper than ``MAX_JSON_DEPTH``."""
    try:
        value = json.loads(
            text,
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=_reject_constant,
            object_pairs_hook=_Object,
        )
    except (ValueError, RecursionError):
        return None
    return _node(value) if _depth(value) <= MAX_JSON_DEPTH else None


def _node(value: Any) -> list[Any]:
    """A parsed value as a node (it is at most ``MAX_JSON_DEPTH`` deep)."""
    if isinstance(value, _Object):
        return ["object", [[key, _node(child)] for key, child in value.pairs]]
    if isinstance(value, list):
        return ["array", [_node(child) for child in value]]
    if isinstance(value, _Number):
        return ["number", value.literal]
    if isinstance(value, bool):
        return ["boolean", value]
    if value is None:
        return ["null", None]
    return ["string", value]


def _depth(value: Any) -> int:
    """Levels of a parsed document (a scalar is 1), counted without recursion."""
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [
            child
            for item in level
            if isinstance(item, _Object | list)
            for child in ([v for _, v in item.pairs] if isinstance(item, _Object) else item)
            if isinstance(child, _Object | list)
        ]
    return depth


def _multipart(body: bytes, content_type: str) -> list[list[str]] | None:
    """A multipart/form-data body's fields: text values as they are, files as a line
    saying their name, type and size. None if it does not parse as multipart."""
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    message = parser.parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        return None
    fields: list[list[str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if filename is not None:
            value = f"(file {filename}, {part.get_content_type()}, {len(data)} bytes)"
        else:
            value = data.decode("utf-8", "replace")
        fields.append([str(name) if name is not None else "", value])
        if len(fields) >= MAX_FORM_FIELDS:
            break
    return fields


def _decompress(body: bytes, encoding: str) -> bytes | None:
    """``body`` decoded from gzip or deflate, up to ``MAX_DECODED`` bytes; None if it is
    not what it says."""
    # 16 + MAX_WBITS: a gzip header; MAX_WBITS: zlib's (RFC 9110's "deflate").
    for wbits in (16 + zlib.MAX_WBITS,) if encoding != "deflate" else (zlib.MAX_WBITS, -zlib.MAX_WBITS):
        try:
            return zlib.decompressobj(wbits).decompress(body, MAX_DECODED)
        except zlib.error:
            continue
    return None


def _hex(body: bytes) -> dict[str, Any]:
    """A hex dump of the first ``MAX_HEX`` bytes: offset, 16 bytes in hex, and as ASCII."""
    lines = []
    for offset in range(0, min(len(body), MAX_HEX), 16):
        row = body[offset : offset + 16]
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{offset:08x}  {row[:8].hex(' '):<23}  {row[8:].hex(' '):<23}  |{ascii_}|")
    return {"kind": "hex", "shown": min(len(body), MAX_HEX), "hex": lines}
