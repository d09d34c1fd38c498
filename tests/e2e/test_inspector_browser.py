"""Issue 11: the inspector's page in a real headless Chromium, on real processes.

Debian's chromium (``/usr/bin/chromium``, installed by .ci/run) is driven by Playwright;
no browser is ever downloaded. One browser serves the module; each test opens its own
page on an agent's inspector, sends webhooks through the relay with plain HTTP, and
checks what the page shows and what the local service receives. Each view is saved as
a screenshot under the test's tmp dir.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .framework import Relay, Seen, Tunnel, in_ci, send, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Milliseconds Playwright waits for anything the page should show: far above what it
#: needs, so that a loaded machine does not fail the test.
PAGE_TIMEOUT = 20_000
WAIT = 20.0


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if in_ci():
            pytest.fail("chromium is not installed, and CI must run these tests (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs these tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def alice(module_relay: Relay) -> Tunnel:
    """A server, a local service and an agent serving its inspector, shared by the module."""
    return module_relay.tunnel()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """Opens an inspector's page (waiting until its live stream is connected)."""
    from playwright.sync_api import expect

    contexts = []

    def open_(url: str) -> Any:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.errors = errors
        page.goto(url)
        # A locator, not wait_for_function: the page's policy forbids the eval() it uses.
        expect(page.locator("#live-connection")).to_have_text("live", timeout=PAGE_TIMEOUT)
        return page

    yield open_
    for context in contexts:
        context.close()


def _unique(prefix: str) -> str:
    return f"/{prefix}-{uuid.uuid4().hex[:8]}"


def _post(
    tunnel: Tunnel, path: str, body: bytes, content_type: str = "application/json", **headers: str
) -> str:
    """A webhook through the relay, answered by the local service; its event id."""
    reply = send(tunnel, "POST", path, headers=[("Content-Type", content_type), *headers.items()], body=body)
    assert reply.status == 200, reply
    seen = _seen(tunnel, path, 1)[0]
    event_id = seen.header("X-Relay-Event-Id")
    assert event_id is not None
    return event_id


def _seen(tunnel: Tunnel, path: str, count: int) -> list[Seen]:
    return wait_until(
        lambda: (found := tunnel.target.seen(path)) and len(found) >= count and found,
        WAIT,
        f"{count} requests to {path} at the local service",
    )


def _row(page: Any, path: str) -> Any:
    """The first row of the live list for ``path`` (the newest exchange to it)."""
    row = page.locator("#exchanges tbody tr", has=page.locator("td.path", has_text=path)).first
    row.wait_for()
    return row


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0


def test_webhooks_appear_in_the_list_as_they_arrive(alice: Tunnel, open_page: Any, tmp_path: Path) -> None:
    page = open_page(alice.agent.inspector())
    page.evaluate("window.sameDocument = true")
    paths = [_unique("arrive") for _ in range(3)]
    event_ids = [_post(alice, path, json.dumps({"n": i}).encode()) for i, path in enumerate(paths)]
    for path, event_id in zip(paths, event_ids, strict=True):
        row = _row(page, path)
        assert row.locator("td.method").inner_text() == "POST"
        assert row.locator("td.event").inner_text() == event_id
        assert row.locator("td.attempt").inner_text() == "1"
        wait_until(lambda row=row: row.locator("td.status").inner_text() == "200", WAIT, "the status")
    paths_shown = page.locator("#exchanges tbody td.path").all_inner_texts()
    positions = [next(i for i, shown in enumerate(paths_shown) if shown.startswith(p)) for p in paths]
    assert positions == sorted(positions, reverse=True)  # newest first
    assert page.evaluate("window.sameDocument") is True  # pushed, never reloaded
    page.fill("#filter-text", paths[1])
    wait_until(lambda: page.locator("#exchanges tbody tr").count() == 1, WAIT, "the filter")
    page.select_option("#filter-method", "GET")
    wait_until(lambda: page.locator("#exchanges tbody tr").count() == 0, WAIT, "the method filter")
    page.fill("#filter-text", "")
    page.select_option("#filter-method", "")
    # Until an exchange is opened, the list takes the whole width.
    share = "document.querySelector('#exchanges').closest('.list').offsetWidth"
    share += " / document.querySelector('#exchanges').closest('.split').offsetWidth"
    assert page.evaluate(share) == 1
    _shot(page, tmp_path, "live-list")
    assert page.errors == []


