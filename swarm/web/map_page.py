"""The live swarm map: a page that shows each model's blocks, the nodes serving them and what is missing,
refreshed every few seconds from `/map.json` (the maps of `swarm health --json`)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

logger = logging.getLogger(__name__)


class MapPage:
    """Serves GET / (the page) and GET /map.json ({"models": [map, ...], "updated": unix time}) from a
    daemon thread until `close()`.

    :param read_maps: () -> every model's map (blocking: it reads the DHT); called at most once per
      `refresh` seconds, whatever the number of viewers
    """

    def __init__(self, read_maps: Callable[[], list[dict]], host: str, port: int, refresh: float = 2.0):
        self.read_maps, self.refresh = read_maps, refresh
        self._lock = threading.Lock()
        self._cached: tuple[float, bytes] | None = None
        page = resources.files("swarm.web").joinpath("map.html").read_bytes()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path in ("/", "/index.html"):
                    self._reply(200, "text/html; charset=utf-8", page)
                elif self.path == "/map.json":
                    try:
                        self._reply(200, "application/json", owner.maps_json())
                    except Exception as e:  # the page shows it and tries again
                        logger.warning("reading the swarm map failed: %r", e)
                        self._reply(503, "application/json", json.dumps({"error": repr(e)}).encode())
                else:
                    self._reply(404, "text/plain", b"not found")

            def _reply(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
                logger.debug("map page: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="map-page", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def maps_json(self) -> bytes:
        """The maps as JSON, read again when older than `refresh` seconds (one reader at a time)."""
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.refresh:
                body = json.dumps({"models": self.read_maps(), "updated": time.time()}).encode()
                self._cached = (time.monotonic(), body)
            return self._cached[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
