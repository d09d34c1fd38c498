"""How the inspector decides to show a body (``bodies.render``): the kind, and its data."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest

from relay_agent.inspector.bodies import (
    MAX_FORM_FIELDS,
    MAX_HEX,
    MAX_JSON_DEPTH,
    MAX_JSON_NODES,
    media_type,
    render,
)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(32))


@pytest.mark.parametrize(
    ("body", "content_type", "kind"),
    [
        (b"", "application/json", "empty"),
        (b'{"a": 1}', "application/json", "json"),
        (b'{"a": 1}', "application/vnd.github+json; charset=utf-8", "json"),
        (b"[1, 2]", None, "json"),  # no type: sniffed
        (b'{"a": 1', "application/json", "text"),  # says JSON, is not
        (b"NaN", "application/json", "text"),  # not strict JSON: the page's parser would refuse it
        (b"a=1&b=2", "application/x-www-form-urlencoded", "form"),
        (b"<a href='x'>t</a>", "text/html", "markup"),
        (b'<r><x y="1"/></r>', "application/xml", "markup"),
        (b"<feed/>", "application/atom+xml", "markup"),
        (b"plain words\nand lines", "text/plain", "text"),
        (b"plain words", None, "text"),
        (PNG, "image/png", "image"),
        (PNG, "image/svg+xml", "hex"),  # svg is markup that runs scripts: never an <img> of ours
        (b"\x00\x01\x02binary", None, "hex"),
        (b"readable but declared binary", "application/octet-stream", "hex"),
        (b"\xff\xfe\xfd", "application/pdf", "hex"),
    ],
)
def test_the_kind_follows_the_type_and_the_bytes(body: bytes, content_type: str | None, kind: str) -> None:
    shown = render(body, content_type)
    assert shown["kind"] == kind, shown
    assert shown["size"] == len(body)


def _document(node: list[Any]) -> Any:
    """A tree's node back as Python (numbers as their literals)."""
    kind, payload = node
    if kind == "object":
        return {key: _document(child) for key, child in payload}
    if kind == "array":
        return [_document(child) for child in payload]
    return payload


def test_json_gives_the_parsed_document_for_the_tree() -> None:
    document = {"order": {"customer": {"address": {"city": "Lisbon"}}}, "items": [1, None, True, "2"]}
    shown = render(json.dumps(document).encode(), "application/json")
    assert shown["tree"][1][1] == [
        "items",
        ["array", [["number", "1"], ["null", None], ["boolean", True], ["string", "2"]]],
    ]
    assert _document(shown["tree"]) == {**document, "items": ["1", None, True, "2"]}
    json.dumps(shown, allow_nan=False)  # the page gets strict JSON


def test_json_numbers_are_shown_as_the_body_wrote_them() -> None:
    body = b'{"id": 820982911946154508, "price": 10.10, "e": 1E+2, "huge": 1e400, "tiny": -1e-400, "z": -0}'
    shown = render(body, "application/json")
    assert _document(shown["tree"]) == {
        "id": "820982911946154508",
        "price": "10.10",
        "e": "1E+2",
        "huge": "1e400",
        "tiny": "-1e-400",
        "z": "-0",
    }
    json.dumps(shown, allow_nan=False)  # never Infinity


def test_json_keys_keep_their_order_and_repeats() -> None:
    shown = render(b'{"b": 1, "2": 2, "b": 3}', "application/json")
    assert [key for key, _ in shown["tree"][1]] == ["b", "2", "b"]


def test_json_nested_deeper_than_a_tree_is_worth_is_text() -> None:
    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    assert render(deep, "application/json")["kind"] == "text"
    fine = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert render(fine, "application/json")["kind"] == "json"
    very_deep = b"[" * 100_000 + b"]" * 100_000  # past Python's recursion limit: no crash
    assert render(very_deep, "application/json")["kind"] == "text"


def test_form_fields_in_order_with_repeats_and_blanks() -> None:
    shown = render(b"a=1&b=caf%C3%A9&a=2&empty=&plus=x+y", "application/x-www-form-urlencoded")
    assert shown["fields"] == [["a", "1"], ["b", "café"], ["a", "2"], ["empty", ""], ["plus", "x y"]]


