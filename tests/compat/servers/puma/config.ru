# Puma recipe (docs/servers.md): a Rack app; Puma serves it on the inherited socket at fd 3.
require 'json'

info = JSON.generate(
  server: 'puma',
  pid: Process.pid,
  worker_id: ENV.fetch('HERDSMAN_WORKER_ID', '-1').to_i,
  generation: ENV.fetch('HERDSMAN_GENERATION', '-1').to_i
)
if (dir = ENV['COMPAT_MARK_DIR']) # suite only
  File.write(File.join(dir, "loaded-#{ENV['HERDSMAN_GENERATION']}-#{ENV['HERDSMAN_WORKER_ID']}"), '')
end

run ->(_env) { [200, { 'content-type' => 'application/json' }, [info]] }
