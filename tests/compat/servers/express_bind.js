// A PM2-style Express 5 app, unchanged: it binds its own port with app.listen(PORT, cb), says
// it is ready with process.send('ready') (PM2's wait_ready; herdsman's --ready notify), drains
// on PM2's 'shutdown' message (herdsman's --stop-signal message) and tells its instances apart
// with NODE_APP_INSTANCE.
'use strict';
const express = require('express');
const info = require('./compat_info.js');

const PORT = process.env.PORT || process.argv[2] || 8000;
const app = express();
app.get('/', (req, res) => {
  const body = JSON.parse(info('express-bind'));
  body.worker_id = Number(process.env.NODE_APP_INSTANCE ?? -1); // PM2's instance number
  res.type('application/json').send(JSON.stringify(body));
});

const server = app.listen(PORT, (err) => {
  if (err) throw err;
  info.markLoaded(); // suite only
  if (process.send) process.send('ready');
});

process.on('message', (msg) => {
  if (msg === 'shutdown') {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  }
});
