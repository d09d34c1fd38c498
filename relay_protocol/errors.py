"""The one exception tree of relay.

::

    RelayError                      anything relay raises on purpose
    ├── ProtocolError               the peer broke the wire protocol (its fault)
    │   ├── FrameTooLarge           a frame, head or header count over a limit
    │   └── FlowControlError        the peer sent more than the credit it was given
    └── LocalProtocolError          this side misused the protocol API (our fault)
        └── TooManyStreams          opening a stream over the concurrent-stream limit

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
    """A frame, a head or a header list exceeds a limit of ``relay_protocol.limits``."""


class FlowControlError(ProtocolError):
    """The peer sent more body bytes on a stream than the credit it had."""


class LocalProtocolError(RelayError):
    """This side called the protocol API in a way the protocol forbids.

    It is a bug in the caller (or a limit the caller must check first), never
    the peer's fault.
    """


class TooManyStreams(LocalProtocolError):
    """Opening one more stream would exceed the concurrent-stream limit."""
