"""relay-agent: connects to a relay server and forwards its requests to a local service.

It imports ``relay_protocol``, never ``relay_server``.
"""
