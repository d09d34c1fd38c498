"""The agent's inspector: every request forwarded to the local service, as it happens,
on a page served by the agent (``http://127.0.0.1:4040`` by default, like ngrok's).

- ``recorder``: the bounded record of exchanges, filled on the forwarding path.
- ``app``: the web server (page, assets, JSON API) and where it listens (``address``);
  ``exchanges`` and ``history`` are its API calls, ``state`` what they share.
- ``views``, ``bodies``, ``curl``: the JSON of an exchange, how a body is shown, and
  "copy as curl"; ``replay``: sending an exchange again, as it was or edited.
- ``static/``: the page itself (HTML, script, style), shipped in the package.
"""
