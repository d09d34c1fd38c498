""" "Copy as curl": the command, run by bash and the real curl, sends exactly the bytes it
was made from (a raw socket on the other end records them)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading

import pytest

from relay_agent.inspector.curl import MAX_ARGUMENT_BODY, curl_command, quote

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("bash") is None, reason="no curl"
)


@pytest.mark.parametrize(
    "data",
    [
        b"plain",
        b"it's got 'quotes' and \\ backslashes",
        b"caf\xc3\xa9 \xe2\x9c\x93",  # UTF-8
        b"caf\xe9",  # latin-1: not UTF-8
        b"tab\tnew\nline\rcr \x7f \x01",
        b"$HOME `id` $(id) !bang *glob ~",
        b"\xc2\x80\xc2\x9f",  # C1 controls as UTF-8 characters
        b"",
    ],
)
def test_a_quoted_word_is_those_bytes_to_bash(data: bytes) -> None:
    result = subprocess.run(["bash", "-c", f"printf %s {quote(data)}"], capture_output=True, check=True)
    assert result.stdout == data


class Capture:
    """A one-shot HTTP server on a raw socket: records the request's bytes, answers 204."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.raw = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.settimeout(10)
            while b"\r\n\r\n" not in self.raw:
                self.raw += connection.recv(65536)
            head, _, body = self.raw.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            chunked = b"transfer-encoding: chunked" in head.lower()
            while (length is not None and len(body) < length) or (
                chunked and not body.endswith(b"0\r\n\r\n")
            ):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                body += chunk
                self.raw = head + b"\r\n\r\n" + body
            connection.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        self.listener.close()

    def request(self) -> tuple[bytes, list[bytes], bytes]:
        self.thread.join(10)
        head, _, body = self.raw.partition(b"\r\n\r\n")
        line, *headers = head.split(b"\r\n")
        return line, headers, body


def _run(command: str) -> None:
    result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


def test_a_text_body_and_odd_headers_arrive_byte_exact() -> None:
    server = Capture()
    headers = (
        (b"Host", f"127.0.0.1:{server.port}".encode()),
        (b"Content-Type", b"application/json"),
        (b"X-Dup", b"1"),
        (b"x-dup", b"2"),
        (b"X-Latin", b"caf\xe9"),
        (b"X-Utf8", "café ✓".encode()),
        (b"X-Empty", b""),
        (b"X-Quote", b'it\'s "quoted" $HOME'),
        (b"Content-Length", b"27"),
    )
    body = b'{"a": "it\'s", "b": [1, 2]}\n'
    assert len(body) == 27
    command = curl_command("POST", f"http://127.0.0.1:{server.port}", b"/p/../a?b=[1]&c={x}", headers, body)
    assert "\n" not in command  # a text body keeps the command on one line
    _run(command)
    line, sent, received = server.request()
    assert line == b"POST /p/../a?b=[1]&c={x} HTTP/1.1"
    assert sent == [name + b": " + value if value else name + b":" for name, value in headers]
    assert received == body


def test_a_binary_body_goes_through_base64_on_stdin() -> None:
    server = Capture()
    body = bytes(range(256)) * 3 + b"\x00\r\n\x00"
    headers = ((b"Host", b"app.test"), (b"Content-Length", str(len(body)).encode()))
    command = curl_command("PUT", f"http://127.0.0.1:{server.port}", b"/bin", headers, body)
    assert "--data-binary @-" in command and command.startswith("base64 -d <<'BODY' | curl ")
    _run(command)
    line, sent, received = server.request()
    assert line == b"PUT /bin HTTP/1.1"
    assert sent == [b"Host: app.test", f"Content-Length: {len(body)}".encode()]
    assert received == body


def test_a_body_that_came_chunked_goes_chunked() -> None:
    server = Capture()
    body = b"x" * (MAX_ARGUMENT_BODY + 1)  # too long for an argument: stdin too
    command = curl_command("POST", f"http://127.0.0.1:{server.port}", b"/up", ((b"Host", b"h"),), body)
    _run(command)
    _, sent, received = server.request()
    assert sent == [b"Host: h", b"Transfer-Encoding: chunked"]
    assert _dechunk(received) == body


def _dechunk(data: bytes) -> bytes:
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return body
        body, data = body + data[:size], data[size + 2 :]


def test_a_bodiless_get_adds_no_header_of_curls_own() -> None:
    server = Capture()
    command = curl_command(
        "GET", f"http://127.0.0.1:{server.port}", b"/", ((b"Host", b"h"), (b"Accept", b"a/b")), b""
    )
    _run(command)
    line, sent, received = server.request()
    assert (line, sent, received) == (b"GET / HTTP/1.1", [b"Host: h", b"Accept: a/b"], b"")


def test_head_and_insecure() -> None:
    command = curl_command(
        "HEAD", "https://localhost:8443", b"/", ((b"Host", b"localhost:8443"),), b"", insecure=True
    )
    assert " --insecure " in command and " --head " in command and "-X" not in command


@pytest.mark.parametrize(
    "target",
    [
        b"/a#b?c",  # in a URL curl cuts at '#'
        b"/caf\xc3\xa9/\xe2\x9c\x93",  # UTF-8: in a URL curl percent-encodes it
        b"/caf\xe9",  # not UTF-8
        b"/x/../y/./z",  # in a URL without --path-as-is curl squashes it
        b"/q?a=[1]&b={x}&c=%zz|^`\\",
    ],
)
def test_the_target_arrives_byte_exact(target: bytes) -> None:
    server = Capture()
    _run(curl_command("GET", f"http://127.0.0.1:{server.port}", target, ((b"Host", b"h"),), b""))
    line, _, _ = server.request()
    assert line == b"GET " + target + b" HTTP/1.1"


def test_an_ipv6_local_service_is_not_globbed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    command = curl_command("GET", "http://[::1]:8080", b"/", ((b"Host", b"h"),), b"")
    assert "--globoff" in command and "'http://[::1]:8080'" in command
