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

import codecs
import json
import re
import zlib
from typing import Any
from urllib.parse import parse_qsl, unquote

#: Bytes of a hex dump: 2,048 lines of 16 bytes is what a person scrolls through; the
#: raw bytes of the whole kept body stay a click away.
MAX_HEX = 32 * 1024
#: Nesting a JSON tree may have: deeper documents (``[[[[...]]]]``) are shown as text,
#: which neither a reader nor the page's recursive drawing gets lost in.
MAX_JSON_DEPTH = 100
#: Values a JSON tree may have: a document of records takes 20 bytes or more a value, so
#: any such body within ``recorder.MAX_BODY`` fits; a megabyte of ``[],[],...`` (350,000
#: values) is shown as text, which the page draws at once (as a tree it was 8 MB of
#: JSON and half a minute of a browser's time).
MAX_JSON_NODES = 100_000
#: Fields shown of a form: more than a table anyone reads.
MAX_FORM_FIELDS = 1000
#: Length of a multipart boundary: RFC 2046 §5.1.1 allows 1 to 70 characters.
MAX_BOUNDARY = 70
#: Bytes of one multipart part's header lines: a name, a filename and a type take a few
#: hundred; a part whose headers do not end within this is not shown as a form.
MAX_PART_HEAD = 8 * 1024
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
# Text codecs of Python's that are no charset of a body (see ``_charset``).
_NOT_CHARSETS = frozenset({"idna", "punycode", "undefined", "unicode-escape", "raw-unicode-escape"})
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
    if complete and kind == "multipart/form-data" and "boundary" in params:
        parts = _multipart(body, params["boundary"])
        if parts is not None:
            return {**shown, "kind": "form", "shown": len(body), "fields": parts}
    text, lossy = _text(body, params.get("charset"))
    if lossy:  # said of a view that shows this text
        shown["lossy"] = True
    if complete and (_is_json_type(kind) or (not kind and body.lstrip()[:1] in (b"{", b"["))):
        tree = _json(text) if not lossy else None
        if tree is not None:
            return {**shown, "kind": "json", "shown": len(body), "tree": tree}
    if complete and kind == "application/x-www-form-urlencoded":
        # Only the fields shown are parsed: 500,000 ``&`` cost nothing then.
        first = "&".join(text.split("&", MAX_FORM_FIELDS)[:MAX_FORM_FIELDS])
        fields = parse_qsl(first, keep_blank_values=True, max_num_fields=None)
        return {**shown, "kind": "form", "shown": len(body), "fields": [list(f) for f in fields]}
    is_markup = kind in ("text/xml", "application/xml", "text/html") or kind.endswith("+xml")
    if (kind.startswith("text/") or is_markup or _is_json_type(kind) or not lossy) and not _BINARY.search(
        text
    ):
        return {**shown, "kind": "markup" if is_markup else "text", "shown": len(body), "text": text}
    shown.pop("lossy", None)  # a hex dump replaces nothing
    return {**shown, **_hex(body)}


def _is_json_type(kind: str) -> bool:
    return kind == "application/json" or kind.endswith("+json")


def _text(body: bytes, charset: str | None) -> tuple[str, bool]:
    """The body as text: in its declared charset if it is one (``_charset``), else UTF-8;
    and whether any bytes had to be replaced."""
    for codec in (_charset(charset), "utf-8"):
        if not codec:
            continue
        try:
            return body.decode(codec), False
        except UnicodeDecodeError:
            break  # the declared charset is wrong or the bytes are not text
        except (LookupError, TypeError, ValueError):
            continue  # a codec that takes no bytes after all: UTF-8 then
    return body.decode("utf-8", "replace"), True