def test_a_nested_json_value_is_found_in_the_tree(alice: Tunnel, open_page: Any, tmp_path: Path) -> None:
    page = open_page(alice.agent.inspector())
    path = _unique("tree")
    city = f"Lisbon-{uuid.uuid4().hex[:6]}"
    document = {"order": {"id": 42, "customer": {"name": "Ana", "address": {"city": city, "zip": "1100"}}}}
    _post(alice, path, json.dumps(document).encode())
    _row(page, path).click()
    tree = page.locator(".request .json-tree")
    tree.wait_for()
    leaf = tree.locator(".json-leaf", has_text=city)
    assert leaf.count() == 0  # deep nodes start folded, and are drawn when opened
    tree.locator("summary", has_text='"customer"').click()
    tree.locator("summary", has_text='"address"').click()
    leaf.wait_for(state="visible")
    assert leaf.inner_text() == f'"city": "{city}"'
    assert page.locator(".request .request-line").inner_text() == f"POST {path} HTTP/1.1"
    headers = page.locator(".request table.headers").inner_text()
    assert "X-Relay-Event-Id" in headers and "X-Relay-Attempt" in headers
    assert page.locator(".response .status-line").inner_text() == "HTTP/1.1 200"
    _shot(page, tmp_path, "detail-json-tree")
    assert page.errors == []


def test_a_large_array_is_drawn_a_thousand_items_at_a_time(alice: Tunnel, open_page: Any) -> None:
    page = open_page(alice.agent.inspector())
    path = _unique("large")
    _post(alice, path, json.dumps({"items": list(range(2500))}).encode())
    _row(page, path).click()
    tree = page.locator(".request .json-tree")
    tree.wait_for()
    items = tree.locator(".json-node .json-node > .json-children > .json-leaf")
    assert items.count() == 1000
    tree.locator(".json-more", has_text="1500 more").click()
    tree.locator(".json-more", has_text="500 more").click()
    wait_until(lambda: items.count() == 2500, WAIT, "every item drawn")
    assert items.last.inner_text() == "2499"
    assert tree.locator(".json-more").count() == 0
    assert page.errors == []


def test_markup_with_a_lone_angle_bracket_keeps_the_text(alice: Tunnel, open_page: Any) -> None:
    page = open_page(alice.agent.inspector())
    path = _unique("markup")
    body = b'<p class="a">one</p> 1 < 2 <b>two</b> <' + b"<" * 50_000
    _post(alice, path, body, "text/html")
    _row(page, path).click()
    shown = page.locator(".request pre.markup")
    shown.wait_for()
    assert shown.locator(".tag").all_inner_texts() == ['<p class="a">', "</p>", "<b>", "</b>"]
    assert shown.inner_text() == body.decode()
    assert page.errors == []


def test_a_replay_reaches_the_local_service_again(alice: Tunnel, open_page: Any, tmp_path: Path) -> None:
    page = open_page(alice.agent.inspector())
    path = _unique("replay")
    body = b'{"replay": "me", "bytes": "caf\\u00e9"}'
    event_id = _post(alice, path, body)
    _row(page, path).click()
    page.click("#replay")
    first, again = _seen(alice, path, 2)
    assert again.body == first.body == body
    assert again.header("X-Relay-Event-Id") == event_id  # as it was, headers and all
    assert again.method == "POST" and again.raw_path == path
    page.locator("#exchanges tbody .badge", has_text="replay of #").first.wait_for()
    page.locator("#detail .replay-of").wait_for()
    _shot(page, tmp_path, "replayed")
    assert page.errors == []


def test_an_edited_replay_sends_the_new_body(alice: Tunnel, open_page: Any, tmp_path: Path) -> None:
    page = open_page(alice.agent.inspector())
    path = _unique("edit")
    _post(alice, path, b'{"amount": 10}')
    _row(page, path).click()
    page.click("#edit-replay")
    page.locator("#edit-body").wait_for()
    assert page.input_value("#edit-body") == '{"amount": 10}'
    page.fill("#edit-body", '{"amount": 99999, "edited": true}')
    page.fill("#edit-target", path + "?edited=1")
    _shot(page, tmp_path, "edit-form")
    page.click("#edit-send")
    edited = _seen(alice, path + "?edited=1", 1)[0]
    assert edited.body == b'{"amount": 99999, "edited": true}'
    assert edited.header("Content-Length") == str(len(edited.body))
    _row(page, path + "?edited=1")
    _shot(page, tmp_path, "edited-replay")
    assert page.errors == []


def _edit_multipart(tunnel: Tunnel, page: Any, prefix: str, body: bytes) -> str:
    """A multipart webhook through ``tunnel``, opened in the page's edit form; its path."""
    path = _unique(prefix)
    _post(tunnel, path, body, "multipart/form-data; boundary=b")
    _row(page, path).click()
    page.click("#edit-replay")
    page.locator("#edit-body").wait_for()
    return path


