// The relay inspector's page: a live list of the agent's exchanges (server-sent events),
// their details, replay and curl, and the server's history of the tunnel's events.
// Everything that comes from a request is put in the page as text (textContent), never
// as markup. The JSON API it talks to is described in the README.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error((data && data.message) || `${response.status} ${response.statusText}`);
  }
  return data;
}

function clock(iso) {
  const date = new Date(iso);
  return isNaN(date) ? "" : date.toLocaleTimeString([], { hour12: false });
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function statusClass(status) {
  if (status === null || status === undefined) return "running";
  if (typeof status !== "number") return "failed";
  return `s${String(status)[0]}xx`;
}

// -- agent status ------------------------------------------------------------------------

const state = { names: [], limits: {} };

async function loadStatus() {
  try {
    const status = await api("/api/status");
    state.names = status.names;
    state.limits = status.limits;
    const box = $("#agent-status");
    box.replaceChildren(
      el("span", { class: status.online ? "online" : "offline" }, status.online ? "online" : "not connected"),
      ...status.urls.map((url) => el("span", { class: "url" }, `${url} → ${status.target}`)),
    );
    fillNames();
  } catch (error) {
    $("#agent-status").textContent = `status unavailable: ${error.message}`;
  }
}

// -- the live list -----------------------------------------------------------------------

const live = { exchanges: new Map(), selected: null, drawing: false };

function upsert(summary) {
  const before = live.exchanges.get(summary.id);
  live.exchanges.set(summary.id, summary);
  if (live.exchanges.size > (state.limits.exchanges || 500)) {
    const oldest = Math.min(...live.exchanges.keys());
    live.exchanges.delete(oldest);
  }
  scheduleDraw();
  // The open exchange just ended: show its response.
  if (live.selected === summary.id && before && before.status === null && summary.status !== null) {
    showExchange(summary.id, false);
  }
}

function scheduleDraw() {
  if (live.drawing) return;
  live.drawing = true;
  requestAnimationFrame(() => {
    live.drawing = false;
    drawList();
  });
}

function matches(summary) {
  const method = $("#filter-method").value;
  if (method && summary.method !== method) return false;
  const wanted = $("#filter-status").value;
  if (wanted === "running" && summary.status !== null) return false;
  if (wanted === "failed" && !(typeof summary.status === "string" || summary.error)) return false;
  if (/^[2-5]$/.test(wanted) && !(typeof summary.status === "number" && String(summary.status)[0] === wanted)) return false;
  const text = $("#filter-text").value.trim().toLowerCase();
  if (!text) return true;
  const haystack = [summary.method, summary.target, summary.status, summary.event_id, summary.error, `#${summary.id}`]
    .map((part) => String(part ?? "").toLowerCase());
  return haystack.some((part) => part.includes(text));
}

function drawList() {
  const rows = [...live.exchanges.values()].sort((a, b) => b.id - a.id).filter(matches);
  const body = $("#exchanges tbody");
  body.replaceChildren(...rows.map((s) => el("tr", {
      "data-id": s.id,
      class: [statusClass(s.status), live.selected === s.id ? "selected" : ""].join(" "),
      onclick: () => showExchange(s.id, true),
    },
    el("td", { class: "time" }, clock(s.time)),
    el("td", { class: "method" }, s.method),
    el("td", { class: "path", title: s.target }, s.target, s.replay_of ? el("span", { class: "badge" }, `replay of #${s.replay_of}`) : null),
    el("td", { class: "status" }, s.status === null ? "…" : s.status),
    el("td", { class: "duration" }, s.duration_ms === null ? "" : `${Math.round(s.duration_ms)} ms`),
    el("td", { class: "size" }, size(s.request_size)),
    el("td", { class: "size" }, size(s.response_size)),
    el("td", { class: "event" }, s.event_id || ""),
    el("td", { class: "attempt" }, s.attempt ?? ""),
  )));
  $("#exchanges-empty").hidden = live.exchanges.size > 0;
  $("#live-count").textContent = `${rows.length} of ${live.exchanges.size}`;
}

async function loadExchanges() {
  // Merged into what the stream already brought: an exchange the stream told of while
  // this list was on its way is newer than the list's copy, or missing from it.
  const data = await api("/api/exchanges");
  for (const summary of data.exchanges) {
    const known = live.exchanges.get(summary.id);
    if (!known || (known.status === null && summary.status !== null)) live.exchanges.set(summary.id, summary);
  }
  drawList();
}

function connectStream() {
  const source = new EventSource("/api/exchanges/stream");
  source.addEventListener("open", async () => {
    // After a reconnect, the list may have missed exchanges: read it again.
    await loadExchanges().catch(() => {});
    $("#live-connection").textContent = "live";
    loadStatus();
  });
  source.addEventListener("error", () => {
    $("#live-connection").textContent = "reconnecting…";
  });
  source.addEventListener("exchange", (event) => upsert(JSON.parse(event.data)));
}

// -- body views ------------------------------------------------------------------------------

// Children of a JSON node drawn at once: more come with a click. A folded node draws its
// children when it is first opened, so a large document costs what is on screen.
const CHILDREN_AT_ONCE = 1000;
// Tags of a markup body drawn in colour: past them the rest is plain text.
const MAX_TAGS = 10000;

function jsonTree(node, depth = 0, key = null) {
  // A node is [type, payload] (bodies.py): numbers come as the literal the body wrote,
  // shown as they are, and an object's keys keep their order and repeats.
  const [type, payload] = node;
  const label = key === null ? [] : [el("span", { class: "key" }, JSON.stringify(key)), ": "];
  if (type === "object" || type === "array") {
    const isArray = type === "array";
    const entries = isArray ? payload.map((child) => [null, child]) : payload;
    const summary = el("summary", {}, ...label, isArray ? `[…] ${entries.length} items` : `{…} ${entries.length} keys`);
    const children = el("div", { class: "json-children" });
    const details = el("details", { class: "json-node", open: depth < 2 }, summary, children);
    let drawn = 0;
    const drawMore = () => {
      const next = entries.slice(drawn, drawn + CHILDREN_AT_ONCE);
      children.append(...next.map(([k, child]) => jsonTree(child, depth + 1, k)));
      drawn += next.length;
      const left = entries.length - drawn;
      if (left > 0) {
        const more = el("button", { type: "button", class: "json-more" }, `${left} more…`);
        more.addEventListener("click", () => { more.remove(); drawMore(); });
        children.append(more);
      }
    };
    if (depth < 2) drawMore();
    else details.addEventListener("toggle", () => { if (details.open && drawn === 0) drawMore(); });
    return details;
  }
  const shown = type === "number" ? payload : JSON.stringify(payload);
  return el("div", { class: "json-leaf" }, ...label, el("span", { class: `json-${type}` }, shown));
}

function markup(text) {
  // Tags, attribute names and values in their colours; everything stays text. A tag
  // ends at its ">" or before the next "<" (so a megabyte of "<" is read once).
  const pre = el("pre", { class: "code markup" });
  const tag = /<\/?[^<>]*>/g;
  let last = 0;
  let tags = 0;
  for (const match of text.matchAll(tag)) {
    if (++tags > MAX_TAGS) break;
    pre.append(text.slice(last, match.index));
    const span = el("span", { class: "tag" });
    const parts = match[0].split(/("[^"]*"|'[^']*')/);
    parts.forEach((part, i) => span.append(i % 2 ? el("span", { class: "attr-value" }, part) : part));
    pre.append(span);
    last = match.index + match[0].length;
  }
  pre.append(text.slice(last));
  return pre;
}

function bodyView(body, rawUrl) {
  const notes = [];
  if (body.truncated) notes.push(`only the first ${size(body.shown)} of ${size(body.size)} were kept`);
  if (body.dropped) notes.push("no longer kept (older bodies are let go first)");
  if (body.decoded) notes.push(`shown decoded from ${body.decoded}`);
  if (body.lossy) notes.push("bytes that are not UTF-8 are shown as �");
  if (body.kind === "hex" && body.shown < body.size) notes.push(`hex dump of the first ${size(body.shown)}`);
  const header = el("div", { class: "body-meta" },
    el("span", { class: "kind" }, body.kind), ` ${size(body.size)}`,
    notes.length ? el("span", { class: "muted" }, ` — ${notes.join("; ")}`) : null,
    rawUrl && body.size && !body.dropped ? el("a", { href: rawUrl, class: "raw", download: "" }, "raw bytes") : null);
  let view;
  switch (body.kind) {
    case "empty": view = el("p", { class: "muted" }, "(no body)"); break;
    case "dropped": view = el("p", { class: "muted" }, "(body no longer kept)"); break;
    case "json": view = el("div", { class: "json-tree" }, jsonTree(body.tree)); break;
    case "form": view = el("table", { class: "fields" }, el("tbody", {}, body.fields.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))); break;
    case "markup": view = markup(body.text); break;
    case "text": view = el("pre", { class: "code" }, body.text); break;
    case "image": view = rawUrl ? el("img", { src: rawUrl, alt: "body", class: "image" }) : el("p", {}, "(image)"); break;
    default: view = el("pre", { class: "code hex" }, (body.hex || []).join("\n"));
  }
  return el("div", { class: `body body-${body.kind}` }, header, view);
}

function headerTable(headers) {
  return el("table", { class: "headers" }, el("tbody", {}, headers.map(([name, value]) => el("tr", {}, el("th", {}, name), el("td", {}, value)))));
}

// -- one exchange ----------------------------------------------------------------------------

async function showExchange(id, scroll) {
  live.selected = id;
  const box = $("#detail");
  let data;
  try {
    data = await api(`/api/exchanges/${id}`);
  } catch (error) {
    box.replaceChildren(el("p", { class: "error" }, error.message));
    box.hidden = false;
    return;
  }
  if (live.selected !== id) return;
  const base = `/api/exchanges/${id}`;
  const request = data.request;
  const response = data.response;
  box.replaceChildren(
    el("div", { class: "detail-head" },
      el("h2", {}, `#${data.id} ${request.method} ${request.target}`),
      data.replay_of ? el("a", { href: "#", class: "replay-of", onclick: (e) => { e.preventDefault(); showExchange(data.replay_of, true); } }, `replay of #${data.replay_of}`) : null,
      el("div", { class: "actions" },
        el("button", { type: "button", id: "replay", disabled: !data.replayable, title: data.why_not_replayable || "", onclick: () => replay(id, {}) }, "Replay"),
        el("button", { type: "button", id: "edit-replay", onclick: () => editForm(data) }, "Edit and replay"),
        el("button", { type: "button", id: "copy-curl", disabled: !data.replayable, title: data.why_not_replayable || "", onclick: () => copyCurl(id) }, "Copy as curl"),
      ),
      el("div", { id: "action-note", class: "muted" }, data.why_not_replayable ? `Cannot replay as it was: ${data.why_not_replayable}` : ""),
    ),
    el("div", { id: "edit-box" }),
    el("pre", { id: "curl-command", class: "code", hidden: true }),
    el("section", { class: "timing" },
      el("h3", {}, "Timing"),
      el("p", {}, `received ${new Date(data.time).toLocaleString()}`,
        data.timing.response_after_ms !== null ? ` · response head after ${data.timing.response_after_ms} ms` : "",
        data.timing.duration_ms !== null ? ` · done after ${data.timing.duration_ms} ms` : " · running",
        data.event_id ? ` · event ${data.event_id}, attempt ${data.attempt ?? "?"}` : ""),
      data.error ? el("p", { class: "error" }, data.error) : null,
    ),
    el("section", { class: "request" },
      el("h3", {}, "Request"),
      el("p", { class: "request-line" }, `${request.method} ${request.target} HTTP/1.1`),
      headerTable(request.headers),
      bodyView(request.body, `${base}/request/body`),
    ),
    el("section", { class: "response" },
      el("h3", {}, "Response"),
      response
        ? [el("p", { class: "status-line" }, `HTTP/1.1 ${response.status}`), headerTable(response.headers), bodyView(response.body, `${base}/response/body`)]
        : el("p", { class: "muted" }, data.status === null ? "waiting for the local service…" : `no response from the local service (${data.status})`),
    ),
  );
  box.hidden = false;
  if (scroll) box.scrollIntoView({ block: "nearest" });
  drawList();
}

async function replay(id, edits) {
  const note = $("#action-note");
  try {
    const answer = await api(`/api/exchanges/${id}/replay`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(edits),
    });
    upsert(answer.exchange);
    showExchange(answer.exchange.id, true);
  } catch (error) {
    note.textContent = `Replay refused: ${error.message}`;
  }
}

