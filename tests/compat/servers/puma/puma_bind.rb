# Puma binding its own port (docs/servers.md): puma -C puma_bind.rb -b tcp://127.0.0.1:PORT config.ru
# No bind_to_activated_sockets: Puma binds the -b address itself and herdsman's seccomp filter
# hands it herdsman's socket. The rest is the drain configuration of puma.rb.
queue_requests false
raise_exception_on_sigterm false
threads 4, 4
environment 'production'
