"""A webhook receiver for the tests: a real HTTP server (another process) that verifies every
delivery with the official Standard Webhooks library and answers as the test scripts it.

Listens on 127.0.0.1 (a free port, printed as the first stdout line). Per hook name:
  PUT  /_config/<name>  {"secrets": ["whsec_…"], "responses": [{"status", "retry_after",
                        "delay_ms", "body"}], "default": {...}}   the next deliveries take the
                        scripted responses in order, then the default (200).
  GET  /_log/<name>     every delivery so far: headers, body, which secrets verify it.
  GET  /_summary/<name> {"received", "ids": {webhook-id: count}, "unverified"} (for thousands).
  POST /hooks/<name>    a delivery.
"""

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

lock = threading.Lock()
configs = {}
logs = {}


def verified_by(secrets, body, headers):
    ok = []
    for i, secret in enumerate(secrets):
        try:
            Webhook(secret).verify(body, headers, json_parse=False)
            ok.append(i)
        except WebhookVerificationError:
            pass
    return ok


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def read_body(self):
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def do_PUT(self):
        body = self.read_body()
        if not self.path.startswith("/_config/"):
            return self.reply(404)
        name = self.path[len("/_config/"):]
        cfg = json.loads(body)
        with lock:
            configs[name] = {
                "secrets": cfg.get("secrets", []),
                "responses": list(cfg.get("responses", [])),
                "default": cfg.get("default") or {"status": 200},
            }
            logs.setdefault(name, [])
        self.reply(204)

    def do_GET(self):
        if self.path.startswith("/_summary/"):
            name = self.path[len("/_summary/"):]
            with lock:
                entries = list(logs.get(name, []))
            ids = {}
            for e in entries:
                key = e["headers"].get("webhook-id", "")
                ids[key] = ids.get(key, 0) + 1
            out = {
                "received": len(entries),
                "ids": ids,
                "unverified": sum(1 for e in entries if not e["verified_by"]),
            }
            return self.reply(200, json.dumps(out).encode(), [("content-type", "application/json")])
        if not self.path.startswith("/_log/"):
            return self.reply(404)
        name = self.path[len("/_log/"):]
        with lock:
            out = json.dumps(logs.get(name, [])).encode()
        self.reply(200, out, [("content-type", "application/json")])

    def do_POST(self):
        body = self.read_body()
        if not self.path.startswith("/hooks/"):
            return self.reply(404)
        name = self.path[len("/hooks/"):]
        headers = {k.lower(): v for k, v in self.headers.items()}
        with lock:
            cfg = configs.get(name) or {"secrets": [], "responses": [], "default": {"status": 200}}
            secrets = list(cfg["secrets"])
            response = cfg["responses"].pop(0) if cfg["responses"] else cfg["default"]
        entry = {
            "time": time.time(),
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
            "verified_by": verified_by(secrets, body, headers),
            "status": response.get("status", 200),
        }
        with lock:
            logs.setdefault(name, []).append(entry)
        if response.get("delay_ms"):
            time.sleep(response["delay_ms"] / 1000.0)
        extra = []
        if response.get("retry_after") is not None:
            extra.append(("retry-after", str(response["retry_after"])))
        self.reply(response.get("status", 200), response.get("body", "").encode(), extra)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A sender that died mid-request (the fault tests kill it) is not our error.
        pass


def main():
    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    # Exit with the test process: stdin closes when it does.
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
