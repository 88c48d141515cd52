// What every compatibility-suite app answers, and the "app loaded" marker (suite only).
'use strict';
const fs = require('node:fs');
const path = require('node:path');

function info(server) {
  return JSON.stringify({
    server,
    pid: process.pid,
    worker_id: Number(process.env.HERDSMAN_WORKER_ID ?? -1),
    generation: Number(process.env.HERDSMAN_GENERATION ?? -1),
  });
}

info.markLoaded = () => {
  const dir = process.env.COMPAT_MARK_DIR;
  if (dir) {
    const { HERDSMAN_GENERATION: gen, HERDSMAN_WORKER_ID: id } = process.env;
    fs.writeFileSync(path.join(dir, `loaded-${gen}-${id}`), '');
  }
};

module.exports = info;
