""" "Copy as curl": a shell command that sends the local service the same bytes again.

The command reproduces the request as the agent sent it (``forward.outgoing_headers``:
Host per ``--host-header``, hop-by-hop headers removed): the method, the target's exact
bytes (``--request-target``: in a URL curl would cut a ``#`` and what follows, squash
``/../`` and percent-encode bytes that are not ASCII; ``--globoff`` keeps the brackets of
an IPv6 address out of its globbing), every header in order, repeats included, and the
body byte for byte. curl's own headers that the request did not have (User-Agent,
Accept, and with a body Content-Type and Expect) are removed, and a body that came
without Content-Length goes chunked as it did. A text body travels as an argument
(``--data-raw``, which never reads a file); any other body as base64 decoded into curl's
stdin (``base64 -d <<'BODY' | curl ... --data-binary @-``), so that no byte depends on
the shell or the clipboard. Arguments holding bytes a shell line cannot carry as they are
(controls, bytes that are not UTF-8) use bash's ``$'...'`` quoting with ``\\xNN``.
"""

from __future__ import annotations

import base64
import re
import shlex

from relay_protocol.heads import Headers

#: Bytes of a body sent as a command-line argument: beyond, the command would be a wall
#: of text (and near the shell's argument limit); base64 on stdin takes any size.
MAX_ARGUMENT_BODY = 64 * 1024
#: The here-document's delimiter: base64 never contains it.
HEREDOC = "BODY"
# Characters that cannot stand in a plain '...' argument on one shell line.
_UNQUOTABLE = re.compile(r"[\x00-\x1f\x7f]")


def curl_command(
    method: str, base_url: str, target: bytes, headers: Headers, body: bytes, *, insecure: bool = False
) -> str:
    """The shell command sending ``method target`` to ``base_url`` (``http://host:port``, the
    local service) with ``headers`` and ``body``; ``insecure`` adds ``--insecure`` (an
    https:// local service whose certificate the agent does not check)."""
    args = ["curl", "--http1.1", "--globoff"]
    if insecure:
        args.append("--insecure")
    args += ["--head"] if method == "HEAD" else ["-X", quote(method.encode("ascii"))]
    args += ["--request-target", quote(target), quote(base_url.encode("utf-8", "surrogateescape"))]
    present = {name.lower() for name, _ in headers}
    for name, value in headers:
        # "Name;" is how curl sends a header with an empty value ("Name:" removes it).
        args += ["-H", quote(name + b";" if not value.strip() else name + b": " + value)]
    removed = [b"user-agent", b"accept"]
    if body:
        removed += [b"content-type", b"expect"]
        if b"content-length" not in present and b"transfer-encoding" not in present:
            args += ["-H", quote(b"Transfer-Encoding: chunked")]
    for name in removed:
        if name not in present:
            args += ["-H", quote(_canonical(name) + b":")]
    if not body:
        return " ".join(args)
    if _is_text(body):
        return " ".join([*args, "--data-raw", quote(body)])
    encoded = base64.encodebytes(body).decode("ascii")
    return f"base64 -d <<'{HEREDOC}' | {' '.join([*args, '--data-binary', '@-'])}\n{encoded}{HEREDOC}"


def quote(data: bytes) -> str:
    """``data`` as one shell word that stands for exactly these bytes: plain quoting for
    UTF-8 text without controls, bash's ``$'...'`` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not _UNQUOTABLE.search(text):
        return shlex.quote(text)
    # In UTF-8 text only the ASCII controls are escaped, other characters stay as they
    # are; in other bytes, everything outside printable ASCII is.
    out = []
    for char in text if text is not None else data.decode("latin-1"):
        code = ord(char)
        if char in "\\'":
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F or (text is not None and code > 0x7F):
            out.append(char)
        else:
            out.append(f"\\x{code:02x}")
    return "$'" + "".join(out) + "'"


def _is_text(body: bytes) -> bool:
    """A body that reads well as an argument: UTF-8, no NUL (an argument ends there), not huge."""
    if len(body) > MAX_ARGUMENT_BODY or b"\x00" in body:
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _canonical(name: bytes) -> bytes:
    return b"-".join(part.capitalize() for part in name.split(b"-"))