def _charset(declared: str | None) -> str | None:
    """``declared`` if Python has it as a text codec that is a charset, else None. Python's
    codecs also include ones that are not (``hex``, ``rot13``; ``undefined`` always fails)
    and ones that are not charsets a body is written in and cost time growing with the
    square of the input (``idna`` and ``punycode``: 8 MB of ``xn--aaa...`` took 30 s)."""
    if not declared:
        return None
    try:
        info = codecs.lookup(declared)
    except LookupError:
        return None
    text_codec = getattr(info, "_is_text_encoding", True)
    return declared if text_codec and info.name not in _NOT_CHARSETS else None


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
    or is larger than a tree is worth (``MAX_JSON_DEPTH``, ``MAX_JSON_NODES``)."""
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
    return _node(value) if _fits_tree(value) else None


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


def _fits_tree(value: Any) -> bool:
    """Whether a parsed document is at most ``MAX_JSON_DEPTH`` levels deep and has at
    most ``MAX_JSON_NODES`` values; walked level by level, without recursion, and given up
    on as soon as it is too large."""
    depth, count, level = 0, 1, [value]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return False
        children = [
            child
            for item in level
            if isinstance(item, _Object | list)
            for child in ([v for _, v in item.pairs] if isinstance(item, _Object) else item)
        ]
        count += len(children)
        if count > MAX_JSON_NODES:
            return False
        level = [child for child in children if isinstance(child, _Object | list)]
    return True


def _multipart(body: bytes, boundary: str) -> list[list[str]] | None:
    """A multipart/form-data body's fields (RFC 7578, delimiters as RFC 2046 §5.1.1 has
    them): text values as they are, files as a line saying their name, type and size.
    None if it does not parse as multipart. Linear in the body, and it stops after
    ``MAX_FORM_FIELDS`` parts: a hostile body costs what reading it once costs (Python's
    email parser spent minutes on 190,000 parameters in one part's header)."""
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        return None
    # A delimiter is CRLF "--" boundary at the start of a line; the body's first may
    # have no CRLF before it.
    pieces = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1", "replace"), MAX_FORM_FIELDS + 1)
    if len(pieces) < 2:
        return None
    fields: list[list[str]] = []
    for piece in pieces[1 : MAX_FORM_FIELDS + 1]:
        if piece.startswith(b"--"):
            break  # the close delimiter
        # Transport padding (RFC 2046: spaces or tabs) ends the delimiter's line.
        line_end = piece.find(b"\r\n", 0, MAX_PART_HEAD)
        head_end = piece.find(b"\r\n\r\n", line_end, MAX_PART_HEAD)
        if line_end < 0 or piece[:line_end].strip(b" \t") or head_end < 0:
            return None
        headers = _part_headers(piece[line_end + 2 : head_end])
        data = piece[head_end + 4 :]
        disposition = _parameters(headers.get("content-disposition", ""))
        content_type = media_type(headers.get("content-type"))[0] or "text/plain"
        filename = disposition.get("filename")
        if filename is not None:
            value = f"(file {filename}, {content_type}, {len(data)} bytes)"
        else:
            value = data.decode("utf-8", "replace")
        fields.append([disposition.get("name", ""), value])
    return fields


def _part_headers(block: bytes) -> dict[str, str]:
    """A part's header lines as ``{lowercased name: value}`` (the first of a repeat)."""
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers.setdefault(name.strip().lower(), value.strip())
    return headers


# ``; key=value`` or ``; key="quoted \" value"`` after a header's first token.
_PARAMETER = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


# The charsets of an ``ext-value`` RFC 8187 §3.2.1 has recipients know.
_EXT_CHARSETS = ("utf-8", "iso-8859-1")


def _parameters(value: str) -> dict[str, str]:
    """A ``Content-Disposition``'s parameters (RFC 6266 §4.1): ``{"name": ..., "filename":
    ...}``, names lowercased, quoted strings unquoted, and an ``ext-value`` such as
    ``filename*=UTF-8''na%C3%AFve.txt`` (RFC 8187) decoded in place of the plain one."""
    found: dict[str, str] = {}
    for match in _PARAMETER.finditer(value):
        key, raw = match.group(1).lower(), match.group(2).strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        if key.endswith("*"):
            charset, _, rest = raw.partition("'")
            _, _, encoded = rest.partition("'")
            if charset.lower() in _EXT_CHARSETS:  # else the plain parameter stays
                found[key[:-1]] = unquote(encoded, encoding=charset, errors="replace")
        else:
            found.setdefault(key, raw)
    return found


def _decompress(body: bytes, encoding: str) -> bytes | None:
    """``body`` decoded from gzip or deflate, up to ``MAX_DECODED`` bytes; None if it is
    not what it says. A gzip body may be several members, one after the other (RFC 1952
    §2.2): all are decoded, as ``zcat`` does."""
    # 16 + MAX_WBITS: a gzip header; MAX_WBITS: zlib's (RFC 9110's "deflate").
    for wbits in (16 + zlib.MAX_WBITS,) if encoding != "deflate" else (zlib.MAX_WBITS, -zlib.MAX_WBITS):
        decoded: list[bytes] = []
        left, rest = MAX_DECODED, body
        try:
            while rest and left > 0:
                inflater = zlib.decompressobj(wbits)
                decoded.append(inflater.decompress(rest, left))
                left -= len(decoded[-1])
                if not inflater.eof or wbits != 16 + zlib.MAX_WBITS:
                    break  # cut at MAX_DECODED, or deflate: one stream
                rest = inflater.unused_data
        except zlib.error:
            if not decoded:
                continue
        return b"".join(decoded)
    return None


def _hex(body: bytes) -> dict[str, Any]:
    """A hex dump of the first ``MAX_HEX`` bytes: offset, 16 bytes in hex, and as ASCII."""
    lines = []
    for offset in range(0, min(len(body), MAX_HEX), 16):
        row = body[offset : offset + 16]
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{offset:08x}  {row[:8].hex(' '):<23}  {row[8:].hex(' '):<23}  |{ascii_}|")
    return {"kind": "hex", "shown": min(len(body), MAX_HEX), "hex": lines}
