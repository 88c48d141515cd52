// Benchmark app: the same Node HTTP server for every contender.
//
//  * Under herdsman or the bench launcher (LISTEN_FDS set) it adopts the inherited listening
//    socket at fd 3; otherwise (PM2 cluster mode) it calls listen(PORT).
//  * Readiness: PM2 gets process.send('ready') (wait_ready: true); herdsman gets READY=1 on
//    $NOTIFY_SOCKET through `systemd-notify --ready` run as a child in the worker's process
//    group (Node core has no unix datagram sockets). The helper lingers for 2 s so herdsman
//    can still resolve its process group when the datagram is read.
//  * WARM_MS=N simulates an app that needs N ms of warm-up:
//      WARM_MODE=gate  (default) listen first, answer 503 while warming, then become ready;
//      WARM_MODE=defer warm first, then start accepting (listen) and become ready.
//  * GET /work?ms=N: a CPU-bound request: busy-loops N ms (default 2) on the event loop, then
//    answers like `/` (the body names the worker and its pid).
//  * $HERDSMAN_METRICS_SOCKET set (herdsman --metrics): serves GET /metrics there, a
//    Prometheus text page of ~200 samples (this worker's request counters), as an app with
//    prom-client would.
//  * SIGTERM/SIGINT: stop accepting, close (never shutdown) the listener, answer in-flight
//    requests with Connection: close, close idle keep-alive connections, exit when drained.
'use strict';

const http = require('node:http');
const { spawn } = require('node:child_process');

const WARM_MS = Number(process.env.WARM_MS || 0);
const WARM_MODE = process.env.WARM_MODE || 'gate';
const inherited = Number(process.env.LISTEN_FDS) >= 1;
const id = process.env.HERDSMAN_WORKER_ID ?? process.env.NODE_APP_INSTANCE ?? '?';
const body = Buffer.from(`hello from worker ${id} pid ${process.pid}\n`);
const warming = Buffer.from('warming up\n');

let warm = WARM_MS === 0;
let draining = false;

const server = http.createServer((req, res) => {
  if (!warm) {
    res.writeHead(503, { 'Content-Type': 'text/plain', 'Content-Length': warming.length });
    res.end(warming);
    return;
  }
  if (req.url.startsWith('/work')) {
    const m = /[?&]ms=([0-9.]+)/.exec(req.url);
    const end = process.hrtime.bigint() + BigInt(Math.round(Number(m ? m[1] : 2) * 1e6));
    while (process.hrtime.bigint() < end);
  }
  const headers = { 'Content-Type': 'text/plain', 'Content-Length': body.length };
  if (draining) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});
server.keepAliveTimeout = 30000;

let served = 0;
server.on('request', () => { served++; });
if (process.env.HERDSMAN_METRICS_SOCKET) {
  const page = () => {
    let out = '# HELP bench_requests_total Requests served, by route.\n# TYPE bench_requests_total counter\n';
    for (let i = 0; i < 199; i++) out += `bench_requests_total{route="/r${i}"} ${served + i}\n`;
    return out;
  };
  http.createServer((req, res) => {
    const text = page();
    res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4', 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
  }).listen(process.env.HERDSMAN_METRICS_SOCKET).unref();
}

function ready() {
  if (process.send) process.send('ready');
  if (process.env.NOTIFY_SOCKET) {
    const c = spawn('sh', ['-c', 'systemd-notify --ready; sleep 2'], { stdio: 'ignore' });
    c.unref();
  }
}

function listen(cb) {
  if (inherited) server.listen({ fd: 3 }, cb);
  else server.listen(Number(process.env.PORT || 8080), '127.0.0.1', cb);
}

if (WARM_MS > 0 && WARM_MODE === 'defer') {
  setTimeout(() => { warm = true; listen(ready); }, WARM_MS);
} else {
  listen(() => {
    if (WARM_MS > 0) setTimeout(() => { warm = true; ready(); }, WARM_MS);
    else ready();
  });
}

function drain() {
  if (draining) return;
  draining = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 10000).unref();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);
