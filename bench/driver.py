#!/usr/bin/env python3
"""deployra-builder performance benchmark (driver of ``bench/run``).

Runs the same work two ways on the test bed, interleaved, several rounds:

  A  the builder: RPUSH a job -> BUILDED received by the dashboard;
  B  the plain tools: git clone --depth 1 + docker build + docker push.

and reports medians, spread and the ratio A/B, plus the daemon's resource
figures (start to ready, RSS idle and during builds, CPU per build, bytes
fetched, cancel latency). See bench/README.md.

Python 3.11 standard library only. Everything started here (daemons, temp
dirs, bench repositories, images, Redis keys) is removed at exit, also on
Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
STATE = Path(os.environ.get("TESTBED_STATE", "/var/lib/deployra-testbed"))
ALL_SCENARIOS = ("startup", "small", "history", "chatty", "batch", "cancel")
CLK_TCK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class BenchError(Exception):
    """A scenario cannot go on (daemon died, a build failed, a wait timed out)."""


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# ----------------------------------------------------------------- helpers


def cached_steps(lines: list[str]) -> int:
    """Steps the build took from cache: the classic builder's "Using
    cache", BuildKit's `#N CACHED`, leaving out BuildKit's FROM steps,
    which read as cached whenever the base image is local."""
    base = {m.group(1) for line in lines if (m := re.match(r"#(\d+) \[.*\] FROM ", line))}
    return sum(1 for line in lines
               if "Using cache" in line
               or ((m := re.fullmatch(r"#(\d+) CACHED", line)) and m.group(1) not in base))


def run(cmd: list[str], *, cwd: str | Path | None = None, timeout: float = 600,
        check: bool = True, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE,
        input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, timeout=timeout, env=env, stdout=stdout,
                              stderr=subprocess.PIPE, input=input_bytes)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(cmd[:4])}...: no result after {timeout}s") from exc
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise BenchError(f"{' '.join(redact_cmd(cmd))} failed ({proc.returncode}): {err}")
    return proc


def redact_cmd(cmd: list[str]) -> list[str]:
    return [re.sub(r"//[^/@]+@", "//***@", c) for c in cmd]


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip().strip('"').strip("'")
    return env


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    if not xs:
        return "n/a"
    return f"{fmt.format(median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def human_bytes(n: float) -> str:
    if n < 10 * 1024:
        return f"{n:.0f} B"
    if n < 10 * 1024 * 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


# ------------------------------------------------------------- Redis (RESP)


class Redis:
    """The few commands the bench needs, over one plain socket."""

    def __init__(self, host: str, port: int, username: str = "", password: str = "") -> None:
        self.sock = socket.create_connection((host, port), timeout=15)
        self.rfile = self.sock.makefile("rb")
        self.lock = threading.Lock()
        if password:
            self.cmd(*(["AUTH", username, password] if username else ["AUTH", password]))

    def cmd(self, *args: str | bytes | int) -> Any:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        data = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with self.lock:
            self.sock.sendall(data)
            return self._read()

    def _read(self) -> Any:
        line = self.rfile.readline()
        if not line:
            raise BenchError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise BenchError(f"Redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.rfile.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise BenchError(f"Redis: unexpected reply {line!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------- Docker Engine API


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class DockerAPI:
    """Read-only look-ups (and image removal) without spawning the CLI, so
    that 50 ms polling costs next to nothing."""

    def __init__(self) -> None:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        self.path = host[len("unix://"):] if host.startswith("unix://") else "/var/run/docker.sock"

    def call(self, method: str, url: str) -> tuple[int, Any]:
        conn = UnixHTTPConnection(self.path)
        try:
            conn.request(method, url)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(body) if body else None
        except json.JSONDecodeError:
            return resp.status, body.decode(errors="replace")

    def running_containers(self) -> list[dict[str, Any]]:
        status, data = self.call("GET", "/containers/json")
        return data if status == 200 and isinstance(data, list) else []

    def image_tags(self) -> list[str]:
        status, data = self.call("GET", "/images/json")
        tags: list[str] = []
        if status == 200 and isinstance(data, list):
            for img in data:
                tags.extend(t for t in (img.get("RepoTags") or []) if t != "<none>:<none>")
        return tags

    def remove_image(self, ref: str) -> None:
        self.call("DELETE", "/images/" + urllib.parse.quote(ref, safe="") + "?force=1")

    def kill_container(self, cid: str) -> None:
        self.call("POST", f"/containers/{cid}/kill")


# --------------------------------------------------------------- dashboard


class Dashboard:
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def calls(self, deployment_id: str) -> list[dict[str, Any]]:
        url = f"{self.base}/_testbed/calls?" + urllib.parse.urlencode({"deploymentId": deployment_id})
        with urllib.request.urlopen(url, timeout=15) as resp:
            return json.load(resp)

    @staticmethod
    def status_call(calls: list[dict[str, Any]], *statuses: str) -> dict[str, Any] | None:
        for c in calls:
            if c.get("kind") == "status" and (c.get("body") or {}).get("status") in statuses:
                return c
        return None

    @staticmethod
    def log_lines(calls: list[dict[str, Any]]) -> list[str]:
        lines: list[str] = []
        for c in calls:
            body = c.get("body") or {}
            text = body.get("text") if c.get("kind") == "logs" else (body.get("logs") or {}).get("text")
            if isinstance(text, str):
                lines.extend(text.split("\n"))
        return lines


# -------------------------------------------------------- git server log


class GitLog:
    """Bytes the test bed's git server sent, from its per-request log line:
    ``<time> <client> <METHOD> <path> <status> <bytes>B <secs>s ...``."""

    LINE = re.compile(r"^\S+ \S+ (GET|POST) (\S+) (\d{3}) (\d+)B ")

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def requests_since(self, offset: int, repo_path: str) -> tuple[list[tuple[str, str, int, int]], bool]:
        """(method, path, status, bytes) for requests on repo_path since
        offset; the flag is False when the log was truncated meanwhile (the
        git server was restarted), so the figure is not trustworthy."""
        trustworthy = True
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:
                    offset, trustworthy = 0, False
                f.seek(offset)
                data = f.read().decode(errors="replace")
        except OSError:
            return [], False
        out = []
        prefix = "/" + repo_path.strip("/") + ".git/"
        for line in data.splitlines():
            m = self.LINE.match(line)
            if m and m.group(2).startswith(prefix):
                out.append((m.group(1), m.group(2), int(m.group(3)), int(m.group(4))))
        return out, trustworthy

    def bytes_since(self, offset: int, repo_path: str, settle: float = 0.3) -> tuple[int | None, int]:
        time.sleep(settle)  # the line is written when the response ends
        reqs, ok = self.requests_since(offset, repo_path)
        return (sum(r[3] for r in reqs) if ok else None), len(reqs)


# ------------------------------------------------------------------ daemon


def proc_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cpu_ms(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # rest[0] is field 3 (state); utime=14, stime=15, cutime=16, cstime=17
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ticks * 1000.0 / CLK_TCK


class RssSampler:
    """Max VmRSS of a process, polled every 50 ms while active."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.max_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = proc_rss_kib(self.pid)
            if rss is not None:
                self.max_kib = max(self.max_kib, rss)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


STEP_RE = re.compile(r'step="?([a-z_]+)"? elapsed_ms=(\d+)')


