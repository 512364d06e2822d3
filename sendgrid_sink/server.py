"""Serving the sink: a small threaded HTTP/1.1 WSGI server, ``SinkServer`` and ``run_sink``.

werkzeug's development server (and gunicorn's gthread worker, one process) top out near 1,700
requests/s here, CPU-bound in HTTP parsing and a thread per connection. Benchmarks need more, so
the sink has a server of its own: keep-alive, pipelining, chunked request bodies,
``Expect: 100-continue`` and a pool of reusable connection threads. See docs/sink.md.
"""

from __future__ import annotations

import io
import queue
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

from flask import Flask

from .app import create_sink_app
from .pages import EXTENSION_KEY
from .state import SinkState
from .wire import MAX_BODY_BYTES


class HTTPServer:
    """Minimal threaded HTTP/1.1 WSGI server, enough for a local test double."""

    max_header_bytes = 65536
    min_workers = 8
    worker_idle_seconds = 30.0

    def __init__(self, host: str, port: int, app: Callable, keepalive_timeout: float = 60.0,
                 backlog: int = 4096) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(backlog)
        except OSError:
            self.socket.close()
            raise
        self.socket.settimeout(0.25)
        self.app = app
        self.keepalive_timeout = keepalive_timeout
        self.port = self.socket.getsockname()[1]
        self._base_environ = {
            "SERVER_NAME": host, "SERVER_PORT": str(self.port), "SCRIPT_NAME": "",
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        }
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._workers = 0
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._date = (0, "")

    # ----- lifecycle

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            while not self._stopping.is_set():
                try:
                    conn, addr = self.socket.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stopping.is_set():
                        break
                    time.sleep(0.01)  # e.g. EMFILE: back off instead of spinning
                    continue
                self._dispatch(conn, addr)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._stopped.wait(5)
        with self._lock:
            conns = list(self._conns)
            workers = self._workers
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _ in range(workers):
            self._jobs.put(None)

    def server_close(self) -> None:
        self.socket.close()

    # ----- workers

    def _dispatch(self, conn: socket.socket, addr: Any) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                spawn = False
            else:
                self._workers += 1
                spawn = True
        if spawn:
            threading.Thread(target=self._worker, args=((conn, addr),), name="sink-http", daemon=True).start()
        else:
            self._jobs.put((conn, addr))

    def _worker(self, job: tuple | None) -> None:
        while True:
            if job is not None:
                self._serve_connection(*job)
                with self._lock:
                    self._idle += 1
            try:
                job = self._jobs.get(timeout=self.worker_idle_seconds)
            except queue.Empty:
                job = None
                with self._lock:
                    if self._idle > 0 and self._workers > self.min_workers:
                        self._idle -= 1
                        self._workers -= 1
                        return
                continue
            if job is None:  # shutdown sentinel
                with self._lock:
                    self._idle -= 1
                    self._workers -= 1
                return

    # ----- one connection

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def _serve_connection(self, conn: socket.socket, addr: Any) -> None:
        with self._lock:
            self._conns.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.keepalive_timeout)
            buf = b""
            while not self._stopping.is_set():
                idx = buf.find(b"\r\n\r\n")
                while idx < 0:
                    if len(buf) > self.max_header_bytes:
                        self._send_simple(conn, "431 Request Header Fields Too Large")
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    idx = buf.find(b"\r\n\r\n", max(0, len(buf) - len(chunk) - 3))
                head, buf = buf[:idx], buf[idx + 4:]
                keep_alive, buf = self._handle_one(conn, addr, head, buf)
                if not keep_alive:
                    return
        except OSError:  # includes timeouts and connections reset or dropped on purpose
            return
        except Exception:  # a bug here must not kill the worker thread
            traceback.print_exc()
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _send_simple(self, conn: socket.socket, status: str) -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1"))

    def _handle_one(self, conn: socket.socket, addr: Any, head: bytes, buf: bytes) -> tuple[bool, bytes]:
        """Read one request's body, call the app, write its answer: (keep the connection?, unread bytes)."""
        environ = self._environ(head, conn, addr)
        if environ is None:
            self._send_simple(conn, "400 Bad Request")
            return False, b""
        version = environ["SERVER_PROTOCOL"]
        connection = environ.get("HTTP_CONNECTION", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        try:
            body, buf, keep_body = self._read_body(conn, environ, buf)
        except ValueError:
            self._send_simple(conn, "400 Bad Request")
            return False, b""
        keep_alive = keep_alive and keep_body
        environ["wsgi.input"] = io.BytesIO(body)
        environ["wsgi.input_terminated"] = True
        status, headers, payload, ok = self._call_app(environ)
        if status is None:
            return False, b""
        keep_alive = keep_alive and ok
        out = [f"HTTP/1.1 {status}\r\n"]
        has_length = False
        for name, value in headers:
            if name.lower() == "content-length":
                has_length = True
            out.append(f"{name}: {value}\r\n")
        if not has_length:
            out.append(f"Content-Length: {len(payload)}\r\n")
        out.append(f"Date: {self._http_date()}\r\nServer: herald-sendgrid-sink\r\n")
        if not keep_alive:
            out.append("Connection: close\r\n")
        out.append("\r\n")
        data = "".join(out).encode("latin-1")
        conn.sendall(data if environ["REQUEST_METHOD"] == "HEAD" else data + payload)
        return keep_alive, buf

    def _environ(self, head: bytes, conn: socket.socket, addr: Any) -> dict | None:
        """The WSGI environ of a request head (None when its request line is malformed)."""
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ", 2)
        except ValueError:
            return None
        environ = dict(self._base_environ)
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().decode("latin-1").upper().replace("-", "_")
            val = value.strip().decode("latin-1")
            if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
                environ[key] = val
            else:
                key = "HTTP_" + key
                environ[key] = f"{environ[key]},{val}" if key in environ else val
        path, _, query = target.partition("?")
        if path.startswith(("http://", "https://")):
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        environ["REQUEST_METHOD"] = method
        environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1")
        environ["QUERY_STRING"] = query
        environ["SERVER_PROTOCOL"] = version
        environ["REMOTE_ADDR"] = str(addr[0]) if isinstance(addr, tuple) else ""
        environ["REMOTE_PORT"] = str(addr[1]) if isinstance(addr, tuple) else ""
        environ["herald_sink.socket"] = conn
        return environ

    def _read_body(self, conn: socket.socket, environ: dict, buf: bytes) -> tuple[bytes, bytes, bool]:
        """(body, unread bytes, keep the connection?); ValueError for a malformed framing.

        A body over SendGrid's limit is read and dropped (the app answers 413), or not read at
        all when it is huge (then the connection closes after the answer).
        """
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            body, buf, too_big = self._read_chunked(conn, buf)
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            environ["CONTENT_LENGTH"] = str(len(body)) if not too_big else str(MAX_BODY_BYTES + 1)
            return body, buf, True
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > len(buf) and environ.get("HTTP_EXPECT", "").lower() == "100-continue":
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length > 4 * MAX_BODY_BYTES:
            return b"", b"", False  # answer 413 without reading it all, then close
        if length > MAX_BODY_BYTES:
            return b"", self._discard(conn, buf, length), True
        body, buf = self._read_exact(conn, buf, length)
        return body, buf, True

    def _call_app(self, environ: dict) -> tuple[str | None, list, bytes, bool]:
        """(status, headers, body, the app did not fail); status None when it never answered."""
        status_holder: list = []
        written: list[bytes] = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            if exc_info and status_holder:
                raise exc_info[1].with_traceback(exc_info[2])
            status_holder[:] = [status, headers]
            return written.append

        ok = True
        try:
            result = self.app(environ, start_response)
            try:
                for data in result:
                    if data:
                        written.append(data)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:
            traceback.print_exc()
            status_holder[:] = ["500 INTERNAL SERVER ERROR", [("Content-Type", "text/plain")]]
            written[:] = [b"internal error"]
            ok = False
        if not status_holder:
            return None, [], b"", False
        return status_holder[0], status_holder[1], b"".join(written), ok

    @staticmethod
    def _read_exact(conn: socket.socket, buf: bytes, length: int) -> tuple[bytes, bytes]:
        if len(buf) >= length:
            return buf[:length], buf[length:]
        data = bytearray(buf)
        while len(data) < length:
            chunk = conn.recv(min(1 << 20, max(65536, length - len(data))))
            if not chunk:
                raise ConnectionError("client closed mid-body")
            data += chunk
        return bytes(data[:length]), bytes(data[length:])

    @staticmethod
    def _discard(conn: socket.socket, buf: bytes, length: int) -> bytes:
        if len(buf) >= length:
            return buf[length:]
        remaining = length - len(buf)
        while remaining > 0:
            chunk = conn.recv(min(1 << 20, remaining))
            if not chunk:
                raise ConnectionError("client closed mid-body")
            remaining -= len(chunk)
        return b""

    def _read_chunked(self, conn: socket.socket, buf: bytes) -> tuple[bytes, bytes, bool]:
        body = bytearray()
        too_big = False
        while True:
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError("client closed mid-body")
                buf += chunk
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + buf:  # optional trailers, then CRLF
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise ConnectionError("client closed mid-body")
                    buf += chunk
                _, buf = (b"\r\n" + buf).split(b"\r\n\r\n", 1)
                return bytes(body), buf, too_big
            data, buf = self._read_exact(conn, buf, size + 2)
            if len(body) + size > MAX_BODY_BYTES:
                too_big = True
                body.clear()
            if not too_big:
                body += data[:size]


class SinkServer:
    """The sink served over HTTP, in the foreground or in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, config: dict | None = None,
                 app: Flask | None = None) -> None:
        self.app = app if app is not None else create_sink_app(config)
        self.state: SinkState = self.app.extensions[EXTENSION_KEY]
        self.server = HTTPServer(host, port, self.app)
        self.port = self.server.port
        self.host = host
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def start(self) -> SinkServer:
        self._thread = threading.Thread(target=self.serve_forever, name="sendgrid-sink", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.state.close()
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> SinkServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def make_sink_server(host: str = "127.0.0.1", port: int = 0, config: dict | None = None) -> SinkServer:
    """Bind a sink server (port 0: a free port); call .start() or .serve_forever()."""
    return SinkServer(host, port, config)


def run_sink(host: str = "127.0.0.1", port: int = 3030, config: dict | None = None,
             on_ready: Callable[[SinkServer], None] | None = None) -> None:
    """Serve the sink until interrupted; prints one line with its URL.

    ``on_ready`` is called with the bound SinkServer before serving (handy with port 0).
    """
    sink = SinkServer(host, port, config)
    events = f", events -> {sink.state.events_url}" if sink.state.events_url else ""
    print(f"SendGrid sink on {sink.url} (POST {sink.url}/v3/mail/send, outbox {sink.url}/{events})",
          flush=True)
    if on_ready is not None:
        on_ready(sink)
    try:
        sink.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sink.state.close()
        sink.server.server_close()
