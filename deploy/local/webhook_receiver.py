"""A webhook receiver for trying devgate locally (the README quick-start runs it).

    WEBHOOK_SECRET=whsec_... .venv/bin/python deploy/local/webhook_receiver.py 127.0.0.1:8090

Prints every delivery it gets and checks its signature with the official Standard Webhooks
library (`standardwebhooks`, installed into .venv by deploy/local/common.sh), as a real
receiver should: a valid signature, a timestamp within 5 minutes, then the event. Answers
204 when the signature verifies and 400 when it does not (devgate then retries on its
schedule). A repeated `webhook-id` (delivery is at least once) is acknowledged, not handled
twice. Any GET answers 200, so a script can wait until it listens. The secret comes from the
environment, not the command line, so it does not show in `ps`.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

seen = set()
seen_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    webhook = None

    def log_message(self, *args):
        pass

    def reply(self, status):
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self):
        self.reply(200)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        msg_id = headers.get("webhook-id", "?")
        try:
            event = self.webhook.verify(body, headers)
        except WebhookVerificationError as e:
            print(f"webhook {msg_id}: signature NOT verified ({e}); answered 400", flush=True)
            return self.reply(400)
        with seen_lock:
            repeat = msg_id in seen
            seen.add(msg_id)
        if repeat:
            print(f"webhook {msg_id}: already handled (a redelivery); answered 204", flush=True)
        else:
            print(
                f"webhook {msg_id}: {event['type']}, signature verified\n"
                f"  {json.dumps(event, separators=(',', ':'))}",
                flush=True,
            )
        self.reply(204)


def main():
    if len(sys.argv) != 2 or ":" not in sys.argv[1]:
        sys.exit("usage: WEBHOOK_SECRET=whsec_... webhook_receiver.py HOST:PORT")
    secret = os.environ.get("WEBHOOK_SECRET")
    if not secret:
        sys.exit("WEBHOOK_SECRET (the endpoint's whsec_ secret) is not set")
    Handler.webhook = Webhook(secret)
    host, port = sys.argv[1].rsplit(":", 1)
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.daemon_threads = True
    print(f"receiver listening on http://{sys.argv[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
