#!/usr/bin/env python3
"""Recording stand-in for the dashboard API (CONTRACT.md section 3).

The dashboard belongs to another system, so this is the one part of the test
bed that is not the real thing. It accepts the two webhook calls the builder
makes, validates them the way the real API does, records every call, and
prints one line per call so an operator can ``tail -f`` the log and watch a
build.

Contract endpoints (base ``/api``, as in ``API_URL=http://127.0.0.1:3990/api``)::

    POST /api/webhooks/deployments/{deploymentId}/status
    POST /api/webhooks/deployments/{deploymentId}/logs

  * ``x-api-key`` must equal ``--api-key``, else 401 ``{"error":"unauthorized"}``.
  * ``Content-Type`` must be ``application/json`` and the body a JSON object,
    else 400.
  * status body: ``status`` in BUILDING/BUILDED/FAILED/CANCELLED; optional
    ``logs`` = {``text``: string, ``type``: INFO/STDOUT/STDERR/ERROR};
    optional ``error`` (string); optional ``data`` (object; when it has
    ``containerImageUri`` it must be a string, ``containerRegistryType`` one
    of ecr/ghcr/docker). Optional fields, when present, must not be null.
  * logs body: ``text`` string; optional ``type`` in the four values.
  * Success: 200 ``{"ok":true}``.

Test-control endpoints (not part of the contract)::

    GET  /_testbed/health                    -> 200 {"ok":true}
    GET  /_testbed/calls[?deploymentId=X]    -> JSON array of recorded calls
    POST /_testbed/fail   {"deploymentId": "X", "count": N,
                           "status": 500, "delaySeconds": 0, "bodyBytes": 0}
    POST /_testbed/reset  [{"deploymentId": "X"}]

  ``fail``: the next ``count`` contract calls for X (default 1) are answered
  with ``status`` after sleeping ``delaySeconds`` (default 0). When
  ``delaySeconds`` > 0 and ``status`` is omitted or null, the calls are only
  delayed and then handled normally (to simulate a slow API / client
  timeouts); with no delay, ``status`` defaults to 500. Several ``fail``
  rules for one deployment queue up in order. ``bodyBytes`` makes an
  injected answer carry that many bytes of body. Fault injection happens before
  any validation, so an injected call is answered with the injected status
  whatever its content.

  ``reset``: with no body, clears all calls and rules; with a
  ``deploymentId``, clears only that deployment's. ``seq`` keeps counting
  up across resets, so it stays unique for the life of the process.

Every contract call, including rejected and fault-injected ones, is recorded
in arrival order as::

    {"seq": n, "kind": "status"|"logs", "deploymentId": id,
     "apiKeyOk": bool, "answered": code, "body": <parsed JSON or null>,
     "receivedAt": <unix time, float>, "injected": bool}

A call is recorded when it arrives; ``answered`` is null until the answer
is sent (only observable while an injected delay is running).

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STATUSES = ("BUILDING", "BUILDED", "FAILED", "CANCELLED")
LOG_TYPES = ("INFO", "STDOUT", "STDERR", "ERROR")
REGISTRY_TYPES = ("ecr", "ghcr", "docker")
API_PREFIX = "/api/webhooks/deployments/"
MAX_BODY_BYTES = 64 << 20


class BadRequest(Exception):
    """Malformed HTTP framing; the connection cannot be reused."""


class Invalid(Exception):
    """The body is well-formed JSON but breaks the contract (answer 400)."""


# --------------------------------------------------------------------- store


@dataclass
class FailRule:
    remaining: int
    status: int | None
    delay_seconds: float
    body_bytes: int = 0


class Store:
    """Recorded calls and pending fault rules, guarded by one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[dict[str, Any]] = []
        self._rules: dict[str, list[FailRule]] = {}
        self._seq = 0

    def record(self, kind: str, deployment_id: str, api_key_ok: bool, body: Any) -> dict[str, Any]:
        """Append a call (answered=None) and return the live record."""
        with self._lock:
            self._seq += 1
            call = {
                "seq": self._seq,
                "kind": kind,
                "deploymentId": deployment_id,
                "apiKeyOk": api_key_ok,
                "answered": None,
                "body": body,
                "receivedAt": time.time(),
                "injected": False,
            }
            self._calls.append(call)
            return call

    def set_answer(self, call: dict[str, Any], code: int | None, injected: bool) -> None:
        with self._lock:
            call["answered"] = code
            call["injected"] = injected

    def calls(self, deployment_id: str | None) -> list[dict[str, Any]]:
        with self._lock:
            selected = [
                c for c in self._calls if deployment_id is None or c["deploymentId"] == deployment_id
            ]
            return json.loads(json.dumps(selected))  # deep copy, outside-safe

    def add_rule(self, deployment_id: str, rule: FailRule) -> None:
        with self._lock:
            self._rules.setdefault(deployment_id, []).append(rule)

    def take_fault(self, deployment_id: str) -> FailRule | None:
        """Consume one use of the first pending rule for the deployment."""
        with self._lock:
            rules = self._rules.get(deployment_id)
            if not rules:
                return None
            rule = rules[0]
            rule.remaining -= 1
            if rule.remaining <= 0:
                rules.pop(0)
                if not rules:
                    del self._rules[deployment_id]
            return rule

    def reset(self, deployment_id: str | None) -> None:
        with self._lock:
            if deployment_id is None:
                self._calls.clear()
                self._rules.clear()
            else:
                self._calls = [c for c in self._calls if c["deploymentId"] != deployment_id]
                self._rules.pop(deployment_id, None)


