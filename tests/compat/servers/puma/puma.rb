# Puma under herdsman (docs/servers.md): puma -C puma.rb config.ru
# Serve only on the sockets herdsman (or systemd) passes at fd 3, ...; without this Puma also
# binds its default 0.0.0.0:9292.
bind_to_activated_sockets 'only'
# Hand each accepted connection straight to a thread, which reads its request. With the default
# (true), a connection accepted a moment before the stop signal waits in Puma's reactor for its
# request, and the graceful stop closes it unanswered.
queue_requests false
# Exit 0 after the graceful stop on SIGTERM instead of re-raising SIGTERM (which looks to
# herdsman like an app without a handler).
raise_exception_on_sigterm false
threads 4, 4
environment 'production'
