"""What relay's two aiohttp servers share (the relay server's public port and the agent's
inspector both face strangers): connection caps and head timeouts (``guard``), and a
quiet log of the malformed requests their HTTP parser refuses (``malformed``); and the
two commands' shared option types (``options``).

``relay_server`` and ``relay_agent`` may import it; it imports neither, nor anything of
``relay_protocol``'s wire protocol.
"""