# ---------------------------------------------------------------- validation


def _require_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{what} must be a JSON object")
    return value


def _check_log_type(value: Any, where: str) -> None:
    if value not in LOG_TYPES:
        raise Invalid(f"{where} must be one of {', '.join(LOG_TYPES)}")


def validate_status(body: dict[str, Any]) -> None:
    if body.get("status") not in STATUSES:
        raise Invalid(f"status must be one of {', '.join(STATUSES)}")
    if "logs" in body:
        logs = _require_object(body["logs"], "logs")
        if not isinstance(logs.get("text"), str):
            raise Invalid("logs.text must be a string")
        _check_log_type(logs.get("type"), "logs.type")
    if "error" in body and not isinstance(body["error"], str):
        raise Invalid("error must be a string")
    if "data" in body:
        data = _require_object(body["data"], "data")
        if "containerImageUri" in data and not isinstance(data["containerImageUri"], str):
            raise Invalid("data.containerImageUri must be a string")
        if "containerRegistryType" in data and data["containerRegistryType"] not in REGISTRY_TYPES:
            raise Invalid(f"data.containerRegistryType must be one of {', '.join(REGISTRY_TYPES)}")


def validate_logs(body: dict[str, Any]) -> None:
    if not isinstance(body.get("text"), str):
        raise Invalid("text must be a string")
    if "type" in body:
        _check_log_type(body["type"], "type")


# ------------------------------------------------------------------- console