class Daemon:
    def __init__(self, bench: "Bench", name: str, extra_env: dict[str, str] | None = None) -> None:
        self.bench = bench
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"daemon-{name}-", dir=bench.tmp))
        self.queue = f"bench-{bench.run_id}-{name}"
        self.worker_id = f"bench-{bench.run_id}-{name}-worker"
        self.cancel_channel = f"bench-{bench.run_id}-{name}:cancel"
        self.log_path = self.dir / "daemon.log"
        self.lines: list[tuple[float, str]] = []
        self._lines_lock = threading.Lock()
        self.ready_at: float | None = None
        self._ready = threading.Event()
        env = {k: v for k, v in bench.testbed_env.items() if not k.startswith("TESTBED_")}
        env.update({
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self.dir),
            "REDIS_QUEUE_NAME": self.queue,
            "REDIS_CANCEL_CHANNEL_NAME": self.cancel_channel,
            "WORKER_ID": self.worker_id,
            "WORK_DIR": str(self.dir / "work"),
            "LOG_LEVEL": "info",
            # Both sides start every round from the same cache state: a kept
            # build cache would hand later rounds of A, and B through the
            # Engine's local cache, the layers of the first round
            # (bench/cache.py measures that effect on its own).
            "BUILD_CACHE": "off",
            "DOCKER_BUILDER": bench.args.builder,
        })
        env.update(extra_env or {})
        bench.redis_keys.update({self.queue, f"{self.queue}:processing:{self.worker_id}", f"{self.queue}:dead"})
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen(
            [str(bench.binary)], env=env, cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        bench.daemons.append(self)
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if not self._ready.wait(30) or self.ready_at is None:
            raise BenchError(f"daemon {name}: no 'deployra-builder ready' line within 30 s:\n{self.tail()}")
        self.start_to_ready_ms = (self.ready_at - self.spawned_at) * 1000
        self.pid = self.proc.pid

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w") as out:
            for raw in self.proc.stdout:
                now = time.monotonic()
                line = ANSI.sub("", raw.decode(errors="replace")).rstrip("\n")
                out.write(line + "\n")
                out.flush()
                with self._lines_lock:
                    self.lines.append((now, line))
                if self.ready_at is None and "deployra-builder ready" in line:
                    self.ready_at = now
                    self._ready.set()
        self._ready.set()  # exited: unblock the waiter

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"daemon {self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        with self._lines_lock:
            return "\n".join(line for _, line in self.lines[-n:])

    def rss_kib(self) -> int | None:
        return proc_rss_kib(self.proc.pid)

    def cpu_ms(self) -> float | None:
        return proc_cpu_ms(self.proc.pid)

    def steps(self, deployment_id: str) -> dict[str, int]:
        """elapsed_ms of each 'step finished' line of one job."""
        out: dict[str, int] = {}
        with self._lines_lock:
            lines = [line for _, line in self.lines]
        for line in lines:
            if deployment_id in line and ("step finished" in line or "step ended" in line):
                m = STEP_RE.search(line)
                if m:
                    out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
        return out

    def stop(self, grace: float = 10) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass
        # Anything left in the daemon's own session (start_new_session: its
        # process group id is its pid), e.g. a tracee when --binary is a
        # wrapper such as strace.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._reader.join(timeout=5)


# ---------------------------------------------------------------- fixtures


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu build deploy "
         "image layer commit branch queue worker docker registry config module handler request "
         "response error value index table schema record cache token session client server route "
         "render update delete create select insert filter reduce buffer stream socket thread").split()


def rand_line(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))


def fast_import_blob(path: str, content: bytes) -> bytes:
    return b"M 100644 inline %s\ndata %d\n%s\n" % (path.encode(), len(content), content)


def fast_import_commit(n: int, parent: int | None, message: str, changes: Iterable[bytes], when: int) -> bytes:
    msg = message.encode()
    head = (b"commit refs/heads/main\nmark :%d\n"
            b"author Bench <bench@example.com> %d +0000\n"
            b"committer Bench <bench@example.com> %d +0000\n"
            b"data %d\n%s\n") % (n, when, when, len(msg), msg)
    if parent is not None:
        head += b"from :%d\n" % parent
    return head + b"".join(changes) + b"\n"


@dataclass
class Fixture:
    key: str           # small / history / chatty / cancel
    repo_name: str     # path under the git root, without .git
    bare: Path
    tip: str = ""
    commits: int = 0
    files: int = 0


