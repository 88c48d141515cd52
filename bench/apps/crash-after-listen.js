// bench/canary.py's app: serves on PORT; when BROKEN_FILE exists at start, it exits 4
// CRASH_MS after it started listening (a build that dies after it looked ready).
const fs = require('fs');
const server = require('http').createServer((q, r) => r.end('ok')).listen(+process.env.PORT || 18000);
if (process.env.BROKEN_FILE && fs.existsSync(process.env.BROKEN_FILE)) {
  setTimeout(() => process.exit(4), +process.env.CRASH_MS || 300);
}
process.on('SIGTERM', () => server.close(() => process.exit(0)));
