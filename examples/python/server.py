#!/usr/bin/env python3
"""Minimal herdsman worker in Python (stdlib only). Copy it and change do_GET.

herdsman hands every worker the same listening socket at fd 3 (systemd
socket-activation protocol: LISTEN_FDS / LISTEN_PID), so all workers accept
from one kernel queue and no worker ever binds a port itself.

    herdsman run --listen 127.0.0.1:8080 -w 4 --ready notify \
        -- python3 examples/python/server.py
"""
import os
import selectors
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler

WORKER_ID = os.environ.get("HERDSMAN_WORKER_ID", "?")
GENERATION = os.environ.get("HERDSMAN_GENERATION", "?")
draining = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = 2  # an idle keep-alive connection is closed after 2 s

    def do_GET(self):
        body = (f"hello from worker {WORKER_ID} (pid {os.getpid()}, "
                f"generation {GENERATION})\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if draining.is_set():  # keep-alive clients reconnect (to another worker)
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):  # one line per request on stdout
        print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}", flush=True)


def notify(state):
    """Send one sd_notify datagram to herdsman, if it asked for one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # Linux abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


def serve(conn, addr):
    try:
        Handler(conn, addr or ("unix", 0), None)
    except OSError:
        pass
    finally:
        conn.close()


def main():
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("error: LISTEN_FDS is not set: run me under herdsman, which "
              "passes the listening socket as fd 3", file=sys.stderr)
        sys.exit(2)
    listener = socket.socket(fileno=3)
    # Non-blocking accept, as most servers sharing a socket do: losing an accept
    # race to another worker must not block us. (Workers may do this; herdsman
    # itself never touches the socket's flags.)
    listener.setblocking(False)
    # The stop signal only sets a flag; set_wakeup_fd wakes the selector. Raising
    # from the handler could drop a connection accept() had just taken.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: draining.set())
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)

    print(f"worker {WORKER_ID} (pid {os.getpid()}) serving on fd 3", flush=True)
    notify("READY=1")
    threads = []
    while not draining.is_set():
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj == wake_r:
                os.read(wake_r, 64)
                continue
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker got it
            conn.setblocking(True)
            t = threading.Thread(target=serve, args=(conn, addr), daemon=True)
            t.start()
            threads.append(t)
        threads = [t for t in threads if t.is_alive()]
    # close() -- never shutdown() -- the listener: the other workers and
    # herdsman keep using it. Then let in-flight requests finish.
    listener.close()
    for t in threads:
        t.join(timeout=10)
    print(f"worker {WORKER_ID} drained", flush=True)


if __name__ == "__main__":
    main()
