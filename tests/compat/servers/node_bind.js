// The seed's app, as PM2 users write it: binds its own port, no stop-signal handler, no
// readiness message. Under herdsman it runs unchanged (docs/servers.md, "Apps that bind their
// own port"). The port comes from $PORT or the first argument, as it would under PM2.
'use strict';
const http = require('http');
const info = require('./compat_info.js');

const PORT = process.env.PORT || process.argv[2] || 8000;
info.markLoaded(); // suite only: the app is loaded before it binds
http.createServer((req, res) => {
  res.setHeader('Content-Type', 'application/json');
  res.end(info('node-bind'));
}).listen(PORT);
