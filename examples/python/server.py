#!/usr/bin/env python3
"""Minimal herdsman worker in Python (stdlib only).

herdsman hands every worker the same listening socket at fd 3 (systemd
socket-activation protocol: LISTEN_FDS / LISTEN_PID), so all workers accept
from one kernel queue and no worker ever binds a port itself.

    herdsman run --listen 127.0.0.1:8080 -w 4 --ready notify \
        -- python3 examples/python/server.py
"""
import os
import select
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import ThreadingMixIn

WORKER_ID = os.environ.get("HERDSMAN_WORKER_ID", "?")
GENERATION = os.environ.get("HERDSMAN_GENERATION", "?")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 5  # idle keep-alive connections are dropped after 5 s

    def do_GET(self):
        body = (f"hello from worker {WORKER_ID} (pid {os.getpid()}, "
                f"generation {GENERATION})\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if DRAINING:  # tell keep-alive clients to reconnect (to another worker)
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


class Server(ThreadingMixIn, HTTPServer):
    block_on_close = True  # server_close() waits for in-flight requests
    conns = set()  # open connections, so idle keep-alives can be woken

    def process_request(self, conn, addr):
        self.conns.add(conn)
        super().process_request(conn, addr)  # one thread per connection

    def shutdown_request(self, conn):
        self.conns.discard(conn)
        super().shutdown_request(conn)

    def wake_idle(self):
        # A connection socket is private to this worker, so shutting down its
        # read side is fine: requests already received are still answered,
        # idle keep-alive connections see EOF and close right away.
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass


class Drain(Exception):
    pass


DRAINING = False


def on_stop(signum, frame):
    global DRAINING
    DRAINING = True
    raise Drain  # interrupts the blocking accept() in the main thread


def notify(state):
    """Send one sd_notify datagram to herdsman, if it asked for one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # Linux abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


def main():
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("error: LISTEN_FDS is not set: run me under herdsman, which "
              "passes the listening socket as fd 3", file=sys.stderr)
        sys.exit(2)
    # Adopt fd 3. Never change its blocking mode: the flag is shared.
    listener = socket.socket(fileno=3)
    server = Server(listener.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket = listener
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

    print(f"worker {WORKER_ID} (pid {os.getpid()}) serving on fd 3", flush=True)
    notify("READY=1")
    try:
        while True:
            try:
                conn, addr = listener.accept()
            except BlockingIOError:  # someone set O_NONBLOCK on the shared fd
                select.select([listener], [], [], 1.0)
                continue
            server.process_request(conn, addr)
    except Drain:
        pass
    # close() -- never shutdown() -- the listener: the other workers and
    # herdsman keep using it. Then wait for in-flight requests to finish.
    listener.close()
    server.wake_idle()
    server.server_close()
    print(f"worker {WORKER_ID} drained", flush=True)


if __name__ == "__main__":
    main()
