"""Reading the headers of an agent's websocket frames as its bytes arrive
(``relay_server.fragments``): whole frames pass however the bytes are cut; the first
fragment is found."""

from __future__ import annotations

import itertools
import os

from hypothesis import given
from hypothesis import strategies as st

from relay_server.fragments import FrameHeaders


def frame(payload: bytes, opcode: int = 0x2, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame (RFC 6455 5.2), the payload masked with a random key."""
    size = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,))
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head += bytes((mask_bit | size,))
    elif size < 65536:
        head += bytes((mask_bit | 126,)) + size.to_bytes(2, "big")
    else:
        head += bytes((mask_bit | 127,)) + size.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


WHOLE = [
    frame(b""),
    frame(b"x" * 125),
    frame(b"y" * 126),
    frame(b"z" * 65535),
    frame(b"w" * 65536),
    frame(b"p", opcode=0x9),  # a ping
    frame(b"", opcode=0xA, masked=False),  # a pong, unmasked (aiohttp's to refuse)
    frame(bytes(200)),
]


def _feed(data: bytes, cuts: list[int]) -> list[bool]:
    headers = FrameHeaders()
    edges = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [headers.whole(data[a:b]) for a, b in itertools.pairwise(edges)]


@given(st.lists(st.integers(min_value=0), max_size=40))
def test_whole_frames_pass_however_their_bytes_are_cut(cuts: list[int]) -> None:
    assert all(_feed(b"".join(WHOLE), cuts))


def test_every_cut_of_a_header_is_judged_once_it_is_complete() -> None:
    data = b"".join(WHOLE)
    for cut in range(len(data) + 1):
        assert all(_feed(data, [cut])), cut


@given(st.lists(st.integers(min_value=0), max_size=40), st.sampled_from(["first", "continuation"]))
def test_a_fragment_after_whole_frames_is_found(cuts: list[int], kind: str) -> None:
    fragment = frame(b"", fin=False) if kind == "first" else frame(b"", opcode=0x0)
    results = _feed(b"".join(WHOLE) + fragment + frame(b"after"), cuts)
    assert results.count(False) >= 1
    assert all(results[: results.index(False)])


def test_a_stream_of_empty_fragments_is_found_at_the_first() -> None:
    headers = FrameHeaders()
    assert headers.whole(frame(b"hello")) is True
    assert headers.whole(frame(b"", fin=False) + frame(b"", opcode=0x0) * 1000) is False