def test_an_edited_replay_with_the_body_untouched_sends_the_original_bytes(
    alice: Tunnel, open_page: Any, tmp_path: Path
) -> None:
    # A textarea turns CRLF into LF: a body nobody typed in must not be sent from it.
    page = open_page(alice.agent.inspector())
    body = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\none\rtwo\r\n--b--\r\n'
    path = _edit_multipart(alice, page, "crlf", body)
    page.fill("#edit-target", path + "?untouched=1")
    page.click("#edit-send")
    edited = _seen(alice, path + "?untouched=1", 1)[0]
    assert edited.body == body
    assert page.errors == []


def test_an_edited_body_keeps_its_crlf_line_ends(alice: Tunnel, open_page: Any) -> None:
    # Found by a newcomer: once typed in, a multipart body went out with LF only.
    page = open_page(alice.agent.inspector())
    body = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\none\r\n--b--\r\n'
    path = _edit_multipart(alice, page, "crlf-edit", body)
    page.focus("#edit-body")
    page.keyboard.press("Control+End")
    page.keyboard.type("x")
    page.keyboard.press("Backspace")
    page.fill("#edit-target", path + "?typed=1")
    page.click("#edit-send")
    assert _seen(alice, path + "?typed=1", 1)[0].body == body
    assert page.errors == []


def test_copy_as_curl_sends_the_same_bytes(alice: Tunnel, open_page: Any, tmp_path: Path) -> None:
    page = open_page(alice.agent.inspector())
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    path = _unique("curl") + "?q=a%20b&x=[1]"
    body = bytes(range(256)) + b"\x00 binary \xff"
    send(
        alice,
        "POST",
        path,
        headers=[("Content-Type", "application/octet-stream"), ("X-Sig", "t=1,v1=ab")],
        body=body,
    )
    original = _seen(alice, path, 1)[0]
    _row(page, path.split("?")[0]).click()
    assert page.locator(".request .body-meta .kind").inner_text() == "hex"
    page.click("#copy-curl")
    command = page.locator("#curl-command")
    command.wait_for(state="visible")
    text = command.inner_text()
    assert "--data-binary @-" in text
    assert page.evaluate("navigator.clipboard.readText()") == text
    _shot(page, tmp_path, "copy-as-curl")
    result = subprocess.run(["bash", "-c", text], capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    copied = _seen(alice, path, 2)[1]
    assert (copied.method, copied.raw_path, copied.body) == (
        original.method,
        original.raw_path,
        original.body,
    )
    assert copied.headers == original.headers  # every header, in order, byte for byte
    assert page.errors == []


def test_an_event_queued_while_the_agent_was_down_is_in_the_server_history(
    alice: Tunnel, module_relay: Relay, open_page: Any, tmp_path: Path
) -> None:
    server, target = alice.server, alice.target
    name = f"alice-{uuid.uuid4().hex[:6]}"
    first = module_relay.agent(server, alice.token, target.forward, name)
    first.process.send(15)  # SIGTERM: the agent goes away
    assert first.process.wait() == 0
    down = Tunnel(server, target, first, name, alice.token)
    path = _unique("late")
    reply = send(down, "POST", path, headers=[("Content-Type", "application/json")], body=b'{"late": true}')
    assert reply.status == 202
    event_id = reply.header("X-Relay-Event")
    assert event_id is not None

    back = module_relay.agent(server, alice.token, target.forward, name)
    _seen(alice, path, 1)  # delivered once the agent is back
    page = open_page(back.inspector())
    page.click("#tab-history")
    row = page.locator("#events tbody tr", has=page.locator("td.event", has_text=event_id))
    row.wait_for()
    assert page.input_value("#history-name") == name

    def delivered() -> bool:
        # The server records the outcome just after the delivery: the list may predate it.
        if row.locator("td.state").inner_text() == "delivered":
            return True
        page.click("#history-refresh")
        row.wait_for()
        return False

    wait_until(delivered, WAIT, "the event delivered, in the history", interval=0.2)
    row.click()
    detail = page.locator("#event-detail")
    detail.locator("ol.attempts li").first.wait_for()
    assert "200" in detail.locator("ol.attempts li").first.inner_text()
    assert detail.locator(".json-tree").is_visible()
    _shot(page, tmp_path, "server-history")
    page.click("#redeliver")
    redelivered = _seen(alice, path, 2)[1]
    assert redelivered.header("X-Relay-Event-Id") == event_id  # through the server: the same event
    assert redelivered.header("X-Relay-Attempt") == "2"
    page.locator("#redeliver-note", has_text=f"Redelivering {event_id} to agent:*").wait_for()
    _shot(page, tmp_path, "server-history-redelivered")
    assert page.errors == []
