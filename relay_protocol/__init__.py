"""The relay wire protocol, without I/O: frames, heads, stream states, credit.

This package imports only the standard library and never awaits: the server
(aiohttp) and the agent (websockets) each drive it from their own event loop.
"""

from .connection import Connection, Role
from .errors import (
    FlowControlError,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RelayError,
    TooManyStreams,
)
from .frames import (
    Data,
    Frame,
    Hello,
    Open,
    Ping,
    Pong,
    Reset,
    Response,
    TargetUp,
    Welcome,
    Window,
    decode,
    encode,
)
from .heads import Headers, RequestHead, ResponseHead
from .limits import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "Connection",
    "Data",
    "FlowControlError",
    "Frame",
    "FrameTooLarge",
    "Headers",
    "Hello",
    "LocalProtocolError",
    "Open",
    "Ping",
    "Pong",
    "ProtocolError",
    "RelayError",
    "RequestHead",
    "Reset",
    "Response",
    "ResponseHead",
    "Role",
    "TargetUp",
    "TooManyStreams",
    "Welcome",
    "Window",
    "decode",
    "encode",
]
