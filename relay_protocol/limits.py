"""Every size and count limit of the wire protocol, with its reason.

The decoder checks each of these before it allocates anything for a frame.
Changing one changes the protocol: bump ``PROTOCOL_VERSION`` and docs/protocol.md.
"""

from __future__ import annotations

#: Version spoken in HELLO and WELCOME. Peers refuse any other version.
PROTOCOL_VERSION = 1

#: Bytes of the fixed frame header: type (1), flags (1), stream id (4).
FRAME_HEADER_SIZE = 6

#: Largest body chunk in one DATA frame. 64 KiB keeps one websocket message
#: small enough to interleave many streams fairly on one connection.
MAX_DATA_SIZE = 64 * 1024

#: Largest encoded request or response head (method, target, headers). Twice
#: the largest header block the public ingress accepts, so any request that
#: got past ingress fits.
MAX_HEAD_SIZE = 64 * 1024

#: Largest header count in one head: well above what browsers and webhook
#: providers send (tens), low enough to bound the work of one frame.
MAX_HEADER_COUNT = 256

#: Largest control payload (HELLO, WELCOME, RESET reason, PING).
MAX_CONTROL_SIZE = 64 * 1024

#: Largest websocket message either side accepts: one frame of the largest kind.
MAX_FRAME_SIZE = FRAME_HEADER_SIZE + max(MAX_DATA_SIZE, MAX_HEAD_SIZE, MAX_CONTROL_SIZE)

#: Credit each direction of each stream starts with. With 64 KiB frames it keeps
#: four frames in flight, enough to fill a fast loopback or LAN link, while
#: capping what a slow reader can make the other side buffer per stream.
INITIAL_WINDOW = 256 * 1024

#: Most credit a receiver grants one direction of one stream when the stream is fast
#: (its body is taken off the receiver's hands quickly): the window doubles from
#: INITIAL_WINDOW up to this, so one bulk transfer is not limited to a window per round
#: trip between two busy processes (a 64 MiB download went from 180 to 300 MB/s with
#: 2 MiB). A receiver choice, not wire format: any WINDOW increment is valid.
MAX_WINDOW = 4 * 1024 * 1024

#: Most credit beyond INITIAL_WINDOW a receiver grants on one connection, all streams
#: together: bounds what fast streams can make it buffer if their readers stall later
#: (MAX_CONCURRENT_STREAMS x INITIAL_WINDOW + this, at worst).
MAX_WINDOW_GROWTH = 32 * 1024 * 1024

#: Seconds within which the receiver must have taken half a window again for the stream
#: to count as fast (its window then doubles): a reader that keeps up with a LAN link.
FAST_GRANT_INTERVAL = 0.05

#: Concurrent streams on one agent connection. Bounds the memory one agent can
#: pin (streams x window = 256 MiB in the worst case) and is far above the
#: 200 concurrent requests the tests drive through one agent.
MAX_CONCURRENT_STREAMS = 1000

#: Largest stream id: ids are 32-bit and never reused on one connection.
MAX_STREAM_ID = 2**32 - 1

#: Tunnels one agent connection may ask for in HELLO.
MAX_TUNNELS_PER_AGENT = 16

#: Seconds between heartbeats (PING) from either side when nothing else flows: the
#: default of ``--heartbeat-interval``, as ngrok's agent's ``heartbeat_interval``
#: (ngrok.com/docs/ngrok-agent/config; frp's interval has been configurable since
#: v0.9.2 too), far under the idle timeouts of NATs and proxies (60 s and up).
HEARTBEAT_INTERVAL = 10.0
#: The range ``--heartbeat-interval`` accepts. Each side times out on the answers to
#: its own PINGs, and counts no silence while frames of its own wait to be sent, so the
#: two sides need not agree. At least 5 s, so at least 15 s of silence (ngrok's default
#: ``heartbeat_tolerance``): a PING sent behind a slow link's backlog (the socket
#: buffers, beyond the frames this side still holds) comes back only once the backlog
#: is through, and a 1 s interval took a 40 KB/s link busy with two uploads for dead
#: (found by a review). Over 60 s some NATs forget an idle connection in between.
MIN_HEARTBEAT_INTERVAL = 5.0
MAX_HEARTBEAT_INTERVAL = 60.0

#: Heartbeats missed before a side declares the connection dead.
HEARTBEAT_MISSES = 3
#: Seconds of silence after which a side declares the connection dead: a half-open
#: connection is noticed within 30 s at the default interval.
HEARTBEAT_TIMEOUT = HEARTBEAT_MISSES * HEARTBEAT_INTERVAL

#: Seconds one websocket send may wait for the peer to take its bytes, and
#: seconds the oldest frame queued for sending may wait: a peer that reads nothing
#: for that long is as dead as one that says nothing at the default heartbeat. Past
#: it the connection is aborted (a close handshake cannot complete with a peer that
#: does not read). It does not follow ``--heartbeat-interval``: it is how long a slow
#: link may take to drain the frames queued for it (``SEND_HIGH_WATER`` and the
#: socket buffers: 30 s is about 10 KB/s), not a matter of noticing a dead peer sooner.
#: Not part of the wire format.
SEND_TIMEOUT = HEARTBEAT_TIMEOUT

#: Bytes queued for sending on one connection above which DATA, OPEN and
#: RESPONSE wait (control frames never do): about one stream window, enough to
#: keep a fast link busy, and it bounds what a slow reader makes a side buffer.
SEND_HIGH_WATER = 4 * MAX_DATA_SIZE

#: Largest WebSocket message relayed on an upgraded stream: aiohttp's own
#: default limit, far above what browsers and webhook tools send, and it
#: bounds what one message makes either side assemble in memory.
MAX_WEBSOCKET_MESSAGE = 4 * 1024 * 1024
