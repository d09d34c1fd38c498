"""The one exception tree of relay.

::

    RelayError                      anything relay raises on purpose
    ├── ProtocolError               the peer broke the wire protocol (its fault): close with 1002
    │   ├── FrameTooLarge           a received frame, head or header count over a limit
    │   └── FlowControlError        the peer sent more than the credit it was given
    └── LocalProtocolError          this side misused the protocol API (our fault)
        ├── TooManyStreams          opening a stream over the concurrent-stream limit
        ├── BadHead                 a head built here (from public input, or from the local
        │   │                       app's answer) that the protocol cannot carry: refused
        │   │                       before any state changed; the caller answers 4xx (502
        │   │                       on the agent)
        │   └── HeadTooLarge        over MAX_HEAD_SIZE, MAX_HEADER_COUNT or a field's length
        ├── BodyDoesNotFit          a body too large to ride in its head's frame (the
        │                           engine then sends it in DATA frames)
        ├── StreamClosed            sending on a stream that is finished or reset (perhaps
        │                           by the peer a moment ago): nothing more goes on it
        └── ConnectionFailed        the connection is in its error state (the transport
                                    failed, a send could not complete, the peer broke the
                                    protocol, the heartbeat gave up): it refuses every call

Whose fault decides the answer: a ``ProtocolError`` ends the connection; a
``BadHead`` fails one request and leaves the connection as it was.

Server and agent add their own subclasses of ``RelayError`` at their boundary
(configuration, authentication, store) and translate other libraries' errors
into them with ``raise ... from exc``.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base class of every error relay raises on purpose."""


class ProtocolError(RelayError):
    """The peer sent bytes that break the wire protocol.

    The connection cannot go on: close it (websocket close code 1002).
    """


class FrameTooLarge(ProtocolError):
    """A received frame, head or header list exceeds a limit of ``relay_protocol.limits``."""


class FlowControlError(ProtocolError):
    """The peer sent more body bytes on a stream than the credit it had."""


class LocalProtocolError(RelayError):
    """This side called the protocol API in a way the protocol forbids.

    It is a bug in the caller, or input the caller must refuse (``BadHead``),
    never the peer's fault. The call changed nothing.
    """


class TooManyStreams(LocalProtocolError):
    """Opening one more stream would exceed the concurrent-stream limit."""


class BadHead(LocalProtocolError):
    """A request or response head that cannot travel: a method, target, header
    name or value the protocol forbids.

    Raised when the head is built or encoded, before any stream id is spent:
    the server answers the public client 400 (or 431/414, ``HeadTooLarge``),
    the agent answers 502. The connection is untouched.
    """


class HeadTooLarge(BadHead):
    """A head over ``MAX_HEAD_SIZE`` or ``MAX_HEADER_COUNT``, or a field over its length prefix.

    ``part`` names what is too large: ``"target"`` (answer 414 URI Too Long),
    ``"headers"`` or ``"head"`` (431 Request Header Fields Too Large), or a
    field the relay adds itself (``"client"``, ``"event id"``).
    """

    def __init__(self, message: str, part: str = "head") -> None:
        super().__init__(message)
        self.part = part


class BodyDoesNotFit(LocalProtocolError):
    """A head and the body bytes meant to ride with it are over one frame's payload
    (``MAX_DATA_SIZE``): nothing was queued, and the body goes in DATA frames instead."""


class StreamClosed(LocalProtocolError):
    """The stream is finished or was reset (the peer may have reset it a moment
    ago): nothing more may be sent on it. Not a bug: the stream's own failure
    says why it ended."""


class ConnectionFailed(LocalProtocolError):
    """The connection is in its error state and refuses further use.

    It got there after a local failure (a send that could not complete, the
    transport lost, the heartbeat giving up) or the peer's ``ProtocolError``;
    the state it had then is kept, never half-updated.
    """