def test_multipart_fields_and_files() -> None:
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello there\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="upload"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n\x00\x01\x02\r\n--XX--\r\n"
    )
    shown = render(body, "multipart/form-data; boundary=XX")
    assert (shown["kind"], "lossy" in shown) == ("form", False)  # the file's bytes are not text
    assert shown["fields"] == [
        ["note", "hello there"],
        ["upload", "(file a.bin, application/octet-stream, 3 bytes)"],
    ]


def _part(disposition: bytes, value: bytes = b"v", extra: bytes = b"") -> bytes:
    return (
        b"--b\r\nContent-Disposition: form-data" + disposition + b"\r\n" + extra + b"\r\n" + value + b"\r\n"
    )


@pytest.mark.parametrize(
    ("disposition", "field"),
    [
        (b'; name="a;b"', ["a;b", "v"]),  # a quoted ";" is the name's
        (b'; name="say \\"hi\\""', ['say "hi"', "v"]),  # quoted-pair (RFC 9110 §5.6.4)
        (b"; NAME=plain ; other=1", ["plain", "v"]),
        (b"", ["", "v"]),
        (b"; name=f; filename*=UTF-8''na%C3%AFve.txt", ["f", "(file naïve.txt, text/plain, 1 bytes)"]),
        (
            b"; name=f; filename=\"a.txt\"; filename*=x-nope''b.txt",
            ["f", "(file a.txt, text/plain, 1 bytes)"],
        ),
    ],
)
def test_multipart_parameters(disposition: bytes, field: list[str]) -> None:
    shown = render(_part(disposition) + b"--b--\r\n", "multipart/form-data; boundary=b")
    assert (shown["kind"], shown["fields"]) == ("form", [field])


def test_multipart_padding_preamble_and_epilogue() -> None:
    body = b"preamble\r\n--b \t\r\nContent-Disposition: form-data; name=a\r\n\r\none\r\n--b--\r\nepilogue"
    assert render(body, "multipart/form-data; boundary=b")["fields"] == [["a", "one"]]


@pytest.mark.parametrize(
    "body",
    [
        # Found by an attacker: 190,000 parameters in one part's header took Python's
        # email parser 70 s on the agent's loop, and the server dropped the agent.
        _part(b'; name="x"' + b"; a=b" * 190_000),
        _part(b'; name="x"', extra=b"X-Long: " + b"y" * 10_000 + b"\r\n"),
        b"--b\r\nContent-Disposition: form-data; name=x\r\nno blank line",
        b"--bb\r\nContent-Disposition: form-data; name=x\r\n\r\nv\r\n--bb--",  # another boundary
    ],
)
def test_multipart_that_does_not_parse_within_bounds_is_text(body: bytes) -> None:
    assert render(body, "multipart/form-data; boundary=b")["kind"] == "text"


def test_multipart_and_url_encoded_forms_stop_at_the_fields_shown() -> None:
    many = _part(b"; name=x") * 80_000 + b"--b--\r\n"
    assert len(render(many, "multipart/form-data; boundary=b")["fields"]) == MAX_FORM_FIELDS
    amps = render(b"a=1&" * 500_000, "application/x-www-form-urlencoded")
    assert amps["fields"] == [["a", "1"]] * MAX_FORM_FIELDS


def test_a_boundary_longer_than_rfc_2046_allows_is_no_form() -> None:
    boundary = "b" * 71
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--{boundary}--".encode()
    assert render(body, f"multipart/form-data; boundary={boundary}")["kind"] == "text"
    assert (
        render(body.replace(b"b" * 71, b"b" * 70), "multipart/form-data; boundary=" + "b" * 70)["kind"]
        == "form"
    )


def test_json_with_more_values_than_a_tree_is_worth_is_text() -> None:
    fits = b"[" + b"0," * (MAX_JSON_NODES - 2) + b"0]"  # the array and its items
    assert render(fits, "application/json")["kind"] == "json"
    assert render(b"[0," + fits[1:], "application/json")["kind"] == "text"
    empties = b"[" + b"[]," * 349_000 + b"[]]"  # a megabyte: 8 MB as a tree
    assert render(empties, "application/json")["kind"] == "text"


