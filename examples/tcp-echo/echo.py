"""A tcp-echo server like Istio's ``istio/tcp-echo-server``: answers every line with "<prefix> <line>".

Usage: python echo.py ADDRESS PORT PREFIX
"""

import socketserver
import sys


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(PREFIX + b" " + line)


if __name__ == "__main__":
    address, port, PREFIX = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer((address, port), Echo) as server:
        server.serve_forever()
