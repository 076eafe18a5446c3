"""An HTTPS server for the TLS tests (Python's http.server and ssl): MTA-STS policy
hosts and a TLS-RPT report receiver.

Usage: https_server.py PORT ROOT CERT KEY [--sni DIR]

GET /<path> with Host h serves ROOT/h/<path> as text/plain (or as the media type in
ROOT/h/<path>.type), 404 when missing, and appends "h /<path>" to ROOT/gets.log.
POST stores {"path", "headers", "body" (base64)} as ROOT/posts/<n>.json (written
whole, then renamed) and answers 200. With --sni, a client naming server N gets
DIR/N.crt and DIR/N.key when they exist, CERT and KEY otherwise. Prints "ready"
once listening.
"""

import base64
import json
import os
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, ROOT, CERT, KEY = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
SNI = sys.argv[6] if len(sys.argv) > 6 and sys.argv[5] == "--sni" else None
LOCK = threading.Lock()
COUNT = [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, media="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        path = self.path.split("?")[0]
        with LOCK:
            with open(os.path.join(ROOT, "gets.log"), "a") as log:
                log.write(f"{host} {path}\n")
        file = os.path.normpath(os.path.join(ROOT, host, path.lstrip("/")))
        if not file.startswith(os.path.normpath(ROOT) + os.sep) or not os.path.isfile(file):
            return self.answer(404, b"not found\n")
        media = "text/plain"
        if os.path.isfile(file + ".type"):
            with open(file + ".type") as f:
                media = f.read().strip()
        with open(file, "rb") as f:
            self.answer(200, f.read(), media)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        with LOCK:
            COUNT[0] += 1
            n = COUNT[0]
        posts = os.path.join(ROOT, "posts")
        os.makedirs(posts, exist_ok=True)
        entry = {
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": base64.b64encode(body).decode(),
        }
        tmp = os.path.join(posts, f".{n}.json")
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.rename(tmp, os.path.join(posts, f"{n}.json"))
        self.answer(200, b"ok\n")


def main():
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(CERT, KEY)
    if SNI:
        def pick(sock, name, _context):
            if name:
                crt, key = os.path.join(SNI, name + ".crt"), os.path.join(SNI, name + ".key")
                if os.path.isfile(crt):
                    own = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    own.load_cert_chain(crt, key)
                    sock.context = own

        context.sni_callback = pick
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
