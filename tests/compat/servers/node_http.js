// Node `http` recipe (docs/servers.md): serve on the inherited socket at fd 3.
'use strict';
const http = require('node:http');
const { execFileSync } = require('node:child_process');
const info = require('./compat_info.js');

const server = http.createServer((req, res) => {
  res.setHeader('Content-Type', 'application/json');
  res.end(info('node-http'));
});

server.listen({ fd: 3 }, () => {
  info.markLoaded();
  // --ready notify: systemd-notify runs in our process group, which herdsman accepts.
  if (process.env.NOTIFY_SOCKET) execFileSync('systemd-notify', ['--ready']);
});

// Drain on the stop signal: stop accepting (close() our copy of fd 3), finish, exit.
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
