"""The relay wire protocol, without I/O: frames, heads, stream states, credit.

This package imports only the standard library and never awaits: the server
(aiohttp) and the agent (websockets) each drive an ``Engine`` (engine.py: the
stream engine, outgoing buffer, PING answers, heartbeat, error state) from
their own event loop, passing it their clock.
"""

from . import frames
from .connection import Connection, Role
from .engine import Engine
from .errors import (
    BadHead,
    ConnectionFailed,
    FlowControlError,
    FrameTooLarge,
    HeadTooLarge,
    LocalProtocolError,
    ProtocolError,
    RelayError,
    StreamClosed,
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

#: Which build runs: "compiled with mypyc" (``RELAY_MYPYC=1`` at install: this library and
#: the server's and agent's request paths, setup.py) or "plain Python". ``relay-server
#: --version`` and ``relay-agent --version`` say it.
BUILD = "plain Python" if frames.__file__.endswith(".py") else "compiled with mypyc"

__all__ = [
    "BUILD",
    "PROTOCOL_VERSION",
    "BadHead",
    "Connection",
    "ConnectionFailed",
    "Data",
    "Engine",
    "FlowControlError",
    "Frame",
    "FrameTooLarge",
    "HeadTooLarge",
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
    "StreamClosed",
    "TargetUp",
    "TooManyStreams",
    "Welcome",
    "Window",
    "decode",
    "encode",
]
