// The bench's local service (node, one process, no dependencies): see bench/processes.py Target.
//   node bench/target.js PORT
"use strict";
const http = require("http");

const port = Number(process.argv[2]);
const SMALL = Buffer.from('{"ok":true}');
const CHUNK = Buffer.alloc(64 * 1024, 120); // "xxxx...": 64 KiB

function download(res, total) {
  res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": String(total) });
  let left = total;
  function more() {
    while (left > 0) {
      const piece = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left);
      left -= piece.length;
      if (!res.write(piece)) {
        res.once("drain", more); // the client is slower: wait, never buffer the whole body
        return;
      }
    }
    res.end();
  }
  more();
}

// Distinct X-Relay-Event-Id seen: the bench checks that every webhook a queue tunnel
// accepted reached the app (a retried one counts once).
const events = new Set();

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  const event = req.headers["x-relay-event-id"];
  if (event !== undefined) events.add(event);
  if (req.method === "GET" && url.pathname === "/counts") {
    const body = Buffer.from(JSON.stringify({ events: events.size }));
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": String(body.length) });
    res.end(body);
    return;
  }
  if (req.method === "GET" && url.pathname === "/healthz") {
    res.writeHead(200, { "Content-Type": "text/plain", "Content-Length": "2" });
    res.end("ok");
    return;
  }
  if (req.method === "GET" && url.pathname === "/download") {
    req.resume();
    download(res, Number(url.searchParams.get("bytes") || "0"));
    return;
  }
  let length = 0;
  req.on("data", (chunk) => {
    length += chunk.length; // read and discarded
  });
  req.on("end", () => {
    const body = url.pathname === "/upload" ? Buffer.from(JSON.stringify({ length })) : SMALL;
    res.writeHead(200, { "Content-Type": "application/json", "Content-Length": String(body.length) });
    res.end(body);
  });
});
server.keepAliveTimeout = 75000;
server.headersTimeout = 80000;
server.requestTimeout = 0;
server.listen(port, "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
