"""A webhook receiver for the event hose's tests: Python's http.server.

Usage: webhook_receiver.py PORT OUT_DIR [STATUS]

Every POST is written to OUT_DIR as one JSON file ({"path", "headers", "body"}) and
made durable (temporary file, rename) before it is answered, so a batch the daemon
saw acknowledged is always on disk. Batches are answered STATUS (200 by default);
POST /token answers an OAuth2 client-credentials grant with the access token
"tok-<client_id>" and records the form.
"""

import json
import os
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
OUT = sys.argv[2]
STATUS = int(sys.argv[3]) if len(sys.argv) > 3 else 200
COUNT = [0]


def record(entry):
    COUNT[0] += 1
    name = f"{time.time_ns()}-{os.getpid()}-{COUNT[0]}.json"
    tmp = os.path.join(OUT, "." + name)
    with open(tmp, "w") as f:
        json.dump(entry, f)
    os.rename(tmp, os.path.join(OUT, name))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path == "/token":
            form = urllib.parse.parse_qs(raw.decode())
            record({"path": self.path, "headers": headers, "form": form})
            client = form.get("client_id", [""])[0]
            token = {"access_token": f"tok-{client}", "expires_in": 3600, "token_type": "bearer"}
            return self.answer(200, json.dumps(token).encode())
        try:
            body = json.loads(raw)
        except ValueError:
            return self.answer(400, b'{"error":"not json"}')
        if STATUS == 200:
            record({"path": self.path, "headers": headers, "body": body})
        self.answer(STATUS, b'{"ok":true}')


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