def test_bytes_that_are_not_utf8_never_break_a_text() -> None:
    shown = render(b"caf\xe9 au lait", "text/plain")
    assert (shown["kind"], shown["text"], shown["lossy"]) == ("text", "caf\ufffd au lait", True)
    latin = render(b"caf\xe9", "text/plain; charset=iso-8859-1")
    assert (latin["text"], latin.get("lossy")) == ("café", None)
    unknown_charset = render(b"plain", "text/plain; charset=x-no-such-thing")
    assert unknown_charset["text"] == "plain"
    json.dumps(shown)  # what the page receives is valid JSON


def test_gzip_and_deflate_are_shown_decoded_but_not_brotli() -> None:
    document = b'{"x": [1, 2]}'
    shown = render(gzip.compress(document), "application/json", "gzip")
    assert (shown["kind"], shown["decoded"], _document(shown["tree"])) == ("json", "gzip", {"x": ["1", "2"]})
    deflated = render(zlib.compress(document), "application/json", "deflate")
    assert _document(deflated["tree"]) == {"x": ["1", "2"]}
    assert render(b"\x1b\x00", "application/json", "br")["kind"] == "hex"
    assert render(b"not gzip at all", "text/plain", "gzip")["kind"] == "hex"


def test_a_decompression_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b"a" * (50 * 1024 * 1024))
    shown = render(bomb, "text/plain", "gzip")
    assert shown["kind"] == "text"
    assert len(shown["text"]) == 1024 * 1024


def test_a_truncated_body_is_never_parsed() -> None:
    shown = render(b'{"a": 1}', "application/json", complete=False)
    assert (shown["kind"], shown["truncated"]) == ("text", True)
    assert render(PNG, "image/png", complete=False)["kind"] == "hex"


def test_the_hex_dump_shows_offsets_bytes_and_ascii_up_to_its_cap() -> None:
    shown = render(b"\x00AB" + bytes(range(0x80, 0x90)) + b"\xff" * (2 * MAX_HEX), None)
    assert shown["kind"] == "hex" and shown["shown"] == MAX_HEX
    assert shown["hex"][0] == "00000000  00 41 42 80 81 82 83 84  85 86 87 88 89 8a 8b 8c  |.AB.............|"
    assert len(shown["hex"]) == MAX_HEX // 16


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (None, ("", {})),
        ('Text/HTML; Charset="UTF-8"', ("text/html", {"charset": "UTF-8"})),
        ("multipart/form-data; boundary=a=b", ("multipart/form-data", {"boundary": "a=b"})),
    ],
)
def test_media_type(header: str | None, parsed: tuple[str, dict[str, str]]) -> None:
    assert media_type(header) == parsed


@pytest.mark.parametrize("charset", ["undefined", "punycode", "rot13", "base64", "idna", "zlib", "no-such"])
def test_a_charset_that_is_no_text_codec_never_breaks_the_view(charset: str) -> None:
    shown = render(b"hello", f"text/plain; charset={charset}")
    assert shown["kind"] in ("text", "hex") and shown["size"] == 5  # shown, not a 500


def test_a_gzip_body_of_several_members_is_decoded_whole() -> None:
    body = gzip.compress(b'{"part": ') + gzip.compress(b'"two members"}')
    shown = render(body, "application/json", "gzip")
    assert (shown["kind"], _document(shown["tree"])) == ("json", {"part": "two members"})


@pytest.mark.parametrize("charset", ["idna", "punycode", "hex", "rot13", "unicode_escape", "undefined"])
def test_a_codec_that_is_no_charset_is_not_used(charset: str) -> None:
    # idna and punycode take time growing with the square of the body (8 MB of
    # "xn--aaa..." took 30 s); the others are no text codecs, or no body's charset.
    shown = render(b"xn--" + b"a" * 1000 + b"\\n", f"text/plain; charset={charset}")
    assert (shown["kind"], shown["text"]) == ("text", "xn--" + "a" * 1000 + "\\n")  # as UTF-8
