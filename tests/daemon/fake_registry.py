"""A registry (distribution API v2) that knows no image, for pull tests: `/v2/` answers 200,
every manifest 404 MANIFEST_UNKNOWN, as a real registry does for a missing image or tag. Run
as `python -m tests.daemon.fake_registry`: it prints its port, then serves until killed."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class NotFoundRegistry(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer()

    def _answer(self) -> None:
        if self.path.rstrip("/") == "/v2":
            self._send(200, {})
            return
        error = {"code": "MANIFEST_UNKNOWN", "message": "manifest unknown", "detail": {}}
        self._send(404, {"errors": [error]})

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFoundRegistry)
    print(server.server_address[1], flush=True)
    sys.stdout.close()
    server.serve_forever()


if __name__ == "__main__":
    main()
