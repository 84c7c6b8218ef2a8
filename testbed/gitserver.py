#!/usr/bin/env python3
"""Smart-HTTP git server for the deployra-builder test bed.

Serves every repository under ``--root`` through ``git http-backend`` (run as
a CGI program for each request), behind HTTP basic authentication. It exists
because libgit2, which the builder uses, speaks only git's *smart* HTTP
protocol, and because the builder must be tested with real credentials.

Behaviour worth knowing:

* Every request must carry ``Authorization: Basic`` with the configured user
  and password; otherwise the answer is ``401`` with
  ``WWW-Authenticate: Basic realm="git"``. libgit2 (like git/curl) sends
  credentials only after such a challenge.
* Request bodies are read with ``Content-Length`` or ``Transfer-Encoding:
  chunked`` (libgit2 and git both send chunked POSTs for large requests). The
  de-chunked body is spooled to a temporary file and handed to the CGI on
  stdin with an exact ``CONTENT_LENGTH``. ``Content-Encoding: gzip`` bodies are
  passed through untouched; http-backend inflates them itself.
* Responses are HTTP/1.1 and streamed as they are produced: with the CGI's
  ``Content-Length`` when it gives one, chunked otherwise. Connections are
  kept alive.
* ``uploadpack.allowAnySHA1InWant=true`` is set for every served repository
  through ``GIT_CONFIG_*`` environment variables, so clients can fetch a
  commit by SHA (``git fetch --depth 1 origin <sha>``), whether or not it is a
  branch tip. ``safe.directory=*`` is set too, so repositories created by
  another user are still served.
* Pushes work: ``REMOTE_USER`` is set for authenticated requests, which makes
  http-backend enable ``receive-pack``.
* One line per request goes to stderr: client, method, path, status, bytes,
  duration. The Authorization header and query credentials are never logged.

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO

# Bodies larger than this are refused (a test bed never needs more).
MAX_BODY_BYTES = 1 << 30
# Bodies up to this size stay in memory before spilling to disk.
SPOOL_IN_MEMORY_BYTES = 8 << 20
# Read size when streaming CGI output to the client.
STREAM_CHUNK = 64 * 1024


class BadRequest(Exception):
    """The request cannot be parsed (bad chunk framing, oversized body...)."""


def read_chunked(rfile: BinaryIO, sink: BinaryIO, limit: int) -> int:
    """Copy a ``Transfer-Encoding: chunked`` body from ``rfile`` to ``sink``.

    Returns the number of body bytes written. Chunk extensions and trailers
    are accepted and ignored.
    """
    total = 0
    while True:
        line = rfile.readline(65537)
        if not line.endswith(b"\n"):
            raise BadRequest("truncated chunk size line")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise BadRequest(f"bad chunk size {size_text!r}") from exc
        if size < 0:
            raise BadRequest("negative chunk size")
        if size == 0:
            # Trailer section: header lines until an empty line.
            while True:
                trailer = rfile.readline(65537)
                if trailer in (b"\r\n", b"\n", b""):
                    return total
        total += size
        if total > limit:
            raise BadRequest("request body too large")
        remaining = size
        while remaining:
            data = rfile.read(min(remaining, STREAM_CHUNK))
            if not data:
                raise BadRequest("truncated chunk")
            sink.write(data)
            remaining -= len(data)
        if rfile.readline(3) not in (b"\r\n", b"\n"):
            raise BadRequest("missing CRLF after chunk")


def read_exact(rfile: BinaryIO, sink: BinaryIO, length: int) -> int:
    """Copy exactly ``length`` bytes from ``rfile`` to ``sink``."""
    remaining = length
    while remaining:
        data = rfile.read(min(remaining, STREAM_CHUNK))
        if not data:
            raise BadRequest("truncated request body")
        sink.write(data)
        remaining -= len(data)
    return length


class GitHandler(BaseHTTPRequestHandler):
    """Authenticates, then proxies the request to ``git http-backend``."""

    protocol_version = "HTTP/1.1"
    server_version = "deployra-testbed-git/1"
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 300

    # Set by main() before the server starts.
    project_root: str = ""
    username: str = ""
    password: str = ""

    # Per-request bookkeeping for the log line.
    _status: int = 0
    _sent: int = 0

    # ----------------------------------------------------------------- auth

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        # Constant-time comparisons; evaluate both so timing leaks nothing.
        user_ok = hmac.compare_digest(user.encode(), self.username.encode())
        pass_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return user_ok and pass_ok

    def _send_simple(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        body = (text + "\n").encode()
        self.send_response(status)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self._sent += len(body)

    def _challenge(self) -> None:
        self._send_simple(
            HTTPStatus.UNAUTHORIZED,
            "authentication required",
            {"WWW-Authenticate": 'Basic realm="git"'},
        )

    def handle_expect_100(self) -> bool:
        # Refuse before the client uploads a (possibly large) body for nothing.
        if not self._authorized():
            self.close_connection = True
            self._begin()
            self._challenge()
            self._log_request()
            return False
        return super().handle_expect_100()

    # ----------------------------------------------------------- body input

    def _read_body(self) -> tuple[BinaryIO | None, int]:
        """Read the request body into a spooled temp file.

        Returns ``(file, length)``; ``file`` is None when there is no body.
        """
        transfer_encoding = self.headers.get("Transfer-Encoding", "").lower()
        content_length = self.headers.get("Content-Length")
        if "chunked" in transfer_encoding:
            sink = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)
            length = read_chunked(self.rfile, sink, MAX_BODY_BYTES)
        elif content_length is not None:
            try:
                length = int(content_length)
            except ValueError as exc:
                raise BadRequest("bad Content-Length") from exc
            if length < 0 or length > MAX_BODY_BYTES:
                raise BadRequest("bad Content-Length")
            if length == 0:
                return None, 0
            sink = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)
            read_exact(self.rfile, sink, length)
        else:
            return None, 0
        sink.seek(0)
        return sink, length

    # ------------------------------------------------------------ handlers

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._handle()

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def _begin(self) -> None:
        self._started = time.monotonic()
        self._status = 0
        self._sent = 0

    def _handle(self) -> None:
        self._begin()
        try:
            try:
                body, length = self._read_body()
            except BadRequest as exc:
                self.close_connection = True
                self._send_simple(HTTPStatus.BAD_REQUEST, f"bad request: {exc}")
                return
            if not self._authorized():
                # The body was drained, so the connection stays usable.
                self._challenge()
                return
            self._run_backend(body, length)
        finally:
            self._log_request()

    def _cgi_environment(self, length: int) -> dict[str, str]:
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.project_root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": self.request_version,
            "SERVER_SOFTWARE": self.server_version,
            "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]),
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path),
            "QUERY_STRING": query,
            "REMOTE_ADDR": self.client_address[0],
            # Authenticated: enables receive-pack (push) in http-backend.
            "REMOTE_USER": self.username,
            "AUTH_TYPE": "Basic",
            # Let clients fetch any object by SHA; serve repos of any owner.
            "GIT_CONFIG_COUNT": "2",
            "GIT_CONFIG_KEY_0": "uploadpack.allowAnySHA1InWant",
            "GIT_CONFIG_VALUE_0": "true",
            "GIT_CONFIG_KEY_1": "safe.directory",
            "GIT_CONFIG_VALUE_1": "*",
        }
        for var in ("HOME", "LANG", "LC_ALL", "TMPDIR"):
            if var in os.environ:
                env[var] = os.environ[var]
        if self.headers.get("Content-Type"):
            env["CONTENT_TYPE"] = self.headers["Content-Type"]
        if self.command == "POST" or length:
            env["CONTENT_LENGTH"] = str(length)
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        protocol = self.headers.get("Git-Protocol")
        if protocol:
            # http-backend reads HTTP_GIT_PROTOCOL; upload-pack reads GIT_PROTOCOL.
            env["GIT_PROTOCOL"] = protocol
            env["HTTP_GIT_PROTOCOL"] = protocol
        return env

    def _run_backend(self, body: BinaryIO | None, length: int) -> None:
        # Popen takes the body's file descriptor; SpooledTemporaryFile.fileno()
        # moves an in-memory body to disk first, keeping the position (0).
        stdin: int | BinaryIO = subprocess.DEVNULL if body is None else body
        try:
            proc = subprocess.Popen(
                ["git", "http-backend"],
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=None,  # http-backend's complaints go to our log
                env=self._cgi_environment(length),
                cwd=self.project_root,
            )
        except OSError as exc:
            self._send_simple(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot run git: {exc}")
            return
        finally:
            if body is not None:
                body.close()
        assert proc.stdout is not None
        try:
            self._relay_cgi_output(proc.stdout)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            proc.stdout.close()
            proc.wait()

    def _relay_cgi_output(self, out: BinaryIO) -> None:
        # --- CGI header block: "Name: value" lines up to an empty line.
        status = HTTPStatus.OK.value
        reason = None
        headers: list[tuple[str, str]] = []
        content_length = None
        while True:
            line = out.readline(65537)
            if not line:
                self._send_simple(HTTPStatus.BAD_GATEWAY, "git http-backend produced no response")
                return
            line = line.rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() == "status":
                code, _, reason_text = value.partition(" ")
                status = int(code)
                reason = reason_text or None
            elif name.lower() == "content-length":
                content_length = int(value)
            elif name.lower() in ("connection", "transfer-encoding"):
                continue  # hop-by-hop: ours to decide
            else:
                headers.append((name, value))

        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        chunked = content_length is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(content_length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

        # --- Body: stream it as http-backend produces it.
        while True:
            data = out.read1(STREAM_CHUNK)  # type: ignore[attr-defined]
            if not data:
                break
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
            self._sent += len(data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        elif self._sent != content_length:
            # The framing is now wrong; never reuse this connection.
            self.close_connection = True

    # -------------------------------------------------------------- logging

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = int(code)
        super().send_response(code, message)
        # Lets testbed/up check that the answer comes from the process it started.
        self.send_header("X-Testbed-Pid", str(os.getpid()))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silence the default per-response log; _log_request does it."""

    def _log_request(self) -> None:
        path = self.path.partition("?")[0]
        query = self.path.partition("?")[2]
        service = urllib.parse.parse_qs(query).get("service", [""])[0]
        shown = f"{path}?service={service}" if service else path
        elapsed = time.monotonic() - getattr(self, "_started", time.monotonic())
        self.log_message(
            "%s %s %d %dB %.3fs%s",  # ...te=chunked marks chunked uploads
            self.command,
            shown,
            self._status,
            self._sent,
            elapsed,
            "".join(
                f" {label}={value}"
                for label, value in (
                    ("proto", self.headers.get("Git-Protocol")),
                    ("te", self.headers.get("Transfer-Encoding")),
                    ("ce", self.headers.get("Content-Encoding")),
                )
                if value
            ),
        )

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        sys.stderr.write(
            "%s %s %s\n"
            % (time.strftime("%Y-%m-%dT%H:%M:%S"), self.client_address[0], format % args)
        )
        sys.stderr.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8418)
    parser.add_argument("--root", required=True, help="directory holding the bare repositories")
    parser.add_argument("--username", default="tester")
    parser.add_argument("--password", default="testbed-git-secret")
    args = parser.parse_args()

    if shutil.which("git") is None:
        parser.error("git is not installed")
    root = os.path.abspath(args.root)
    os.makedirs(root, exist_ok=True)

    GitHandler.project_root = root
    GitHandler.username = args.username
    GitHandler.password = args.password

    server = ThreadingHTTPServer((args.host, args.port), GitHandler)
    server.daemon_threads = True
    sys.stderr.write(f"git server: serving {root} on http://{args.host}:{args.port}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
