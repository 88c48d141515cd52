// A PM2-style Node app for the IPC tests: serves on the inherited socket (fd 3), says
// `process.send('ready')` once it listens, and on PM2's 'shutdown' message closes its server
// and exits 0. Each response reports what the app sees (JSON).
'use strict';
const http = require('http');
const fs = require('fs');

const info = () => ({
  pid: process.pid,
  instance: process.env.NODE_APP_INSTANCE ?? null,
  worker_id: Number(process.env.HERDSMAN_WORKER_ID ?? -1),
  generation: Number(process.env.HERDSMAN_GENERATION ?? -1),
  channel_fd: process.channel ? String(process.channel.fd) : null,
  connected: Boolean(process.connected),
  listen_fds: process.env.LISTEN_FDS ?? null,
  open_fds: fs.readdirSync('/proc/self/fd').map(Number).sort((a, b) => a - b),
});

const server = http.createServer((req, res) => {
  const body = JSON.stringify(info());
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

server.listen({ fd: 3 }, () => {
  if (process.env.APP_NO_READY) return;
  if (!process.send) return;
  // APP_DISCONNECT: close the channel right after saying ready (process.disconnect()).
  process.send('ready', () => process.env.APP_DISCONNECT && process.disconnect());
});

let told = 'none';
process.on('message', (m) => {
  if (m === 'shutdown') {
    told = 'shutdown';
    server.close(() => process.exit(0));
  }
});
// APP_EXIT_MARK: at exit, write "<what the app was told> <exit code>" to MARK.<pid>.
process.on('exit', (code) => {
  if (process.env.APP_EXIT_MARK) fs.writeFileSync(`${process.env.APP_EXIT_MARK}.${process.pid}`, `${told} ${code}`);
});
// APP_DISCONNECT_MARK: when the channel closes, write "disconnect" to MARK.<pid>.
process.on('disconnect', () => {
  if (process.env.APP_DISCONNECT_MARK) fs.writeFileSync(`${process.env.APP_DISCONNECT_MARK}.${process.pid}`, 'disconnect');
});
