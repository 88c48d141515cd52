#!/usr/bin/env python3
"""A herdsman worker in Python that exports its own metrics with `prometheus_client`
(pip install prometheus_client). herdsman fetches them on every scrape of its
`--metrics` endpoint and adds `worker="ID"` to each sample.

    herdsman run --listen 127.0.0.1:8080 -w 4 --ready notify --metrics 127.0.0.1:9464 \
        -- python3 examples/python/metrics_server.py
    curl -s 127.0.0.1:9464/metrics | grep app_requests

The app serves on the inherited socket at fd 3 exactly like server.py; the
metrics go to the unix socket herdsman names in HERDSMAN_METRICS_SOCKET (one
per worker process, removed by herdsman when the worker is gone).
"""
import os
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler

from prometheus_client import Counter, Histogram, MetricsHandler

WORKER_ID = os.environ.get("HERDSMAN_WORKER_ID", "?")
REQUESTS = Counter("app_requests", "Requests served.", ["code"])
LATENCY = Histogram("app_request_seconds", "Time to answer a request.")


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        with LATENCY.time():
            body = f"hello from worker {WORKER_ID} (pid {os.getpid()})\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        REQUESTS.labels(code="200").inc()

    def log_message(self, fmt, *args):
        pass


class UnixMetricsServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class QuietMetrics(MetricsHandler):
    def address_string(self):  # unix sockets have no peer address
        return "herdsman"


def serve_metrics():
    path = os.environ.get("HERDSMAN_METRICS_SOCKET")
    if not path:
        return  # not under herdsman (or it has no runtime directory): no metrics
    server = UnixMetricsServer(path, QuietMetrics)
    # herdsman must be able to connect even when a UMask made the socket 0750
    # and we run as another user; only herdsman can reach its runtime directory.
    os.chmod(path, 0o666)
    threading.Thread(target=server.serve_forever, daemon=True).start()


class FdServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True

    def __init__(self, fd):
        socketserver.BaseServer.__init__(self, None, App)
        self.socket = socket.socket(fileno=fd)

    def server_close(self):
        self.socket.close()  # close(), never shutdown(): other workers share it


def notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), "\0" + path[1:] if path.startswith("@") else path)


def main():
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        print("error: LISTEN_FDS is not set: run me under herdsman", file=sys.stderr)
        sys.exit(2)
    serve_metrics()
    app = FdServer(3)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=app.shutdown).start())
    notify("READY=1")
    app.serve_forever()
    app.server_close()


if __name__ == "__main__":
    main()
