// A herdsman worker in Node.js that exports its own metrics with prom-client
// (npm install prom-client). herdsman fetches them on every scrape of its
// `--metrics` endpoint and adds worker="ID" to each sample, so one scrape shows
// every worker, which PM2 cluster mode cannot do.
//
//     herdsman run --listen 127.0.0.1:8080 -w 4 --metrics 127.0.0.1:9464 \
//         -- node examples/node/metrics.js
//     curl -s 127.0.0.1:9464/metrics | grep app_requests
//
// The app serves on the inherited socket at fd 3 like server.js; the metrics go
// to the unix socket herdsman names in HERDSMAN_METRICS_SOCKET (one per worker
// process; herdsman removes it when the worker is gone).
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const client = require('prom-client');

const workerId = process.env.HERDSMAN_WORKER_ID ?? '?';
const register = new client.Registry();
client.collectDefaultMetrics({ register });
const requests = new client.Counter({
  name: 'app_requests_total', help: 'Requests served.', labelNames: ['code'], registers: [register],
});

const app = http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain; charset=utf-8' });
  res.end(`hello from worker ${workerId} (pid ${process.pid})\n`);
  requests.inc({ code: '200' });
});
app.listen({ fd: 3 });

const socketPath = process.env.HERDSMAN_METRICS_SOCKET;
if (socketPath) {
  const metrics = http.createServer(async (req, res) => {
    try {
      const body = await register.metrics();
      res.writeHead(200, { 'Content-Type': register.contentType });
      res.end(body);
    } catch (e) {
      res.writeHead(500);
      res.end(String(e));
    }
  });
  metrics.on('error', (e) => console.error(`metrics socket: ${e.message}`));
  metrics.listen(socketPath, () => {
    // herdsman must be able to connect even when a UMask made the socket 0750.
    fs.chmodSync(socketPath, 0o666);
  });
  // Never keep the process alive for metrics alone.
  metrics.unref();
}

function drain() {
  // close() (never shutdown()) the shared listener; exit once requests finish.
  app.close(() => process.exit(0));
  app.closeIdleConnections();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);