class Fixtures:
    def __init__(self, bench: "Bench") -> None:
        self.bench = bench
        self.root = Path(bench.testbed_env["TESTBED_GIT_ROOT"]) / "bench" / bench.run_id
        self.made: dict[str, Fixture] = {}

    def _new_bare(self, key: str) -> Fixture:
        name = f"bench/{self.bench.run_id}/{key}"
        bare = self.root / f"{key}.git"
        bare.mkdir(parents=True)
        run(["git", "init", "--bare", "-q", "-b", "main", str(bare)])
        run(["git", "-C", str(bare), "config", "uploadpack.allowAnySHA1InWant", "true"])
        return Fixture(key, name, bare)

    def _import(self, fx: Fixture, stream: bytes) -> None:
        run(["git", "-C", str(fx.bare), "fast-import", "--quiet", "--done"],
            input_bytes=stream + b"done\n", timeout=600)
        run(["git", "-C", str(fx.bare), "repack", "-a", "-d", "-q"], timeout=600)
        fx.tip = run(["git", "-C", str(fx.bare), "rev-parse", "refs/heads/main"]).stdout.decode().strip()
        fx.commits = int(run(["git", "-C", str(fx.bare), "rev-list", "--count", "main"]).stdout)
        fx.files = len(run(["git", "-C", str(fx.bare), "ls-tree", "-r", "--name-only", "main"])
                       .stdout.splitlines())
        self.made[fx.key] = fx

    def simple(self, key: str, dockerfile: str, extra_files: dict[str, str]) -> Fixture:
        fx = self._new_bare(key)
        files = {"Dockerfile": dockerfile, **extra_files}
        changes = [fast_import_blob(p, c.encode()) for p, c in sorted(files.items())]
        self._import(fx, fast_import_commit(1, None, f"bench fixture {key}", changes, 1_700_000_000))
        return fx

    def small(self) -> Fixture:
        rid = self.bench.run_id
        return self.simple("small", (
            "FROM local/busybox:latest\n"
            f"RUN echo \"deployra bench small {rid}\"\n"
            "COPY . /app\n"
        ), {
            "README.md": "# bench small\n\nA tiny service.\n",
            "app/main.sh": "#!/bin/sh\necho hello from the bench\n",
            "app/config.json": '{"name": "bench", "port": 3000}\n',
            "app/lib/util.sh": "say() { echo \"$@\"; }\n",
            ".gitignore": "node_modules/\n",
        })

    def chatty(self) -> Fixture:
        rid = self.bench.run_id
        return self.simple("chatty", (
            "FROM local/busybox:latest\n"
            f"RUN echo \"deployra bench chatty {rid}\" && seq 1 20000\n"
            "COPY . /app\n"
        ), {"README.md": "# bench chatty\n\nPrints 20,000 lines while building.\n"})

    def cancel(self, marker: str) -> Fixture:
        return self.simple("cancel", (
            "FROM local/busybox:latest\n"
            # The waiting shell keeps the marker in its command line (a
            # shell whose last command is sleep may become sleep itself).
            f"RUN echo {marker} && sh -c 'sleep 300; true' {marker}\n"
        ), {"README.md": "# bench cancel\n"})

    def history(self, commits: int = 5000, files: int = 3000) -> Fixture:
        """`commits` commits, `files` files at the tip (60 directories), each
        commit after the first rewriting a few lines of 3 files. Written
        with git fast-import in one stream."""
        fx = self._new_bare("history")
        rng = random.Random(20240601)
        rid = self.bench.run_id
        dirs = max(1, files // 50)
        paths = [f"src/mod{d:02d}/file{i:04d}.txt" for i in range(files - 1) for d in [i % dirs]]
        content = {p: [rand_line(rng) for _ in range(rng.randint(12, 28))] for p in paths}
        dockerfile = ("FROM local/busybox:latest\n"
                      f"RUN echo \"deployra bench history {rid}\"\n"
                      "COPY . /app\n")
        when = 1_600_000_000
        parts = [fast_import_commit(
            1, None, "initial import",
            [fast_import_blob("Dockerfile", dockerfile.encode())]
            + [fast_import_blob(p, ("\n".join(content[p]) + "\n").encode()) for p in paths],
            when)]
        for n in range(2, commits + 1):
            changes = []
            for p in rng.sample(paths, 3):
                lines = content[p]
                for _ in range(rng.randint(1, 4)):
                    lines[rng.randrange(len(lines))] = rand_line(rng)
                if rng.random() < 0.3:
                    lines.append(rand_line(rng))
                changes.append(fast_import_blob(p, ("\n".join(lines) + "\n").encode()))
            parts.append(fast_import_commit(n, n - 1, f"change {n}", changes, when + n * 600))
        self._import(fx, b"".join(parts))
        return fx

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.root.parent.rmdir()  # .../git/bench, when no other run uses it
        except OSError:
            pass


# ------------------------------------------------------------------ results


@dataclass
class ARun:
    seconds: float
    pickup_s: float | None
    steps: dict[str, int]
    cpu_ms: float | None
    rss_max_kib: int
    calls: int
    log_lines: int
    cache_hits: int
    git_bytes: int | None
    git_requests: int
    image: str


@dataclass
class BRun:
    seconds: float
    clone_s: float
    build_s: float
    push_s: float
    cache_hits: int
    git_bytes: int | None
    output_lines: int = 0


@dataclass
class Scenario:
    key: str
    title: str
    target: float | None
    a: list[ARun] = field(default_factory=list)
    b: list[BRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------- bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = time.strftime("%m%d%H%M%S") + secrets.token_hex(2)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"deployra-bench-{self.run_id}-"))
        self.daemons: list[Daemon] = []
        self.redis_keys: set[str] = set()
        self.b_tags: set[str] = set()
        self.pushed: list[tuple[str, str]] = []  # (repository, digest) for registry cleanup
        self.ecr_repos: set[str] = set()
        self.docker = DockerAPI()
        self.testbed_env: dict[str, str] = {}
        self.binary = Path()
        self.fixtures: Fixtures | None = None
        self.scenarios: dict[str, Scenario] = {}
        self.startup_ms: list[float] = []
        self.idle_rss: list[int] = []
        self.idle_rss_after: dict[str, int] = {}
        self.daemon_hwm: dict[str, int] = {}
        self.bytes_report: dict[str, Any] = {}
        self.cancel_report: dict[str, Any] = {}
        self.batch_report: dict[str, Any] = {}
        self.machine: dict[str, str] = {}
        self.started_wall = time.time()

    # ---------------------------------------------------------- setup

    def testbed_healthy(self) -> list[str]:
        """Which test-bed services do not answer (empty list: all fine)."""
        bad = []
        def http_ok(url: str, ctx: ssl.SSLContext | None = None, auth: str | None = None) -> bool:
            req = urllib.request.Request(url)
            if auth:
                req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
                    return r.status < 500
            except urllib.error.HTTPError as e:
                return e.code < 500
            except Exception:
                return False
        env_path = STATE / "env"
        if not env_path.exists():
            return ["env file"]
        env = read_env_file(env_path)
        try:
            r = Redis(env["REDIS_HOST"], int(env["REDIS_PORT"]))
            if r.cmd("PING") != "PONG":
                bad.append("redis")
            r.close()
        except Exception:
            bad.append("redis")
        try:
            if self.docker.call("GET", "/_ping")[0] != 200:
                bad.append("dockerd")
        except Exception:
            bad.append("dockerd")
        try:
            ctx = ssl.create_default_context(cafile=env["TESTBED_REGISTRY_CA"])
            if not http_ok(f"https://{env['TESTBED_REGISTRY_HOST']}/v2/", ctx,
                           f"{env['TESTBED_REGISTRY_USERNAME']}:{env['TESTBED_REGISTRY_PASSWORD']}"):
                bad.append("registry")
        except Exception:
            bad.append("registry")
        if not http_ok(env["AWS_ENDPOINT_URL"] + "/moto-api/"):
            bad.append("moto")
        if not http_ok(env["TESTBED_GIT_URL"] + "/"):
            bad.append("git server")
        if not http_ok(env["TESTBED_DASHBOARD_URL"] + "/_testbed/health"):
            bad.append("dashboard")
        return bad

    def setup(self) -> None:
        bad = self.testbed_healthy()
        if self.args.testbed_up or bad:
            # testbed/up restarts the git server and the dashboard, which
            # would disturb tests running at the same time: only when needed.
            log(f"test bed: running testbed/up ({'forced' if self.args.testbed_up else 'not answering: ' + ', '.join(bad)})")
            proc = run([str(REPO_ROOT / "testbed" / "up")], check=False, timeout=600, stdout=None)
            if proc.returncode != 0:
                log("test bed: testbed/up failed; running testbed/setup first")
                run([str(REPO_ROOT / "testbed" / "setup")], timeout=1800, stdout=None)
                run([str(REPO_ROOT / "testbed" / "up")], timeout=600, stdout=None)
        else:
            log("test bed: every service answers (testbed/up not needed; --testbed-up forces it)")
        self.testbed_env = read_env_file(STATE / "env")
        env = self.testbed_env
        self.registry = env["TESTBED_REGISTRY_HOST"]
        self.dash = Dashboard(env["TESTBED_DASHBOARD_URL"])
        self.redis = Redis(env["REDIS_HOST"], int(env["REDIS_PORT"]),
                           env.get("REDIS_USERNAME", ""), env.get("REDIS_PASSWORD", ""))
        self.gitlog = GitLog(STATE / "logs" / "gitserver.log")
        self.git_url = env["TESTBED_GIT_URL"]
        u = urllib.parse.urlsplit(self.git_url)
        self.git_auth_url = (f"{u.scheme}://{urllib.parse.quote(env['TESTBED_GIT_USERNAME'])}:"
                             f"{urllib.parse.quote(env['TESTBED_GIT_PASSWORD'])}@{u.netloc}")
        # B's docker login, in a throwaway config directory.
        self.docker_config = self.tmp / "docker-config"
        self.docker_config.mkdir()
        run(["docker", "--config", str(self.docker_config), "login", "-u", env["TESTBED_REGISTRY_USERNAME"],
             "--password-stdin", self.registry], input_bytes=env["TESTBED_REGISTRY_PASSWORD"].encode(), timeout=60)
        self.build_binary()
        self.machine_info()

    def build_binary(self) -> None:
        if self.args.binary:
            self.binary = Path(self.args.binary).resolve()
        else:
            target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO_ROOT / "target")
            if not target.is_absolute():
                target = REPO_ROOT / target
            self.binary = target / "release" / "deployra-builder"
            if not self.args.no_build:
                log(f"building: cargo build --release (target dir {target})")
                t0 = time.monotonic()
                proc = subprocess.run(["cargo", "build", "--release", "--bin", "deployra-builder"],
                                      cwd=REPO_ROOT, timeout=3600, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
                if proc.returncode != 0:
                    raise BenchError("cargo build --release failed:\n" + proc.stderr.decode(errors="replace")[-4000:])
                log(f"building: done in {time.monotonic() - t0:.0f} s")
        if not self.binary.is_file():
            raise BenchError(f"no daemon binary at {self.binary}")
        self.binary_info = f"{self.binary} ({self.binary.stat().st_size / 1e6:.1f} MB, built " \
                           f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(self.binary.stat().st_mtime))})"
        try:
            head = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], timeout=10).stdout.decode().strip()
            dirty = run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                        timeout=10).stdout.decode().strip()
            self.source_info = head + (" + uncommitted changes in src/" if dirty else "")
        except BenchError:
            self.source_info = "unknown"

    def machine_info(self) -> None:
        m = self.machine
        m["nproc"] = str(os.cpu_count())
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    m["cpu"] = line.split(":", 1)[1].strip()
                    break
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal"):
                    m["memory"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        except OSError:
            pass
        m["kernel"] = os.uname().release
        try:
            m["docker"] = run(["docker", "version", "--format",
                               "server {{.Server.Version}} (API {{.Server.APIVersion}}), client {{.Client.Version}}"],
                              timeout=30).stdout.decode().strip()
        except BenchError:
            m["docker"] = "unknown"
        m["git"] = run(["git", "--version"], timeout=10).stdout.decode().strip()
        m["load at start"] = " ".join(open("/proc/loadavg").read().split()[:3])

    # ---------------------------------------------------------- A path

    def job(self, fx: Fixture, deployment_id: str, service_id: str, commit: str = "") -> str:
        env = self.testbed_env
        return json.dumps({
            "deploymentId": deployment_id,
            "serviceId": service_id,
            "commitSha": commit,
            "branch": "main",
            "repositoryName": fx.repo_name,
            "runtimeFilePath": None,
            "gitProvider": {
                "type": "CUSTOM", "installationId": None, "githubAccount": None,
                "url": self.git_url, "username": env["TESTBED_GIT_USERNAME"],
                "password": env["TESTBED_GIT_PASSWORD"],
            },
            "environmentVariables": [],
            "ports": [{"servicePort": 80, "containerPort": 3000}],
        })

    def fresh(self, what: str) -> str:
        self._counter = getattr(self, "_counter", 0) + 1
        return f"bench-{self.run_id}-{what}-{self._counter}"

    def wait_final(self, daemon: Daemon, deployment_id: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            calls = self.dash.calls(deployment_id)
            if self.dash.status_call(calls, "BUILDED", "FAILED", "CANCELLED"):
                return calls
            daemon.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{deployment_id}: no final status after {timeout:.0f} s")
            time.sleep(0.2)

    def wait_images_gone(self, prefix: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(t.startswith(prefix) for t in self.docker.image_tags()):
                return True
            time.sleep(0.1)
        return False

    def run_a(self, daemon: Daemon, fx: Fixture, commit: str = "") -> ARun:
        dep, svc = self.fresh(f"{fx.key}-dep"), self.fresh(f"{fx.key}-a")
        repo_uri = f"{self.registry}/deployra/{svc}"
        self.ecr_repos.add(f"deployra/{svc}")
        payload = self.job(fx, dep, svc, commit)
        cpu0 = daemon.cpu_ms()
        git_mark = self.gitlog.mark()
        with RssSampler(daemon.pid) as rss:
            t_push = time.time()
            self.redis.cmd("RPUSH", daemon.queue, payload)
            calls = self.wait_final(daemon, dep, self.args.build_timeout)
        final = self.dash.status_call(calls, "BUILDED", "FAILED", "CANCELLED")
        assert final is not None
        body = final["body"]
        if body["status"] != "BUILDED":
            raise BenchError(f"{dep}: {body['status']}: {body.get('error')}\n{daemon.tail(15)}")
        seconds = final["receivedAt"] - t_push
        building = self.dash.status_call(calls, "BUILDING")
        image = (body.get("data") or {}).get("containerImageUri", "")
        if "@" in image:
            self.pushed.append((f"deployra/{svc}", image.split("@", 1)[1]))
        # The daemon removes its tags after BUILDED; wait so that B starts
        # from the same cache state, and count that cleanup in its CPU time.
        if not self.wait_images_gone(repo_uri + ":"):
            log(f"  warning: the daemon's image {repo_uri} is still there after 60 s; removing it")
            for t in self.docker.image_tags():
                if t.startswith(repo_uri + ":"):
                    self.docker.remove_image(t)
        time.sleep(0.2)  # the step/job lines reach our reader
        cpu1 = daemon.cpu_ms()
        git_bytes, git_reqs = self.gitlog.bytes_since(git_mark, fx.repo_name)
        lines = self.dash.log_lines(calls)
        return ARun(
            seconds=seconds,
            pickup_s=(building["receivedAt"] - t_push) if building else None,
            steps=daemon.steps(dep),
            cpu_ms=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            rss_max_kib=rss.max_kib,
            calls=len(calls),
            log_lines=len(lines),
            cache_hits=cached_steps(lines),
            git_bytes=git_bytes,
            git_requests=git_reqs,
            image=image,
        )

    # ---------------------------------------------------------- B path

    def build_cli(self) -> list[str]:
        """The docker CLI for B's build. BuildKit: the docker.io package's
        own CLI, which builds with BuildKit without buildx (the newer CLI
        first on PATH here refuses to); classic: whichever is first."""
        if self.args.builder == "buildkit" and Path("/usr/bin/docker").exists():
            return ["/usr/bin/docker"]
        return ["docker"]

    def no_cache(self) -> list[str]:
        """BuildKit keeps every round's steps in its build cache, images or
        not, so B builds without it, as A does (BUILD_CACHE=off). The
        classic builder's cache goes with the images B removes."""
        return ["--no-cache"] if self.args.builder == "buildkit" else []

    def build_env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_BUILDKIT": "1" if self.args.builder == "buildkit" else "0"}

    def run_b(self, fx: Fixture) -> BRun:
        svc = self.fresh(f"{fx.key}-b")
        work = Path(tempfile.mkdtemp(prefix=f"b-{fx.key}-", dir=self.tmp))
        src = work / "src"
        cfg = ["docker", "--config", str(self.docker_config)]
        url = f"{self.git_auth_url}/{fx.repo_name}.git"
        git_mark = self.gitlog.mark()
        tag = ""
        try:
            t0 = time.time()
            run(["git", "clone", "-q", "--depth", "1", "--single-branch", "-b", "main", url, str(src)],
                timeout=self.args.build_timeout)
            t1 = time.time()
            sha = run(["git", "-C", str(src), "rev-parse", "HEAD"], timeout=30).stdout.decode().strip()
            # What the daemon's prepare step does too: keep .git out of the
            # context, so both paths build the same image.
            with open(src / ".dockerignore", "a") as f:
                f.write("\n.git\n")
            tag = f"{self.registry}/deployra/{svc}:{sha}"
            self.b_tags.add(tag)
            build_out = work / "build.out"
            with open(build_out, "wb") as out:
                run(self.build_cli() + ["--config", str(self.docker_config), "build"] + self.no_cache()
                    + ["-t", tag, str(src)],
                    timeout=self.args.build_timeout, stdout=out, env=self.build_env())
            t2 = time.time()
            push = run(cfg + ["push", tag], timeout=self.args.build_timeout)
            t3 = time.time()
            m = re.search(rb"digest: (sha256:[0-9a-f]{64})", push.stdout)
            if m:
                self.pushed.append((f"deployra/{svc}", m.group(1).decode()))
            build_text = build_out.read_bytes()
            cache_hits = build_text.count(b"Using cache") + build_text.count(b" CACHED")
            output_lines = build_text.count(b"\n") + push.stdout.count(b"\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if tag:
            run(cfg + ["rmi", tag], check=False, timeout=120)
            self.b_tags.discard(tag)
        git_bytes, _ = self.gitlog.bytes_since(git_mark, fx.repo_name, settle=0.1)
        return BRun(seconds=t3 - t0, clone_s=t1 - t0, build_s=t2 - t1, push_s=t3 - t2,
                    cache_hits=cache_hits, git_bytes=git_bytes, output_lines=output_lines)

    # ---------------------------------------------------------- scenarios

    def new_daemon(self, name: str, extra_env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(self, name, extra_env)
        self.startup_ms.append(d.start_to_ready_ms)
        time.sleep(2.0)  # idle: blocked on BLMOVE
        rss = d.rss_kib()
        if rss is not None:
            self.idle_rss.append(rss)
        log(f"daemon {name}: pid {d.pid}, start→ready {d.start_to_ready_ms:.0f} ms, idle RSS {mib(rss or 0)}")
        return d

    def finish_daemon(self, d: Daemon) -> None:
        time.sleep(1.0)
        rss = d.rss_kib()
        if rss is not None:
            self.idle_rss_after[d.name] = rss
        try:
            for line in open(f"/proc/{d.pid}/status"):
                if line.startswith("VmHWM:"):
                    self.daemon_hwm[d.name] = int(line.split()[1])
        except OSError:
            pass
        d.stop()

    def scenario_startup(self) -> None:
        n = max(self.args.rounds, 5)
        log(f"[startup] {n} starts of an idle daemon")
        for i in range(n):
            d = self.new_daemon(f"startup{i + 1}")
            self.finish_daemon(d)

    def scenario_ab(self, key: str, title: str, target: float, fx: Fixture, commit: str = "") -> Scenario:
        sc = Scenario(key, title, target)
        self.scenarios[key] = sc
        d = self.new_daemon(key)
        try:
            total = self.args.warmup + self.args.rounds
            for i in range(total):
                warm = i < self.args.warmup
                label = "warm-up" if warm else f"round {i - self.args.warmup + 1}/{self.args.rounds}"
                try:
                    a = self.run_a(d, fx, commit)
                except BenchError as e:
                    sc.failures.append(f"A {label}: {e}")
                    log(f"[{key}] {label} A failed: {e}")
                    d.check_alive()
                    continue
                try:
                    b = self.run_b(fx)
                except BenchError as e:
                    sc.failures.append(f"B {label}: {e}")
                    log(f"[{key}] {label} B failed: {e}")
                    continue
                steps = " ".join(f"{k} {v}" for k, v in a.steps.items())
                log(f"[{key}] {label}: A {a.seconds:.2f} s (pickup {1000 * (a.pickup_s or 0):.0f} ms; {steps} ms;"
                    f" cpu {a.cpu_ms or 0:.0f} ms; rss max {mib(a.rss_max_kib)}; {a.calls} calls)"
                    f"  B {b.seconds:.2f} s (clone {b.clone_s:.2f}, build {b.build_s:.2f}, push {b.push_s:.2f})"
                    f"  A/B {a.seconds / b.seconds:.2f}")
                if a.cache_hits or b.cache_hits:
                    sc.notes.append(f"{label}: layer cache used (A {a.cache_hits}, B {b.cache_hits} steps)")
                if not warm:
                    sc.a.append(a)
                    sc.b.append(b)
        finally:
            self.finish_daemon(d)
        return sc

    def scenario_history(self) -> None:
        assert self.fixtures
        log("[history] generating 5,000 commits × 3,000 files with git fast-import")
        t0 = time.monotonic()
        fx = self.fixtures.history()
        log(f"[history] {fx.commits} commits, {fx.files} files, tip {fx.tip[:12]} ({time.monotonic() - t0:.1f} s)")
        self.measure_git_bytes(fx)
        sc = self.scenario_ab("history", f"long history ({fx.commits:,} commits, {fx.files:,} files), commitSha = tip",
                              1.10, fx, commit=fx.tip)
        daemon_bytes = [a.git_bytes for a in sc.a if a.git_bytes is not None]
        self.bytes_report["daemon"] = daemon_bytes
        self.bytes_report["daemon_requests"] = [a.git_requests for a in sc.a]
        self.bytes_report["b_clone"] = [b.git_bytes for b in sc.b if b.git_bytes is not None]

    def measure_git_bytes(self, fx: Fixture) -> None:
        """Reference transfers through the same git server: full clone and a
        depth-1 fetch of the tip commit by id."""
        rep = self.bytes_report
        rep["bare_du"] = int(run(["du", "-sb", str(fx.bare)]).stdout.split()[0])
        cov = run(["git", "-C", str(fx.bare), "count-objects", "-v"]).stdout.decode()
        rep["objects"] = sum(int(l.split()[1]) for l in cov.splitlines() if l.split()[0] in ("count:", "in-pack:"))
        url = f"{self.git_auth_url}/{fx.repo_name}.git"
        work = Path(tempfile.mkdtemp(prefix="bytes-", dir=self.tmp))
        try:
            mark = self.gitlog.mark()
            run(["git", "clone", "-q", "--bare", url, str(work / "full.git")], timeout=600)
            rep["full_clone"], _ = self.gitlog.bytes_since(mark, fx.repo_name)
            run(["git", "init", "-q", str(work / "shallow")])
            mark = self.gitlog.mark()
            run(["git", "-C", str(work / "shallow"), "fetch", "-q", "--depth", "1", url, fx.tip], timeout=600)
            rep["fetch_depth1_sha"], _ = self.gitlog.bytes_since(mark, fx.repo_name)
            # The same, as protocol v0 (what libgit2 speaks).
            run(["git", "init", "-q", str(work / "shallow0")])
            mark = self.gitlog.mark()
            run(["git", "-c", "protocol.version=0", "-C", str(work / "shallow0"), "fetch", "-q", "--depth", "1",
                 url, fx.tip], timeout=600)
            rep["fetch_depth1_sha_v0"], _ = self.gitlog.bytes_since(mark, fx.repo_name)
            tree = run(["git", "-C", str(fx.bare), "ls-tree", "-r", "-l", fx.tip]).stdout.decode()
            rep["tip_tree_bytes"] = sum(int(l.split()[3]) for l in tree.splitlines() if l.split()[3] != "-")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"[history] bytes: full clone {human_bytes(rep['full_clone'] or 0)}, "
            f"fetch --depth 1 <sha> {human_bytes(rep['fetch_depth1_sha'] or 0)} "
            f"(v0 {human_bytes(rep['fetch_depth1_sha_v0'] or 0)}), bare repo {human_bytes(rep['bare_du'])}")

    def scenario_batch(self) -> None:
        assert self.fixtures
        fx = self.fixtures.made.get("small") or self.fixtures.small()
        jobs = 10
        sc1 = Scenario("batch1", f"batch of {jobs} small jobs, BUILD_CONCURRENCY=1", None)
        sc2 = Scenario("batch2", f"batch of {jobs} small jobs, BUILD_CONCURRENCY=2", None)
        self.scenarios["batch1"], self.scenarios["batch2"] = sc1, sc2
        d1 = self.new_daemon("batch-c1", {"BUILD_CONCURRENCY": "1"})
        d2 = self.new_daemon("batch-c2", {"BUILD_CONCURRENCY": "2"})
        b_times: list[float] = []
        results: dict[str, dict[str, list[Any]]] = {"batch1": {"t": [], "cpu": [], "rss": [], "overlap": []},
                                                    "batch2": {"t": [], "cpu": [], "rss": [], "overlap": []}}
        try:
            for r in range(self.args.rounds):
                for sc, d in ((sc1, d1), (sc2, d2)):
                    try:
                        t, cpu, rss, overlap = self.run_batch_a(d, fx, jobs)
                    except BenchError as e:
                        sc.failures.append(f"round {r + 1}: {e}")
                        log(f"[{sc.key}] round {r + 1} failed: {e}")
                        d.check_alive()
                        continue
                    res = results[sc.key]
                    res["t"].append(t)
                    res["cpu"].append(cpu)
                    res["rss"].append(rss)
                    res["overlap"].append(overlap)
                    log(f"[{sc.key}] round {r + 1}/{self.args.rounds}: {jobs} jobs in {t:.1f} s = "
                        f"{jobs * 60 / t:.1f} jobs/min (max {overlap} at once; cpu {cpu / jobs:.0f} ms/job;"
                        f" rss max {mib(rss)})")
                try:
                    t0 = time.time()
                    for _ in range(jobs):
                        self.run_b(fx)
                    b_times.append(time.time() - t0)
                    log(f"[batch B] round {r + 1}/{self.args.rounds}: {jobs} sequential clone+build+push in "
                        f"{b_times[-1]:.1f} s = {jobs * 60 / b_times[-1]:.1f} jobs/min")
                except BenchError as e:
                    sc1.failures.append(f"B round {r + 1}: {e}")
                    log(f"[batch B] round {r + 1} failed: {e}")
        finally:
            self.finish_daemon(d1)
            self.finish_daemon(d2)
        self.batch_report = {"jobs": jobs, "b": b_times, **results}

    def run_batch_a(self, d: Daemon, fx: Fixture, jobs: int) -> tuple[float, float, int, int]:
        deps = []
        payloads = []
        for _ in range(jobs):
            dep, svc = self.fresh("batch-dep"), self.fresh("batch-a")
            self.ecr_repos.add(f"deployra/{svc}")
            deps.append(dep)
            payloads.append(self.job(fx, dep, svc))
        cpu0 = d.cpu_ms() or 0.0
        deadline = time.monotonic() + self.args.build_timeout * 2
        finals: dict[str, dict[str, Any]] = {}
        intervals: list[tuple[float, float]] = []
        with RssSampler(d.pid) as rss:
            t_push = time.time()
            self.redis.cmd("RPUSH", d.queue, *payloads)
            while len(finals) < jobs:
                for dep in deps:
                    if dep in finals:
                        continue
                    calls = self.dash.calls(dep)
                    final = self.dash.status_call(calls, "BUILDED", "FAILED", "CANCELLED")
                    if final:
                        if final["body"]["status"] != "BUILDED":
                            raise BenchError(f"{dep}: {final['body']['status']}: {final['body'].get('error')}")
                        finals[dep] = final
                        building = self.dash.status_call(calls, "BUILDING")
                        if building:
                            intervals.append((building["receivedAt"], final["receivedAt"]))
                        image = (final["body"].get("data") or {}).get("containerImageUri", "")
                        if "@" in image:
                            self.pushed.append((image.split("@")[0].split("/", 1)[1], image.split("@")[1]))
                d.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"only {len(finals)}/{jobs} jobs finished in time")
                time.sleep(0.25)
        elapsed = max(f["receivedAt"] for f in finals.values()) - t_push
        self.wait_images_gone(f"{self.registry}/deployra/bench-{self.run_id}-batch-a-")
        time.sleep(0.2)
        cpu = (d.cpu_ms() or 0.0) - cpu0
        # Most builds running at the same moment (BUILDING..BUILDED).
        events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
        cur = best = 0
        for _, delta in events:
            cur += delta
            best = max(best, cur)
        return elapsed, cpu, rss.max_kib, best

    def scenario_cancel(self) -> None:
        assert self.fixtures
        marker = f"started-{self.run_id}"
        fx = self.fixtures.cancel(marker)
        rep = self.cancel_report
        rep.update({"to_cancelled": [], "to_gone": [], "supported": None, "notes": []})
        d = self.new_daemon("cancel", {"BUILD_TIMEOUT_SECS": "120"})
        try:
            for r in range(self.args.cancel_rounds):
                ok = self.run_cancel_round(d, fx, marker, r + 1)
                if not ok:
                    break
        finally:
            self.finish_daemon(d)

    def find_marker_step(self, marker: str) -> str | None:
        """The running build step that printed `marker`: the classic
        builder's container ("c:<id>"), or the process BuildKit runs it as,
        which is no container of the Engine's ("p:<pid>")."""
        for c in self.docker.running_containers():
            if marker in (c.get("Command") or ""):
                return f"c:{c['Id']}"
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                return f"p:{pid}"
        return None

    def kill_step(self, step: str) -> None:
        kind, ident = step.split(":", 1)
        if kind == "c":
            self.docker.kill_container(ident)
        else:
            try:
                os.kill(int(ident), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run_cancel_round(self, d: Daemon, fx: Fixture, marker: str, n: int) -> bool:
        rep = self.cancel_report
        dep, svc = self.fresh("cancel-dep"), self.fresh("cancel-a")
        self.ecr_repos.add(f"deployra/{svc}")
        self.redis.cmd("RPUSH", d.queue, self.job(fx, dep, svc))
        # 1. the build is running: its "started" line reached the dashboard.
        deadline = time.monotonic() + 120
        while True:
            calls = self.dash.calls(dep)
            if any(line.strip() == marker for line in self.dash.log_lines(calls)):
                break
            final = self.dash.status_call(calls, "BUILDED", "FAILED", "CANCELLED")
            if final:
                raise BenchError(f"cancel: {dep} ended {final['body']['status']} before it started")
            d.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"cancel: no '{marker}' line for {dep} within 120 s")
            time.sleep(0.1)
        cid = None
        deadline = time.monotonic() + 10
        while cid is None and time.monotonic() < deadline:
            cid = self.find_marker_step(marker)
            if cid is None:
                time.sleep(0.05)
        # 2. cancel, then watch the dashboard and the container.
        t_pub = time.time()
        receivers = self.redis.cmd("PUBLISH", d.cancel_channel, json.dumps({"deploymentId": dep}))
        gone_at = None
        cancelled = None
        other_final = None
        last_dash = 0.0
        deadline = time.monotonic() + self.args.cancel_wait
        while time.monotonic() < deadline:
            now = time.time()
            if gone_at is None and cid is not None and self.find_marker_step(marker) != cid:
                gone_at = now
            if time.monotonic() - last_dash >= 0.1:
                last_dash = time.monotonic()
                calls = self.dash.calls(dep)
                final = self.dash.status_call(calls, "BUILDED", "FAILED", "CANCELLED")
                if final and final["body"]["status"] == "CANCELLED":
                    cancelled = final
                elif final:
                    other_final = final
            if (cancelled or other_final) and (gone_at is not None or cid is None):
                break
            time.sleep(0.05)
        if cancelled is None:
            rep["supported"] = False
            why = f"no CANCELLED within {self.args.cancel_wait:.0f} s of PUBLISH ({receivers} subscriber(s) on the channel)"
            if other_final:
                why += f"; the job ended {other_final['body']['status']}"
            if gone_at is not None:
                why += f"; the build step stopped after {gone_at - t_pub:.2f} s"
            rep["notes"].append(why)
            log(f"[cancel] not supported: {why}")
            # Stop the build ourselves: the RUN fails, the daemon reports FAILED.
            if cid and self.find_marker_step(marker) == cid:
                self.kill_step(cid)
            try:
                self.wait_final(d, dep, 60)
            except BenchError as e:
                rep["notes"].append(f"after killing the build step: {e}")
            return False
        rep["supported"] = True
        rep["to_cancelled"].append(cancelled["receivedAt"] - t_pub)
        if gone_at is not None:
            rep["to_gone"].append(gone_at - t_pub)
        else:
            rep["notes"].append(f"round {n}: build step still running {self.args.cancel_wait:.0f} s after PUBLISH")
            left = self.find_marker_step(marker)
            if left:
                self.kill_step(left)
        log(f"[cancel] round {n}: PUBLISH→CANCELLED {1000 * rep['to_cancelled'][-1]:.0f} ms, "
            f"PUBLISH→build step gone {('%.0f ms' % (1000 * (gone_at - t_pub))) if gone_at else 'n/a'}")
        time.sleep(0.5)
        return True

    # ---------------------------------------------------------- report

    def report(self) -> str:
        out: list[str] = []
        w = out.append
        date = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.started_wall))
        w(f"# deployra-builder benchmark, {date}\n")
        w(f"`./bench/run {' '.join(sys.argv[1:])}`: {self.args.rounds} measured round(s) per scenario after "
          f"{self.args.warmup} warm-up round(s), A and B interleaved (A, B, A, B, ...).\n")
        w("A = the builder (RPUSH → BUILDED received by the dashboard); B = `git clone --depth 1` + "
          "`docker build` + `docker push` of the same repository. Seconds, median (min–max).\n")
        w("| scenario | A: builder | B: git + docker | A/B | target | result |")
        w("|---|---|---|---|---|---|")
        for key in ("small", "history", "chatty"):
            sc = self.scenarios.get(key)
            if not sc:
                continue
            a = [x.seconds for x in sc.a]
            b = [x.seconds for x in sc.b]
            if a and b:
                ratio = median(a) / median(b)
                verdict = "pass" if ratio <= (sc.target or 99) else "FAIL"
                w(f"| {sc.title} | {spread(a)} | {spread(b)} | {ratio:.2f} | ≤ {sc.target:.2f} | {verdict} |")
            else:
                w(f"| {sc.title} | {spread(a)} | {spread(b)} | n/a | ≤ {sc.target:.2f} | no data |")
        br = self.batch_report
        if br:
            jobs = br["jobs"]
            bt = br["b"]
            bjpm = [jobs * 60 / t for t in bt]
            for key in ("batch1", "batch2"):
                sc = self.scenarios[key]
                at = br[key]["t"]
                ajpm = [jobs * 60 / t for t in at]
                ratio = f"{median(at) / median(bt):.2f}" if at and bt else "n/a"
                w(f"| {sc.title}, jobs/min | {spread(ajpm, '{:.1f}')} | {spread(bjpm, '{:.1f}')} (sequential) "
                  f"| {ratio} (time) | — | info |")
        w("")

        w("## The daemon's resources\n")
        w("| measure | value | target | result |")
        w("|---|---|---|---|")
        if self.startup_ms:
            v = median(self.startup_ms)
            w(f"| process start → \"deployra-builder ready\" | {spread(self.startup_ms, '{:.0f}')} ms "
              f"(n={len(self.startup_ms)}) | < 300 ms | {'pass' if v < 300 else 'FAIL'} |")
        if self.idle_rss:
            v = max(self.idle_rss)
            w(f"| RSS idle, 2 s after ready | median {mib(median(self.idle_rss))}, max {mib(v)} "
              f"(n={len(self.idle_rss)}) | < 30 MB | {'pass' if v * 1024 < 30e6 else 'FAIL'} |")
        if self.idle_rss_after:
            after = {k: v for k, v in self.idle_rss_after.items() if not k.startswith("startup")}
            if after:
                w("| RSS idle after its builds | " + ", ".join(f"{k} {mib(v)}" for k, v in after.items()) + " | — | info |")
        for key in ("small", "history", "chatty"):
            sc = self.scenarios.get(key)
            if sc and sc.a:
                rss = [x.rss_max_kib for x in sc.a]
                cpu = [x.cpu_ms for x in sc.a if x.cpu_ms is not None]
                w(f"| {key}: RSS during a build (max of 50 ms samples) | {mib(max(rss))} "
                  f"(per build {spread([r / 1024 for r in rss], '{:.1f}')} MiB) | — | info |")
                w(f"| {key}: daemon CPU time per build (utime+stime) | {spread(cpu, '{:.0f}')} ms | — | info |")
        for key in ("batch1", "batch2"):
            res = br.get(key) if br else None
            if res and res["t"]:
                w(f"| {key}: RSS max during the batch / CPU per job | {mib(max(res['rss']))} / "
                  f"{spread([c / br['jobs'] for c in res['cpu']], '{:.0f}')} ms | — | info |")
                w(f"| {key}: most jobs building at once | {max(res['overlap'])} | "
                  f"{'2 if BUILD_CONCURRENCY works' if key == 'batch2' else '1'} | "
                  f"{'info' if key == 'batch1' else ('pass' if max(res['overlap']) >= 2 else 'not implemented?')} |")
        rep = self.bytes_report
        if rep:
            daemon = rep.get("daemon") or []
            ref = rep.get("fetch_depth1_sha_v0") or rep.get("fetch_depth1_sha")
            verdict = "no data"
            if daemon and ref:
                verdict = "pass" if max(daemon) <= ref * 1.10 + 4096 and max(daemon) < (rep.get("full_clone") or 1e18) / 2 else "FAIL"
            w(f"| history: bytes the daemon fetched (git server log) | "
              f"{', '.join(human_bytes(x) for x in daemon) or 'n/a'} in {', '.join(map(str, rep.get('daemon_requests') or [])) or '?'} requests | "
              f"≈ a depth-1 fetch of the commit | {verdict} |")
            w(f"| history: reference transfers | `git fetch --depth 1 <sha>` {human_bytes(rep.get('fetch_depth1_sha') or 0)}"
              f" (protocol v0: {human_bytes(rep.get('fetch_depth1_sha_v0') or 0)}); B's `git clone --depth 1` "
              f"{', '.join(human_bytes(x) for x in rep.get('b_clone') or []) or 'n/a'}; full clone "
              f"{human_bytes(rep.get('full_clone') or 0)}; bare repo on disk {human_bytes(rep.get('bare_du', 0))}"
              f" ({rep.get('objects', 0):,} objects); files at the tip {human_bytes(rep.get('tip_tree_bytes', 0))} | — | info |")
        if self.cancel_report:
            c = self.cancel_report
            if c.get("supported"):
                w(f"| cancel: PUBLISH → CANCELLED at the dashboard | {spread([x * 1000 for x in c['to_cancelled']], '{:.0f}')} ms "
                  f"(n={len(c['to_cancelled'])}) | — | info |")
                w(f"| cancel: PUBLISH → build step gone (container or process) | {spread([x * 1000 for x in c['to_gone']], '{:.0f}')} ms "
                  f"(n={len(c['to_gone'])}) | — | info |")
            else:
                w(f"| cancel latency | not supported: {'; '.join(c.get('notes') or ['no data'])} | — | not supported |")
        w("")

        w("## Where the time goes (medians, ms)\n")
        w("A: pickup = RPUSH → BUILDING at the dashboard; the steps are the daemon's own `step finished "
          "elapsed_ms`; rest = A total − pickup − steps (final report, gaps). B: the three commands.\n")
        w("| scenario | A pickup | clone | prepare | registry | build | push | rest | **A total** | B clone | B build | B push | **B total** | calls/build | log lines A / B |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for key in ("small", "history", "chatty"):
            sc = self.scenarios.get(key)
            if not sc or not sc.a or not sc.b:
                continue
            def med(xs: list[float]) -> str:
                return f"{median(xs):.0f}" if xs else "n/a"
            steps = {s: [x.steps.get(s, 0) for x in sc.a] for s in ("clone", "prepare", "registry", "build", "push")}
            pickup = [1000 * (x.pickup_s or 0) for x in sc.a]
            rest = [1000 * x.seconds - 1000 * (x.pickup_s or 0) - sum(x.steps.values()) for x in sc.a]
            w(f"| {key} | {med(pickup)} | " + " | ".join(med(steps[s]) for s in steps) +
              f" | {med(rest)} | **{med([1000 * x.seconds for x in sc.a])}** | {med([1000 * x.clone_s for x in sc.b])} | "
              f"{med([1000 * x.build_s for x in sc.b])} | {med([1000 * x.push_s for x in sc.b])} | "
              f"**{med([1000 * x.seconds for x in sc.b])}** | {med([x.calls for x in sc.a])} | "
              f"{med([x.log_lines for x in sc.a])} / {med([x.output_lines for x in sc.b])} |")
        w("")

        w("## Every round (seconds)\n")
        for key, sc in self.scenarios.items():
            if key.startswith("batch"):
                continue
            pairs = ", ".join(f"{a.seconds:.2f}/{b.seconds:.2f}" for a, b in zip(sc.a, sc.b))
            w(f"- {key}: A/B {pairs}")
        if br:
            for key in ("batch1", "batch2"):
                w(f"- {key}: " + ", ".join(f"{t:.1f}" for t in br[key]["t"]))
            w("- batch B (10 sequential): " + ", ".join(f"{t:.1f}" for t in br["b"]))
        notes = [(k, n) for k, sc in self.scenarios.items() for n in sc.notes + sc.failures]
        if notes:
            w("\n## Notes and failures\n")
            for k, n in notes:
                w(f"- {k}: {n.splitlines()[0][:400]}")
        w("\n## Machine\n")
        self.machine["load at end"] = " ".join(open("/proc/loadavg").read().split()[:3])
        for k, v in self.machine.items():
            w(f"- {k}: {v}")
        w(f"- daemon: {self.binary_info}, source {self.source_info}")
        w(f"- wall time of the run: {(time.time() - self.started_wall) / 60:.1f} min")
        w("\nThe machine may be shared: the load averages above say how busy it was. Treat single "
          "runs as a trial; compare medians across several runs before concluding.")
        return "\n".join(out) + "\n"

    def write_report(self, text: str) -> Path:
        day = time.strftime("%Y-%m-%d", time.localtime(self.started_wall))
        path = BENCH_DIR / f"results-{day}.md"
        n = 2
        while path.exists():
            path = BENCH_DIR / f"results-{day}-{n}.md"
            n += 1
        path.write_text(text)
        return path

    # ---------------------------------------------------------- cleanup

    def cleanup(self) -> None:
        for d in self.daemons:
            try:
                d.stop(grace=5)
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: daemon {d.name}: {e}")
        # Build containers of the cancel fixture that may still run.
        marker = f"started-{self.run_id}"
        try:
            for c in self.docker.running_containers():
                if marker in (c.get("Command") or ""):
                    self.docker.kill_container(c["Id"])
        except Exception:  # noqa: BLE001
            pass
        # Local images of this run (B's, and the daemon's if it was killed).
        try:
            prefix = f"{getattr(self, 'registry', '')}/deployra/bench-{self.run_id}-"
            for tag in set(self.docker.image_tags()) | self.b_tags:
                if tag.startswith(prefix):
                    self.docker.remove_image(tag)
        except Exception as e:  # noqa: BLE001
            log(f"cleanup: images: {e}")
        self.cleanup_registry()
        if self.redis_keys and hasattr(self, "redis"):
            try:
                self.redis.cmd("DEL", *sorted(self.redis_keys))
            except Exception as e:  # noqa: BLE001
                log(f"cleanup: redis: {e}")
        if self.fixtures:
            self.fixtures.remove_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cleanup_registry(self) -> None:
        """Best effort: delete the manifests this run pushed and its ECR
        repositories in moto (the registry's blobs stay until its GC)."""
        env = self.testbed_env
        if not env:
            return
        try:
            ctx = ssl.create_default_context(cafile=env["TESTBED_REGISTRY_CA"])
            auth = base64.b64encode(f"{env['TESTBED_REGISTRY_USERNAME']}:{env['TESTBED_REGISTRY_PASSWORD']}".encode()).decode()
            for repo, digest in self.pushed:
                req = urllib.request.Request(f"https://{self.registry}/v2/{repo}/manifests/{digest}", method="DELETE")
                req.add_header("Authorization", "Basic " + auth)
                try:
                    urllib.request.urlopen(req, timeout=10, context=ctx).close()
                except Exception:  # noqa: BLE001
                    pass
        except Exception:  # noqa: BLE001
            pass
        day = time.strftime("%Y%m%d")
        for repo in self.ecr_repos:
            body = json.dumps({"repositoryName": repo, "force": True}).encode()
            req = urllib.request.Request(env["AWS_ENDPOINT_URL"] + "/", data=body, method="POST")
            req.add_header("Content-Type", "application/x-amz-json-1.1")
            req.add_header("X-Amz-Target", "AmazonEC2ContainerRegistry_V20150921.DeleteRepository")
            req.add_header("Authorization", f"AWS4-HMAC-SHA256 Credential={env.get('AWS_ACCESS_KEY_ID', 'x')}/{day}/"
                           f"{env.get('AWS_REGION', 'us-east-1')}/ecr/aws4_request, SignedHeaders=host, Signature=0")
            try:
                urllib.request.urlopen(req, timeout=10).close()
            except Exception:  # noqa: BLE001
                pass


def main() -> int:
    p = argparse.ArgumentParser(description="deployra-builder vs git+docker benchmark on the test bed")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per scenario (default 5)")
    p.add_argument("--builder", choices=["buildkit", "classic"], default="buildkit",
                   help="the daemon's DOCKER_BUILDER, and B's builder: DOCKER_BUILDKIT=1 or 0 (default buildkit)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured A+B rounds before each A/B scenario (default 1)")
    p.add_argument("--only", default=",".join(ALL_SCENARIOS),
                   help=f"comma-separated subset of {','.join(ALL_SCENARIOS)} (default: all)")
    p.add_argument("--cancel-rounds", type=int, default=10, help="cancel measurements (default 10)")
    p.add_argument("--cancel-wait", type=float, default=20.0,
                   help="seconds to wait for CANCELLED before calling cancel unsupported (default 20)")
    p.add_argument("--build-timeout", type=float, default=600.0, help="give up on one build after this (s)")
    p.add_argument("--binary", help="use this daemon binary instead of building one")
    p.add_argument("--no-build", action="store_true", help="do not run cargo build; use the existing release binary")
    p.add_argument("--testbed-up", action="store_true",
                   help="run testbed/up even when every service answers (it restarts the git server and dashboard)")
    p.add_argument("--no-write", action="store_true", help="print the results only; do not write bench/results-*.md")
    args = p.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in ALL_SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt
    # Ctrl-C even when started from a shell that ignores SIGINT for
    # background jobs (Python keeps an inherited SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    bench = Bench(args)
    status = 0
    try:
        bench.setup()
        bench.fixtures = Fixtures(bench)
        log(f"run {bench.run_id}: scenarios {', '.join(only)}; {args.rounds} round(s) + {args.warmup} warm-up")
        for key in ALL_SCENARIOS:
            if key not in only:
                continue
            try:
                if key == "startup":
                    bench.scenario_startup()
                elif key == "small":
                    bench.scenario_ab("small", "small repository", 1.10, bench.fixtures.small())
                elif key == "history":
                    bench.scenario_history()
                elif key == "chatty":
                    bench.scenario_ab("chatty", "build printing 20,000 lines", 1.20, bench.fixtures.chatty())
                elif key == "batch":
                    bench.scenario_batch()
                elif key == "cancel":
                    bench.scenario_cancel()
            except BenchError as e:
                log(f"[{key}] aborted: {e}")
                bench.scenarios.setdefault(key, Scenario(key, key, None)).failures.append(f"aborted: {e}")
                status = 1
        text = bench.report()
        print("\n" + text)
        if not args.no_write:
            log(f"results written to {bench.write_report(text)}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        status = 130
    except BenchError as e:
        log(f"error: {e}")
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.cleanup()
        log("cleaned up")
    return status


if __name__ == "__main__":
    sys.exit(main())