async function editForm(data) {
  const box = $("#edit-box");
  let original = "";
  let binary = false;
  let gone = false;
  const response = await fetch(`/api/exchanges/${data.id}/request/body`);
  if (!response.ok) {
    gone = true;  // let go for the memory budget (410): its text is no body
  } else {
    try {
      original = new TextDecoder("utf-8", { fatal: true }).decode(await response.arrayBuffer());
    } catch {
      binary = true;
    }
  }
  // A body whose every line ends in CRLF (multipart, say) keeps them when edited: the
  // textarea gives LF only.
  const crlf = original.includes("\r\n") && !/(^|[^\r])\n/.test(original);
  const method = el("input", { id: "edit-method", value: data.request.method, size: 8 });
  const target = el("input", { id: "edit-target", value: data.request.target, size: 60 });
  const headers = el("textarea", { id: "edit-headers", rows: Math.min(16, data.request.headers.length + 2) });
  headers.value = data.request.headers.map(([n, v]) => `${n}: ${v}`).join("\n");
  const placeholder = gone ? "the body is no longer kept: type one to send it"
    : binary ? "binary body: sent unchanged unless you type a new one here" : "";
  const body = el("textarea", { id: "edit-body", rows: 10, placeholder });
  body.value = original;
  // A textarea's value turns CRLF and CR into LF: comparing it with the original would
  // see an edit where there is none and send the altered text. Only typing counts.
  let bodyEdited = false;
  body.addEventListener("input", () => { bodyEdited = true; });
  const send = () => {
    const edits = { method: method.value.trim(), target: target.value };
    edits.headers = headers.value.split("\n").filter((line) => line.trim()).map((line) => {
      const colon = line.indexOf(":");
      return colon < 0 ? [line.trim(), ""] : [line.slice(0, colon).trim(), line.slice(colon + 1).replace(/^[ \t]+/, "")];
    });
    if (bodyEdited && !(binary && body.value === "")) edits.body = crlf ? body.value.replace(/\n/g, "\r\n") : body.value;
    replay(data.id, edits);
  };
  box.replaceChildren(el("form", { class: "edit", onsubmit: (e) => { e.preventDefault(); send(); } },
    el("label", {}, "Method ", method), el("label", {}, "Path ", target),
    el("label", {}, "Headers (one per line, Name: value)", headers),
    el("label", {}, crlf ? "Body (its lines end in CRLF, and are sent so)" : "Body", body),
    el("button", { type: "submit", id: "edit-send" }, "Send to the local service"),
  ));
}

