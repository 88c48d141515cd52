#!/usr/bin/env python3
"""A plain Python web server that knows nothing about herdsman: it binds its own
port, as it would alone (`python3 examples/python/plain.py`), and drains on SIGTERM.

Under herdsman it runs unchanged as N workers on one socket: its own bind() of
127.0.0.1:8080 gets herdsman's socket (bind interception), and without --listen
herdsman binds the address the first worker asked for and gives it to every worker.

    herdsman run -w 4 -- python3 examples/python/plain.py
"""
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8080"))
# PM2's name for the worker's slot (0..N-1); herdsman sets it too. Optional.
WORKER = os.environ.get("NODE_APP_INSTANCE", "-")


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from worker {WORKER} (pid {os.getpid()})\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Hello)
server.daemon_threads = False  # finish in-flight requests before exiting
# Drain on SIGTERM: stop accepting, finish what was accepted, exit 0.
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
print(f"serving on 127.0.0.1:{PORT}", flush=True)
server.serve_forever()
server.server_close()
