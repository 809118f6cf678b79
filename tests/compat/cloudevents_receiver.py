"""A CloudEvents receiver for the decision sink's test, built on the
CloudEvents SDK that KServe itself uses (`cloudevents`, installed with
kserve from requirements.txt).

POST (any path): a batch (`application/cloudevents-batch+json`: a JSON
array of structured events); each event is parsed and validated by the
SDK's structured-mode reader. Anything else is answered 415 or 400.
GET /events: every event received so far, as JSON objects (attributes and
data). The first `--fail N` POSTs are answered 503, to test retries.

Prints `listening PORT` once it listens on 127.0.0.1.
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.http import from_json

received = []
posts = {"count": 0, "failed": 0}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with lock:
            body = json.dumps({"events": received, "posts": posts}).encode()
        self.answer(200, body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        with lock:
            posts["count"] += 1
            if posts["failed"] < self.server.fail:
                posts["failed"] += 1
                return self.answer(503, b'{"error": "failing on purpose"}')
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("application/cloudevents-batch+json"):
            return self.answer(415)
        try:
            batch = json.loads(body)
            assert isinstance(batch, list), "a batch is a JSON array"
            events = []
            for item in batch:
                event = from_json(json.dumps(item))
                attributes = dict(event.get_attributes())
                events.append({"attributes": attributes, "data": event.get_data()})
        except Exception as e:  # noqa: BLE001 - any defect is the sender's
            return self.answer(400, json.dumps({"error": str(e)}).encode())
        with lock:
            received.extend(events)
        self.answer(202)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.fail = args.fail
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