async function copyCurl(id) {
  const note = $("#action-note");
  try {
    const { command } = await api(`/api/exchanges/${id}/curl`);
    const pre = $("#curl-command");
    pre.textContent = command;
    pre.hidden = false;
    try {
      await navigator.clipboard.writeText(command);
      note.textContent = "Copied to the clipboard (the command runs in bash).";
    } catch {
      note.textContent = "Select the command below to copy it (the clipboard is not available).";
    }
  } catch (error) {
    note.textContent = `No curl command: ${error.message}`;
  }
}

// -- server history ----------------------------------------------------------------------

const history = { next: null, loading: false, loaded: false, selected: null };

function fillNames() {
  // This agent's tunnels, the first one chosen; "all" lists every event of the token's user.
  const select = $("#history-name");
  const chosen = select.value;
  const options = state.names.map((name) => el("option", { value: name }, name));
  select.replaceChildren(...options, el("option", { value: "" }, "all my tunnels"));
  select.value = state.names.includes(chosen) || (chosen === "" && select.dataset.touched) ? chosen : select.options[0].value;
}

function lastOutcome(event) {
  return event.deliveries.map((d) => d.last_status ?? d.last_error ?? d.dead_reason ?? "").filter(Boolean).join("; ");
}

async function loadHistory(reset) {
  if (history.loading || (!reset && history.loaded && !history.next)) return;
  history.loading = true;
  const query = new URLSearchParams();
  if ($("#history-name").value) query.set("name", $("#history-name").value);
  if ($("#history-status").value) query.set("status", $("#history-status").value);
  if (!reset && history.next) query.set("before", history.next);
  $("#history-note").textContent = "loading…";
  try {
    const data = await api(`/api/server/events?${query}`);
    const body = $("#events tbody");
    if (reset) body.replaceChildren();
    body.append(...data.events.map((event) => el("tr", {
        "data-id": event.id, class: `state-${event.status}`, onclick: () => showEvent(event.id),
      },
      el("td", { class: "time" }, clock(event.received_at)),
      el("td", { class: "event" }, event.id),
      el("td", { class: "method" }, event.method),
      el("td", { class: "path", title: event.target }, event.target),
      el("td", { class: "state" }, event.status),
      el("td", { class: "tries" }, Math.max(0, ...event.deliveries.map((d) => d.attempts))),
      el("td", { class: "last" }, lastOutcome(event)),
    )));
    history.next = data.next;
    history.loaded = true;
    $("#history-more").hidden = !data.next;
    $("#history-end").hidden = Boolean(data.next);
    $("#history-note").textContent = `${body.children.length} events`;
  } catch (error) {
    $("#history-note").textContent = error.message;
  } finally {
    history.loading = false;
  }
}

