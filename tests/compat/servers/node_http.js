// Node `http` recipe (docs/servers.md): serve on the inherited socket at fd 3.
'use strict';
const http = require('node:http');
const info = require('./compat_info.js');

const server = http.createServer((req, res) => {
  res.setHeader('Content-Type', 'application/json');
  res.end(info('node-http'));
});

server.listen({ fd: 3 }, () => {
  info.markLoaded();
  // --ready notify: PM2's wait_ready, over the IPC channel herdsman gives Node workers.
  if (process.send) process.send('ready');
});

// Drain on the stop signal: stop accepting (close() our copy of fd 3), finish, exit.
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
