#!/usr/bin/env python3
"""Run an ASGI app (FastAPI, Starlette, ...) with uvicorn on herdsman's socket at fd 3.

    herdsman run --listen :8080 -w 4 --ready notify -- python3 examples/uvicorn_fd3.py main:app

Why not `uvicorn --fd 3`: uvicorn wraps the fd as AF_UNIX whatever it really is, so asyncio
never sets TCP_NODELAY on accepted TCP connections and every keep-alive response waits for the
client's delayed ACK (~40 ms): about 25 requests/s per connection instead of thousands. This
launcher takes fd 3 with its real family, and sends READY=1 to $NOTIFY_SOCKET once uvicorn
serves (after the app's lifespan startup), so `--ready notify` is truthful.

Stop signal: SIGTERM (the default): the launcher stops accepting (close()s its copy of the
socket), waits for connections it just accepted to send their request, then uvicorn finishes
in-flight requests (bounded by --timeout-graceful-shutdown) and the process exits 0 (plain
uvicorn re-raises the signal and dies of it).
"""

import argparse
import asyncio
import os
import socket
import sys

import uvicorn

# How long a connection accepted just before the stop signal may take to send its request.
NEW_CONNECTION_GRACE = 2.0


def notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.send(state.encode())


class Server(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if not self.should_exit:  # lifespan startup failed: no READY=1
            notify("READY=1")

    async def shutdown(self, sockets=None):
        # uvicorn closes every connection that has not sent a request yet, including one it
        # accepted a moment ago whose request is on its way: that client sees the connection
        # close with no answer. Stop accepting first, then let such connections (at most
        # NEW_CONNECTION_GRACE seconds) deliver their request, which uvicorn then finishes.
        for server in self.servers:
            server.close()  # close()s our copy of fd 3; the other workers keep accepting
        loop = asyncio.get_running_loop()
        deadline = loop.time() + NEW_CONNECTION_GRACE
        while loop.time() < deadline and any(
            getattr(c, "cycle", True) is None for c in self.server_state.connections
        ):
            await asyncio.sleep(0.01)
        await super().shutdown(sockets=sockets)
        # uvicorn re-raises the stop signal once it has drained, so the process dies "killed by
        # SIGTERM", exactly like an app without a handler. Exit 0 instead: herdsman (and
        # systemd) can then tell a drained worker from one that was cut off.
        getattr(self, "_captured_signals", []).clear()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("app", help="MODULE:ATTRIBUTE, as for uvicorn")
    p.add_argument("--app-dir", default=".", help="directory to import the app from")
    p.add_argument("--lifespan", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--log-level", default="warning")
    p.add_argument("--timeout-graceful-shutdown", type=int, default=25, metavar="SECONDS")
    p.add_argument("--timeout-keep-alive", type=int, default=5, metavar="SECONDS")
    args = p.parse_args()

    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("error: no socket at fd 3 (LISTEN_FDS/LISTEN_PID): run me under herdsman")
    # socket(fileno=) asks the kernel for the family and type: TCP stays TCP, so asyncio sets
    # TCP_NODELAY on every accepted connection.
    sock = socket.socket(fileno=3)

    sys.path.insert(0, os.path.abspath(args.app_dir))
    config = uvicorn.Config(
        args.app,
        lifespan=args.lifespan,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
