"""``Expect: 100-continue`` (RFC 9110 10.1.1): the interim answer goes only once the
relay means to read the body.

aiohttp answers 100 Continue before any handler runs, so a request the relay then
refuses (an unknown or offline tunnel, a full queue, a transfer coding it cannot
carry) had the client upload its whole body for nothing, and the connection held while
it came. Here the route's expect handler only checks the expectation; ``send_continue``
sends the 100 where the ingress (or the API, once the token is checked) starts reading
the body; and an answer given without it closes the connection (``close_if_body_unsent``),
so that a keep-alive client does not have to upload the body all the same (RFC 9110
10.1.1), nor its next request be read as that body.

Not covered: a CONNECT or ``OPTIONS *`` request matches no route, and aiohttp's own
expect handler answers 100 before the relay refuses it (405, 400).
"""

from __future__ import annotations

from aiohttp import HttpVersion11, hdrs, web

#: Set on a request once its 100 Continue went out.
_ANSWERED = web.RequestKey("relay.continue_answered", bool)


def _asks_for_continue(request: web.Request) -> bool:
    return request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"


async def check_expectation(request: web.Request) -> web.StreamResponse | None:
    """The catch-all route's ``expect_handler``: 417 for an expectation other than
    100-continue (as aiohttp's own handler), else nothing yet (``send_continue``)."""
    if request.version == HttpVersion11 and not _asks_for_continue(request):
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {request.headers.get(hdrs.EXPECT, '')}")
    return None


async def send_continue(request: web.Request) -> None:
    """Send 100 Continue if ``request`` asked for it and none went yet: call before
    reading its body. Any refusal answered before this call reaches the client without
    its body having been sent."""
    if request.version != HttpVersion11 or not _asks_for_continue(request):
        return
    if request.get(_ANSWERED) or request.writer is None:
        return
    request[_ANSWERED] = True
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the response has not begun (as aiohttp does)


def close_if_body_unsent(request: web.Request, response: web.StreamResponse) -> None:
    """Close the connection after ``response`` if ``request`` waited for a 100 Continue it
    never got and its body has not come: ``Connection: close`` tells the client it need
    not send it (aiohttp reads what of it comes for its lingering time, then closes);
    kept alive, the client would have to, or its next request be read as the body."""
    if (
        _asks_for_continue(request)
        and request.body_exists
        and not request.get(_ANSWERED)
        and not request.content.is_eof()
    ):
        response.force_close()
