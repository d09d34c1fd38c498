"""relay-server: the public side of relay (aiohttp).

Public ingress on per-user URLs, the agent websocket endpoint, tokens and the
embedded SQLite store. It imports ``relay_protocol``, never ``relay_agent``.
"""