async function showEvent(id) {
  history.selected = id;
  const box = $("#event-detail");
  let event;
  try {
    event = await api(`/api/server/events/${encodeURIComponent(id)}`);
  } catch (error) {
    box.replaceChildren(el("p", { class: "error" }, error.message));
    box.hidden = false;
    return;
  }
  box.replaceChildren(
    el("div", { class: "detail-head" },
      el("h2", {}, `${event.id} ${event.method} ${event.target}`),
      el("div", { class: "actions" },
        el("button", { type: "button", id: "redeliver", onclick: () => redeliver(event.id) }, "Redeliver"),
      ),
      el("div", { id: "redeliver-note" }),
      el("div", { id: "event-note", class: "muted" }, `tunnel ${event.tunnel} · received ${new Date(event.received_at).toLocaleString()} · from ${event.client} · ${event.status}`),
    ),
    el("section", { class: "deliveries" },
      el("h3", {}, "Deliveries"),
      event.deliveries.map((d) => el("div", { class: "delivery" },
        el("p", {}, el("strong", {}, d.destination), ` ${d.status} after ${d.attempts} attempt(s)`,
          d.next_attempt_at ? ` · next ${new Date(d.next_attempt_at).toLocaleString()}` : "",
          d.dead_reason ? ` · dead: ${d.dead_reason}` : ""),
        el("ol", { class: "attempts" }, (d.history || []).map((a) => el("li", { value: a.attempt },
          `${new Date(a.at).toLocaleString()}: ${a.status ?? a.error ?? "-"}`))),
      )),
    ),
    el("section", { class: "request" },
      el("h3", {}, "Request"),
      headerTable(event.headers),
      bodyView(event.body_view, null),
    ),
  );
  box.hidden = false;
}

