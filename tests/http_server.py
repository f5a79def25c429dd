"""A static HTTP server for tests: serves a folder on 127.0.0.1 (free port) and logs every request.

Like an object store or CDN it answers ``GET``/``HEAD`` of files, honours ``Range`` (fsspec's
HTTPFileSystem reads shard indexes with suffix ranges and chunks with byte ranges) and offers **no
directory listing**, so a client can only find what consolidated metadata tells it. ``ranges=False`` mimics
``python -m http.server`` instead: ``Range`` is ignored (200, the whole body, no ``Accept-Ranges``)::

    with serve_folder(tmp_path / "store.zarr") as server:
        reader = StoreReader(server.url)                 # http://127.0.0.1:PORT
        server.paths()                                   # ["/zarr.json", "/samples/id/c/0", ...]
        server.clear()                                   # forget earlier requests
    with serve_folder(tmp_path / "store.zarr", ranges=False) as server: ...   # a server that ignores Range
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str                 # URL path, unquoted, without the query
    range: str | None         # the Range header, if any
    status: int


@dataclass
class RequestLog:
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)


class LoggingHandler(SimpleHTTPRequestHandler):
    """Files with Range support (unless ``ranges`` is False); directories and missing files are 404; every
    request is logged."""

    log: RequestLog

    def __init__(self, *args, log: RequestLog, ranges: bool = True, **kwargs) -> None:
        self.log = log
        self.ranges = ranges
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self.serve(send_body=True)

    def do_HEAD(self) -> None:
        self.serve(send_body=False)

    def serve(self, send_body: bool) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.finish_request_logged(HTTPStatus.NOT_FOUND)
            return
        data = path.read_bytes()
        if self.ranges:
            status, body, extra = self.ranged(data, self.headers.get("Range"))
            extra = {"Accept-Ranges": "bytes", **extra}
        else:                             # like `python -m http.server`: Range ignored, never advertised
            status, body, extra = HTTPStatus.OK, data, {}
        self.send_response(status)
        for key, value in {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)),
                           **extra}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        self.record(status)

    @staticmethod
    def ranged(data: bytes, header: str | None) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) for an optional single ``bytes=a-b`` / ``a-`` / ``-n`` range."""
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip()) if header else None
        if not match or match.groups() == ("", ""):
            return HTTPStatus.OK, data, {}
        first, last = match.groups()
        size = len(data)
        if first == "":
            start, end = max(0, size - int(last)), size
        else:
            start, end = int(first), min(size, int(last) + 1) if last else size
        if start >= size or start >= end:
            return HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", {"Content-Range": f"bytes */{size}"}
        return HTTPStatus.PARTIAL_CONTENT, data[start:end], {"Content-Range": f"bytes {start}-{end - 1}/{size}"}

    def finish_request_logged(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.record(status)

    def record(self, status: int) -> None:
        path = unquote(urlsplit(self.path).path)
        self.log.add(Request(self.command, path, self.headers.get("Range"), int(status)))

    def log_message(self, format: str, *args) -> None:   # noqa: A002 - silence the default stderr log
        return


class FolderServer:
    """A running server (use ``serve_folder``): ``url``, ``requests``, ``paths()``, ``clear()``, ``stop()``."""

    def __init__(self, root: Path, ranges: bool = True) -> None:
        self.root = Path(root)
        self.log = RequestLog()
        handler = partial(LoggingHandler, directory=os.fspath(self.root), log=self.log, ranges=ranges)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="test-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Request]:
        with self.log.lock:
            return list(self.log.requests)

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def clear(self) -> None:
        with self.log.lock:
            self.log.requests.clear()

    def start(self) -> FolderServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> FolderServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_folder(root: Path, ranges: bool = True) -> FolderServer:
    """``with serve_folder(path) as server:`` serves ``path`` at ``server.url`` until the block ends;
    ``ranges=False`` ignores every ``Range`` header (200 with the whole object)."""
    return FolderServer(root, ranges)
