"""A Python server that binds its own port (http.server, standard library only), unchanged
under herdsman: `python3 python_bind.py PORT`. It drains on SIGTERM: stop accepting, finish
the requests in progress, exit 0."""

import http.server
import signal
import sys
import threading

from compat_info import info, mark_loaded


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = info("python-bind").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the requests in progress


def main():
    port = int(sys.argv[1])
    mark_loaded()  # suite only
    server = Server(("127.0.0.1", port), Handler)  # bind() and listen() of its own
    # Several processes accept on this socket (herdsman's, shared by every worker): a blocking
    # accept() after select() said "readable" waits for the *next* connection when another
    # worker took this one, and then the SIGTERM below cannot stop serve_forever(). Non-blocking,
    # that accept() fails with EAGAIN, which socketserver ignores.
    server.socket.setblocking(False)
    # serve_forever() returns once shutdown() is called (from another thread).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
