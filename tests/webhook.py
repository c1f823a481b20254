"""A webhook receiver on 127.0.0.1 behind a `custom-webhook` notification block: what the alerts send."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver(ThreadingHTTPServer):
    """Records every POST body with the time it arrived."""

    def __init__(self) -> None:
        received: list[tuple[float, dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((time.time(), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.received = received

    def subjects(self, word: str) -> list[tuple[float, dict]]:
        return [(at, body) for at, body in self.received if word in body["subject"]]

    def wait_for(self, word: str, timeout: float) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.subjects(word):
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no notification with {word!r} after {timeout}s; got {self.received}")
