// A PM2 app as PM2 users write them, for the `--from-pm2` tests (tests/pm2.rs, the e2e `pm2`
// scenario): listens on PORT (or, under herdsman, on the inherited socket at fd 3), says
// `process.send('ready')` once listening (once READY_FILE exists, when that is set), stops on
// PM2's 'shutdown' message (EXIT_MARK: each process writes what it was told and its exit code). Each answer is JSON: pid, worker id, argv and the environment.
'use strict';
const http = require('http');
const fs = require('fs');

const server = http.createServer((req, res) => {
  const body = JSON.stringify({
    pid: process.pid,
    worker_id: Number(process.env.HERDSMAN_WORKER_ID ?? -1),
    argv: process.argv.slice(2),
    cwd: process.cwd(),
    env: process.env,
  });
  res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});

const ready = () => process.send && process.send('ready');
server.listen(process.env.LISTEN_FDS ? { fd: 3 } : Number(process.env.PORT), () => {
  const gate = process.env.READY_FILE;
  if (!gate) return ready();
  const t = setInterval(() => {
    if (fs.existsSync(gate)) {
      clearInterval(t);
      ready();
    }
  }, 20);
});

let told = 'none';
process.on('message', (m) => {
  if (m === 'shutdown') {
    told = 'shutdown';
    server.close(() => process.exit(0));
  }
});
// EXIT_MARK: at exit, write "<what the app was told> <exit code>" to EXIT_MARK.<pid>.
process.on('exit', (code) => {
  if (process.env.EXIT_MARK) fs.writeFileSync(`${process.env.EXIT_MARK}.${process.pid}`, `${told} ${code}`);
});