async function redeliver(id) {
  let said;
  try {
    const answer = await api(`/api/server/events/${encodeURIComponent(id)}/replay`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
    });
    said = `Redelivering ${answer.event} to ${answer.replayed.join(", ")}`;
    await loadHistory(true);
    await showEvent(id);  // its new state
  } catch (error) {
    said = `Redeliver refused: ${error.message}`;
  }
  $("#redeliver-note").textContent = said;
}

// -- tabs and start ------------------------------------------------------------------------

function showTab(name) {
  $("#live-view").hidden = name !== "live";
  $("#history-view").hidden = name !== "history";
  $("#tab-live").classList.toggle("active", name === "live");
  $("#tab-history").classList.toggle("active", name === "history");
  if (name === "history") loadHistory(true);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#tab-live").addEventListener("click", () => showTab("live"));
  $("#tab-history").addEventListener("click", () => showTab("history"));
  for (const id of ["#filter-text", "#filter-method", "#filter-status"]) $(id).addEventListener("input", drawList);
  $("#history-refresh").addEventListener("click", () => loadHistory(true));
  $("#history-name").addEventListener("change", () => {
    $("#history-name").dataset.touched = "yes";
    loadHistory(true);
  });
  $("#history-status").addEventListener("change", () => loadHistory(true));
  $("#history-load-more").addEventListener("click", () => loadHistory(false));
  // Scrolling to the end of the history loads the next page.
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting) && !$("#history-view").hidden) loadHistory(false);
  }).observe($("#history-more"));
  loadStatus();
  connectStream();
});
