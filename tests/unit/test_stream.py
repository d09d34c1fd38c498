"""The server's view of one stream's answer (``relay_server.session.Stream``): a small
answer that came whole is taken in one piece, anything else is read chunk by chunk."""

from __future__ import annotations

from relay_server.session import Stream, StreamFailed


async def test_a_whole_answer_of_the_declared_length_is_taken_in_one_piece() -> None:
    stream = Stream(1)
    stream.feed(b"hello", end=True)  # as a RESPONSE carrying its body and END_STREAM
    assert stream.take_whole(5) == b"hello"
    assert not stream.has_chunk()


async def test_a_whole_answer_without_a_declared_length_is_taken_too() -> None:
    stream = Stream(1)
    stream.feed(b"", end=True)
    assert stream.take_whole(None) == b""
    stream = Stream(2)
    stream.feed(b"abc", end=True)
    assert stream.take_whole(None) == b"abc"


async def test_an_answer_not_whole_or_of_another_length_is_left_to_read() -> None:
    for length, feeds in [
        (5, [(b"hello", False)]),  # its end has not come
        (5, [(b"hel", False), (b"lo", True)]),  # in two pieces
        (4, [(b"hello", True)]),  # longer than declared: the caller cuts it
        (6, [(b"hello", True)]),  # shorter than declared
    ]:
        stream = Stream(1)
        for data, end in feeds:
            stream.feed(data, end)
        assert stream.take_whole(length) is None
        read = b""
        while stream.has_chunk():
            read += stream.read_nowait()
        assert read == b"".join(data for data, _ in feeds)


async def test_a_failed_stream_is_never_whole() -> None:
    stream = Stream(1)
    stream.fail(StreamFailed("agent disconnected"))
    assert stream.take_whole(None) is None
