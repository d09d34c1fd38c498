"""Forward one stream's request to the local target with the shared aiohttp client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from relay_protocol import RequestHead, ResponseHead
from relay_protocol.frames import RESET_TARGET_ERROR, RESET_TARGET_TIMEOUT, RESET_TARGET_UNREACHABLE
from relay_protocol.headers import strip_hop_by_hop
from relay_protocol.limits import MAX_CONCURRENT_STREAMS, MAX_DATA_SIZE

from .config import AgentConfig

# aiohttp adds these when the request lacks them; a tunnel must not.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Link(Protocol):
    """What the forwarder needs from the tunnel connection for one stream."""

    async def respond(self, head: ResponseHead, end: bool) -> None: ...
    async def send_body(self, chunk: bytes, end: bool = False) -> None: ...
    async def reset(self, code: int, reason: str) -> None: ...
    def body(self) -> AsyncIterator[bytes]: ...


class ForwardFailed(Exception):
    """The target failed; ``code`` is the RESET code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def client_session() -> aiohttp.ClientSession:
    """The one pooled client session of the agent."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONCURRENT_STREAMS, limit_per_host=0),
        auto_decompress=False,  # bodies pass byte for byte, Content-Encoding and all
        cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to the public clients, not to us
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        skip_auto_headers=_NO_AUTO_HEADERS,
    )


def _headers(head: RequestHead, config: AgentConfig) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in strip_hop_by_hop(head.headers):
        if name.lower() == b"host" and config.host_header != "preserve":
            continue
        headers.add(name.decode("latin-1"), value.decode("latin-1"))
    if config.host_header == "rewrite":
        headers["Host"] = config.target.authority
    elif config.host_header != "preserve":
        headers["Host"] = config.host_header
    return headers


async def forward(
    session: aiohttp.ClientSession, config: AgentConfig, head: RequestHead, has_body: bool, link: Link
) -> int:
    """Send ``head`` (and the body ``link`` yields) to the target, stream the answer
    back through ``link``. Returns the status. Raises ``ForwardFailed``."""
    url = URL(config.target.url_for(head.target), encoded=True)
    try:
        async with asyncio.timeout(config.target_timeout):
            async with session.request(
                head.method,
                url,
                headers=_headers(head, config),
                data=link.body() if has_body else None,
                allow_redirects=False,
                compress=False,
            ) as response:
                no_body = head.method == "HEAD" or response.status in (204, 304)
                await link.respond(
                    ResponseHead(response.status, strip_hop_by_hop(tuple(response.raw_headers))),
                    end=no_body,
                )
                if no_body:
                    return response.status
                async for chunk in response.content.iter_chunked(MAX_DATA_SIZE):
                    await link.send_body(chunk)
                await link.send_body(b"", end=True)
                return response.status
    except TimeoutError as exc:
        raise ForwardFailed(RESET_TARGET_TIMEOUT, f"no answer within {config.target_timeout:g}s") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ForwardFailed(RESET_TARGET_UNREACHABLE, f"cannot connect to {config.target.base_url}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ForwardFailed(RESET_TARGET_ERROR, f"{type(exc).__name__}: {exc}") from exc
