// Express recipe (docs/servers.md): app.listen({fd: 3}) instead of app.listen(8080).
'use strict';
const express = require('express');
const info = require('./compat_info.js');

const app = express();
app.get('/', (req, res) => res.type('application/json').send(info('express')));

const server = app.listen({ fd: 3 }, (err) => {
  if (err) throw err;
  info.markLoaded();
  if (process.send) process.send('ready');
});

process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
});
