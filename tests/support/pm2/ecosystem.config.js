// A PM2 ecosystem file with two cluster apps and env_production, for the `--from-pm2` tests
// (tests/pm2.rs) and the e2e `pm2` scenario. `api` uses only keys herdsman maps; `web` also
// has keys it does not (each reported on one line).
module.exports = {
  apps: [
    {
      name: 'api',
      script: 'app.js',
      args: '--role api',
      instances: 2,
      exec_mode: 'cluster',
      wait_ready: true,
      listen_timeout: 60000,
      kill_timeout: 5000,
      max_memory_restart: '300M',
      shutdown_with_message: true,
      env: { PORT: 8931, GREETING: 'hello from development', SHARED: 'base' },
      env_production: { GREETING: 'hello from production', NODE_ENV: 'production' },
    },
    {
      name: 'web',
      script: 'app.js',
      args: ['--role', 'web'],
      instances: '3',
      exec_mode: 'cluster_mode',
      wait_ready: true,
      env: { PORT: '8932', GREETING: 'web in development' },
      env_production: { GREETING: 'web in production', NODE_ENV: 'production' },
      watch: true,
      ignore_watch: ['node_modules'],
      cron_restart: '0 3 * * *',
      max_restarts: 10,
      autorestart: true,
      out_file: '/var/log/web.out.log',
      merge_logs: true,
    },
  ],
};
