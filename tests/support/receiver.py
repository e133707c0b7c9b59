"""A local webhook receiver: records every POST (headers and body) and answers 204.

``hold=N`` makes it keep the first N requests waiting (recorded, not answered) until
:meth:`WebhookReceiver.release`, so a test can kill the sender in the middle of a delivery.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


class WebhookReceiver:
    """An HTTP server on a free loopback port; use as a context manager."""

    def __init__(self, path: str = "/hooks/rollout", *, hold: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.holding = threading.Event()
        """Set once a request is being held."""
        self._released = threading.Event()
        received = self.requests
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                if len(received) <= hold:
                    receiver.holding.set()
                    receiver._released.wait(timeout=120)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{path}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def bodies(self) -> list[bytes]:
        """The bodies received so far, in order."""
        return [body for _, body in self.requests]

    def release(self) -> None:
        """Answer the held requests (and every later one) at once."""
        self._released.set()

    def close(self) -> None:
        """Stop serving and release the port."""
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
