// Minimal herdsman worker in Node.js (core modules only).
//
// herdsman hands every worker the same listening socket at fd 3 (systemd
// socket-activation protocol: LISTEN_FDS / LISTEN_PID), so all workers accept
// from one kernel queue and no worker ever binds a port itself.
//
// Readiness: Node core has no unix datagram sockets, so this worker cannot
// send READY=1 to NOTIFY_SOCKET. Run it with herdsman's default readiness
// (`alive:1s`: ready once the process has stayed up for a second):
//
//     herdsman run --listen 127.0.0.1:8080 -w 4 -- node examples/node/server.js
'use strict';

const http = require('node:http');

const workerId = process.env.HERDSMAN_WORKER_ID ?? '?';
const generation = process.env.HERDSMAN_GENERATION ?? '?';

if (!(Number(process.env.LISTEN_FDS) >= 1)) {
  console.error('error: LISTEN_FDS is not set: run me under herdsman, which ' +
    'passes the listening socket as fd 3');
  process.exit(2);
}

let draining = false;

const server = http.createServer((req, res) => {
  const body = `hello from worker ${workerId} (pid ${process.pid}, generation ${generation})\n`;
  const headers = {
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
  };
  // While draining, ask keep-alive clients to reconnect (to another worker).
  if (draining) headers.Connection = 'close';
  res.writeHead(200, headers);
  res.end(body);
});

// Adopt the inherited listening socket instead of binding a port.
server.listen({ fd: 3 }, () => {
  console.log(`worker ${workerId} (pid ${process.pid}) serving on fd 3`);
});

function drain() {
  if (draining) return;
  draining = true;
  // server.close() stops accepting and close()s (never shutdown()s) our
  // handle on the shared listener; its callback fires once every connection
  // has finished. Idle keep-alive connections are closed right away.
  server.close(() => {
    console.log(`worker ${workerId} drained`);
    process.exit(0);
  });
  server.closeIdleConnections();
}

process.on('SIGTERM', drain);
process.on('SIGINT', drain);