def _first_line(text: str, limit: int = 140) -> str:
    line = text.split("\n", 1)[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe(kind: str, body: Any) -> str:
    """Human summary of a call body for the operator's log."""
    if not isinstance(body, dict):
        return kind
    if kind == "status":
        parts = [f"status {body.get('status')}"]
        if isinstance(body.get("error"), str):
            parts.append(f"error={_first_line(body['error'])}")
        data = body.get("data")
        if isinstance(data, dict) and data.get("containerImageUri"):
            parts.append(f"image={data.get('containerImageUri')}")
        logs = body.get("logs")
        if isinstance(logs, dict) and isinstance(logs.get("text"), str):
            parts.append(f"| {logs.get('type')}: {_first_line(logs['text'])}")
        return " ".join(parts)
    text = body.get("text")
    if not isinstance(text, str):
        return "logs"
    lines = text.count("\n") + 1
    return f"logs {body.get('type', 'STDOUT')} {lines} line{'s' if lines != 1 else ''}: {_first_line(text)}"


_print_lock = threading.Lock()


def console(line: str) -> None:
    with _print_lock:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


# ------------------------------------------------------------------- server


class DashboardHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "deployra-testbed-dashboard/1"
    timeout = 300

    store: Store
    api_key: str = ""

    # -- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):
                    raise BadRequest("truncated chunk size line")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as exc:
                    raise BadRequest("bad chunk size") from exc
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    return b"".join(parts)
                total += size
                if size < 0 or total > MAX_BODY_BYTES:
                    raise BadRequest("bad chunk size")
                data = self.rfile.read(size)
                if len(data) != size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise BadRequest("truncated chunk")
                parts.append(data)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError as exc:
            raise BadRequest("bad Content-Length") from exc
        if length < 0 or length > MAX_BODY_BYTES:
            raise BadRequest("bad Content-Length")
        data = self.rfile.read(length)
        if len(data) != length:
            raise BadRequest("truncated body")
        return data

    def _send_json(self, code: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_large(self, code: int, size: int) -> None:
        """An answer whose body is `size` bytes of text, streamed."""
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            part = chunk[: min(len(chunk), size - sent)]
            self.wfile.write(part)
            sent += len(part)

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        # Lets testbed/up check that the answer comes from the process it started.
        self.send_header("X-Testbed-Pid", str(os.getpid()))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Access logs go to stderr, console lines (one per call) to stdout.
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """The per-call console line replaces the default access log."""

    # -- dispatch

    def do_GET(self) -> None:  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/_testbed/health":
            self._send_json(200, {"ok": True})
        elif url.path == "/_testbed/calls":
            ids = urllib.parse.parse_qs(url.query).get("deploymentId")
            self._send_json(200, self.store.calls(ids[0] if ids else None))
        else:
            self._not_found()

    def do_POST(self) -> None:  # noqa: N802
        try:
            raw = self._read_body()
        except BadRequest as exc:
            self.close_connection = True
            self._send_json(400, {"error": f"bad request: {exc}"})
            return
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith(API_PREFIX):
            rest = path[len(API_PREFIX):]
            deployment_id, sep, kind = rest.rpartition("/")
            if sep and deployment_id and "/" not in deployment_id and kind in ("status", "logs"):
                self._contract_call(urllib.parse.unquote(deployment_id), kind, raw)
                return
        if path == "/_testbed/fail":
            self._control_fail(raw)
        elif path == "/_testbed/reset":
            self._control_reset(raw)
        else:
            self._not_found()

    def _not_found(self) -> None:
        console(f"!! {self.command} {self.path} -> 404 (not a contract endpoint)")
        self._send_json(404, {"error": "not found"})

    # -- contract

    def _contract_call(self, deployment_id: str, kind: str, raw: bytes) -> None:
        key = self.headers.get("x-api-key")
        api_key_ok = key is not None and hmac.compare_digest(key.encode(), self.api_key.encode())
        body: Any = None
        parse_error = None
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
            if not raw:
                parse_error = "empty body"
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            parse_error = f"invalid JSON: {exc}"
        call = self.store.record(kind, deployment_id, api_key_ok, body)

        rule = self.store.take_fault(deployment_id)
        injected = rule is not None and rule.status is not None
        if injected:
            self.store.set_answer(call, None, injected=True)
        if rule is not None and rule.delay_seconds > 0:
            time.sleep(rule.delay_seconds)
        if rule is not None and rule.status is not None:
            code, payload = rule.status, {"error": "injected failure"}
        else:
            code, payload = self._evaluate(kind, api_key_ok, body, parse_error)

        self.store.set_answer(call, code, injected)
        summary = describe(kind, body)
        note = "" if code == 200 else f" -> {code}" + (" (injected)" if injected else f" {payload.get('error')}")
        console(f"{deployment_id} {summary}{note}")
        try:
            if injected and rule is not None and rule.body_bytes:
                self._send_large(code, rule.body_bytes)
                return
            self._send_json(code, payload)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (e.g. its timeout fired during a delay).
            self.close_connection = True

    def _evaluate(self, kind: str, api_key_ok: bool, body: Any, parse_error: str | None) -> tuple[int, dict]:
        if not api_key_ok:
            return 401, {"error": "unauthorized"}
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return 400, {"error": "Content-Type must be application/json"}
        if parse_error:
            return 400, {"error": parse_error}
        try:
            _require_object(body, "body")
            (validate_status if kind == "status" else validate_logs)(body)
        except Invalid as exc:
            return 400, {"error": str(exc)}
        return 200, {"ok": True}

    # -- test control

    def _control_json(self, raw: bytes) -> dict[str, Any] | None:
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._send_json(400, {"error": f"invalid JSON: {exc}"})
            return None
        if not isinstance(value, dict):
            self._send_json(400, {"error": "body must be a JSON object"})
            return None
        return value

    def _control_fail(self, raw: bytes) -> None:
        req = self._control_json(raw)
        if req is None:
            return
        deployment_id = req.get("deploymentId")
        count = req.get("count", 1)
        delay = req.get("delaySeconds", 0) or 0
        status = req.get("status")
        body_bytes = req.get("bodyBytes", 0)
        if not isinstance(body_bytes, int) or body_bytes < 0:
            self._send_json(400, {"error": "bodyBytes must be a non-negative integer"})
            return
        if not isinstance(deployment_id, str) or not deployment_id:
            self._send_json(400, {"error": "deploymentId (string) is required"})
            return
        if not isinstance(count, int) or count < 1:
            self._send_json(400, {"error": "count must be a positive integer"})
            return
        if not isinstance(delay, (int, float)) or delay < 0:
            self._send_json(400, {"error": "delaySeconds must be a non-negative number"})
            return
        if status is None and delay == 0:
            status = 500
        if status is not None and (not isinstance(status, int) or not 100 <= status <= 599):
            self._send_json(400, {"error": "status must be an HTTP status code"})
            return
        self.store.add_rule(deployment_id, FailRule(count, status, float(delay), body_bytes))
        console(f"== fault rule: next {count} call(s) for {deployment_id} -> "
                f"{status if status is not None else 'normal'}"
                f"{f' after {delay}s' if delay else ''}")
        self._send_json(200, {"ok": True})

    def _control_reset(self, raw: bytes) -> None:
        req = self._control_json(raw)
        if req is None:
            return
        deployment_id = req.get("deploymentId")
        if deployment_id is not None and not isinstance(deployment_id, str):
            self._send_json(400, {"error": "deploymentId must be a string"})
            return
        self.store.reset(deployment_id)
        console(f"== reset {deployment_id or 'everything'}")
        self._send_json(200, {"ok": True})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3990)
    parser.add_argument("--api-key", default="testbed-api-key")
    args = parser.parse_args()

    DashboardHandler.store = Store()
    DashboardHandler.api_key = args.api_key
    server = ThreadingHTTPServer((args.host, args.port), DashboardHandler)
    server.daemon_threads = True
    console(f"dashboard: listening on http://{args.host}:{args.port}/api")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
