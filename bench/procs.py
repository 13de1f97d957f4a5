"""Process orchestration: CPU layout, child processes, a private Redis, pinproxy, nginx.

Every process the bench starts is a ``Proc``: it has a log file, is stopped with
SIGTERM (then SIGKILL) by whoever started it, and can report the CPU time and RSS of
its whole process tree from ``/proc``. Nothing here ever touches 127.0.0.1:6379.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

FORBIDDEN_PORT = 6379  # the machine's own Redis: never ours to use
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
REPO_ROOT = Path(__file__).resolve().parent.parent
PROXY_SRC_ENV = "BENCH_PROXY_SRC"


class BenchError(RuntimeError):
    """A bench process could not be started or did not become ready."""


def free_port() -> int:
    """A free loopback TCP port (never 6379)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port != FORBIDDEN_PORT:
            return port
    raise BenchError("no free port found")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_facts() -> dict[str, Any]:
    """What a reader needs to judge the numbers: cores, CPU, load, versions."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "note": "shared, noisy machine: compare against same-run baselines, not across runs",
        "proxy_src": os.environ.get(PROXY_SRC_ENV) or str(REPO_ROOT),
    }


@dataclass(frozen=True, slots=True)
class Layout:
    """Which CPUs the system under test and the load side (generator, POPs, Redis) use.

    With two or more cores and ``taskset``, the last core is the proxy's alone and the
    rest carry everything else; otherwise nothing is pinned and the report says so.
    """

    sut_cpus: str | None
    load_cpus: str | None
    all_cpus: str | None
    taskset: str | None

    @classmethod
    def detect(cls, *, pin: bool = True) -> Layout:
        n = os.cpu_count() or 1
        taskset = shutil.which("taskset")
        if not pin or taskset is None or n < 2:
            return cls(None, None, None, taskset)
        load = "0" if n == 2 else f"0-{n - 2}"
        return cls(str(n - 1), load, f"0-{n - 1}", taskset)

    @property
    def pinned(self) -> bool:
        return self.sut_cpus is not None

    def wrap(self, cmd: Sequence[str], cpus: str | None) -> list[str]:
        """``cmd`` run under ``taskset -c cpus`` when pinning is on."""
        if cpus is None or self.taskset is None:
            return list(cmd)
        return [self.taskset, "-c", cpus, *cmd]

    def describe(self) -> dict[str, Any]:
        if not self.pinned:
            why = "taskset missing" if self.taskset is None else "fewer than 2 cores or --no-pin"
            return {"pinned": False, "why": why}
        return {
            "pinned": True,
            "proxy_cpus": self.sut_cpus,
            "load_cpus": self.load_cpus,
            "note": (
                f"system under test (pinproxy 1 worker, nginx) on CPU {self.sut_cpus}; load "
                f"generator, POPs and Redis on CPU {self.load_cpus}; pinproxy with 2 workers "
                f"runs on CPUs {self.all_cpus} (it has to share the load side's core)"
            ),
        }


def _cpu_list(spec: str) -> set[int]:
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


@contextlib.contextmanager
def pinned_self(cpus: str | None) -> Iterator[None]:
    """Run this process (the load generator) on ``cpus``; the old affinity comes back."""
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _cpu_list(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextlib.contextmanager
def raised_fd_limit(want: int = 65536) -> Iterator[int]:
    """Raise the soft open-files limit (children inherit it): thousands of streams
    need two descriptors each in the proxy and one in the client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    changed = target > soft
    if changed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield max(target, soft)
    finally:
        if changed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = stat.rpartition(")")[2].split()
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(kids.get(current, ()))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (dead ones count as 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the ")" field 0 is the state; utime and stime are fields 11 and 12.
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (not idle or iowait,
    steal excluded): the delta over a run, divided by its wall time, is how many cores
    were busy, ours and the other tenants' together."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    # user nice system idle iowait irq softirq steal ...
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of these processes (VmRSS), summed."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def wait_port(port: int, proc: subprocess.Popen[bytes] | None, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"process exited with {proc.returncode} before listening:\n{tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listened on port {port} within {timeout_s}s:\n{tail(log)}")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class Proc:
    """A child process with a log file; ``stop`` always reaps it."""

    name: str
    cmd: list[str]
    log: Path
    env: dict[str, str] | None = None
    cwd: Path = REPO_ROOT
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,  # a Ctrl-C on the bench must not hit children first
            )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise BenchError(f"{self.name} is not started")
        return self.popen.pid

    def tree(self) -> list[int]:
        return process_tree(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.tree())

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        proc, self.popen = self.popen, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # Kill whatever it left behind too (e.g. pinproxy's spawned workers).
                for pid in process_tree(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(5)


class Procs:
    """Owns every process a scenario starts; ``close`` stops them in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: list[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 30.0,
        cwd: Path = REPO_ROOT,
    ) -> Proc:
        proc = Proc(name, cmd, self.workdir / f"{name}.log", env, cwd)
        self._procs.append(proc)
        proc.start()
        if port is not None:
            wait_port(port, proc.popen, timeout_s, proc.log)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        errors: list[BaseException] = []
        for proc in reversed(self._procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        self._procs.clear()
        if errors:
            raise errors[0]


# -- Redis ------------------------------------------------------------------------------


def start_redis(procs: Procs, layout: Layout) -> tuple[Proc, str]:
    """A private redis-server on a free loopback port, no persistence, in the workdir."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found on PATH (apt-get install redis-server)")
    port = free_port()
    data = procs.workdir / "redis"
    data.mkdir(exist_ok=True)
    cmd = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data),
        "--daemonize",
        "no",
    ]
    proc = procs.start("redis", layout.wrap(cmd, layout.load_cpus), port=port)
    return proc, f"redis://127.0.0.1:{port}/0"


# -- simulated POPs -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PopSpec:
    backend_id: str
    region: str
    prompt: str
    ttfb_ms: float = 0.0
    tokens_per_second: float = 0.0
    completion_tokens: int = 8


def start_sim_pop(
    procs: Procs, spec: PopSpec, cpus: str | None, layout: Layout
) -> tuple[Proc, str]:
    """``python -m proxy.sim`` as its own process; returns it and its base URL."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "proxy.sim",
        "--id",
        spec.backend_id,
        "--region",
        spec.region,
        "--prompt",
        spec.prompt,
        "--port",
        str(port),
        "--ttfb-ms",
        str(spec.ttfb_ms),
        "--tokens-per-second",
        str(spec.tokens_per_second),
        "--completion-tokens",
        str(spec.completion_tokens),
    ]
    proc = procs.start(f"pop-{spec.backend_id}", layout.wrap(cmd, cpus), port=port)
    return proc, f"http://127.0.0.1:{port}"


# -- pinproxy -----------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """``["log.request_log=false", "audit.enabled=false"]`` -> config sections.

    Values are TOML (``false``, ``0.5``, ``"text"``), so anything a config file can say
    can be said here too.
    """
    import tomllib

    out: dict[str, dict[str, object]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"expected section.key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word: take it as a string
        out.setdefault(section, {})[key] = value
    return out


def proxy_toml(
    *,
    port: int,
    backends: Sequence[tuple[str, str, str]],
    redis_url: str | None,
    key_prefix: str,
    sections: dict[str, dict[str, object]] | None = None,
) -> str:
    """A pinproxy config: loopback listener, admin off, quiet logs, the given backends."""
    data: dict[str, dict[str, object]] = {
        "listen": {"host": "127.0.0.1", "port": port, "shutdown_timeout_s": 2.0},
        "store": (
            {"kind": "redis", "url": redis_url, "key_prefix": key_prefix}
            if redis_url
            else {"kind": "memory"}
        ),
        "log": {"level": "warning"},
        "admin": {"enabled": False},
        # Thousands of concurrent streams each hold an upstream connection; the default
        # pool (1000) would queue the rest and show up as time to first token.
        "upstream": {"pool_size": 20000},
    }
    for name, values in (sections or {}).items():
        data.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
        lines.append("")
    for backend_id, region, url in backends:
        lines += [
            "[[backends]]",
            f"id = {_toml_value(backend_id)}",
            f"region = {_toml_value(region)}",
            f"url = {_toml_value(url)}",
            "",
        ]
    return "\n".join(lines)


def start_pinproxy(
    procs: Procs,
    name: str,
    toml: str,
    port: int,
    *,
    cpus: str | None,
    layout: Layout,
    workers: int = 1,
    src: Path | None = None,
) -> Proc:
    """``python -m proxy serve`` with a generated config; returns once it listens.

    ``src`` (default: ``BENCH_PROXY_SRC``, else this checkout), a directory holding a
    ``proxy/`` package, is the copy of pinproxy that runs (e.g. a ``git worktree`` of an
    older commit), for before/after numbers. Where the child will import ``proxy`` from
    is checked before it starts: the bench's own interpreter has this checkout
    installed, and a tree that silently lost to it would compare a tree with itself.
    """
    tree = proxy_tree(src)
    env, cwd = proxy_env(tree)
    config = procs.workdir / f"{name}.toml"
    config.write_text(toml)
    cmd = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    return procs.start(name, layout.wrap(cmd, cpus), port=port, timeout_s=60.0, env=env, cwd=cwd)


def proxy_tree(src: Path | None = None) -> Path:
    """The tree whose ``proxy/`` package the bench runs: ``src``, else ``BENCH_PROXY_SRC``,
    else this checkout."""
    chosen = src if src is not None else os.environ.get(PROXY_SRC_ENV)
    return Path(chosen).resolve() if chosen else REPO_ROOT


def proxy_env(tree: Path) -> tuple[dict[str, str] | None, Path]:
    """Environment additions and working directory that make ``python -m proxy`` import
    ``tree/proxy``: ``-m`` puts the working directory first on ``sys.path``, ahead of the
    editable install, and ``PYTHONPATH`` covers imports made before that."""
    return ({"PYTHONPATH": str(tree)}, tree) if tree != REPO_ROOT else (None, REPO_ROOT)


def proxy_source(src: Path | None = None) -> Path:
    """The ``proxy/`` package directory a pinproxy child started from ``src`` imports,
    asked of the same interpreter with the same environment and working directory (so
    the same ``sys.path``); a ``BenchError`` when it is not the one inside the tree."""
    tree = proxy_tree(src)
    env, cwd = proxy_env(tree)
    probe = subprocess.run(
        [sys.executable, "-c", "import proxy, os; print(os.path.dirname(proxy.__file__))"],
        capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip
    found = Path(probe.stdout.strip() or "?").resolve()
    if probe.returncode != 0 or found != tree / "proxy":
        raise BenchError(
            f"pinproxy from {tree} would import proxy from {found}, not {tree / 'proxy'}"
            f"\n{probe.stderr[-2000:]}"
        )
    return found


def start_pinproxy_in_front(
    procs: Procs,
    layout: Layout,
    backend: tuple[str, str, str],
    *,
    redis_url: str | None,
    tag: str,
    proxy_set: Sequence[str],
    cpus: str | None,
    port: int | None = None,
    name: str = "pinproxy",
    workers: int = 1,
    src: Path | None = None,
) -> tuple[Proc, int]:
    """pinproxy in front of one ``(id, region, url)`` backend; returns it and its port.

    Each run gets its own Redis key prefix, so runs sharing a Redis never see each
    other's pins.
    """
    port = free_port() if port is None else port
    toml = proxy_toml(
        port=port,
        backends=[backend],
        redis_url=redis_url,
        key_prefix=f"bench-{tag}-{port}:",
        sections=parse_overrides(proxy_set),
    )
    proc = start_pinproxy(
        procs, name, toml, port, cpus=cpus, layout=layout, workers=workers, src=src
    )
    return proc, port


# -- nginx --------------------------------------------------------------------------------


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return next((c for c in NGINX_CANDIDATES if os.access(c, os.X_OK)), None)


def _nginx_common(workdir: Path, name: str) -> str:
    tmp = workdir / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    temps = " ".join(
        f"{kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {workdir / name}.pid;\n"
        f"error_log {workdir / name}-error.log warn;\n"
        "events { worker_connections 20000; }\n"
        f"http {{\n  access_log off;\n  {temps}\n  keepalive_requests 10000000;\n"
    )


def nginx_proxy_conf(workdir: Path, name: str, port: int, upstream_url: str) -> str:
    """nginx as a session-affine reverse proxy: one worker, upstream chosen by a consistent
    hash of ``X-Session-ID`` (what a hash router does instead of pinning), keep-alive
    upstream, no buffering."""
    host = upstream_url.split("//", 1)[1]
    return _nginx_common(workdir, name) + (
        "  upstream backend {\n    hash $http_x_session_id consistent;\n"
        f"    server {host};\n    keepalive 256;\n  }}\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n"
        "    location / {\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n"
        '      proxy_set_header Connection "";\n      proxy_buffering off;\n    }\n  }\n}\n'
    )


def nginx_static_pop_conf(workdir: Path, name: str, port: int, backend_id: str, prompt: str) -> str:
    """nginx answering like a POP from memory (``/version``, stamped canned completion):
    a backend fast enough that no proxy's ceiling is really the backend's."""
    version = f'{{"prompt":"{prompt}","backend_id":"{backend_id}","region":"bench"}}'
    body = (
        '{"id":"chatcmpl-static","object":"chat.completion","created":0,"model":"sim-model",'
        f'"choices":[{{"index":0,"message":{{"role":"assistant","content":"[{backend_id} {prompt}] '
        'token token token token token token token","refusal":null},"logprobs":null,'
        '"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}'
    )
    return _nginx_common(workdir, name) + (
        f"  server {{\n    listen 127.0.0.1:{port};\n    default_type application/json;\n"
        f"    location = /version {{ return 200 '{version}'; }}\n"
        f"    location / {{\n      add_header X-Prompt-Version {prompt} always;\n"
        f"      add_header X-Backend-ID {backend_id} always;\n      return 200 '{body}';\n"
        "    }\n  }\n}\n"
    )


def start_nginx(
    procs: Procs, name: str, conf: str, port: int, cpus: str | None, layout: Layout
) -> Proc:
    binary = find_nginx()
    if binary is None:
        raise BenchError("nginx is not installed")
    path = procs.workdir / f"{name}.conf"
    path.write_text(conf)
    cmd = [binary, "-p", str(procs.workdir), "-c", str(path)]
    # SIGQUIT is nginx's graceful stop; SIGTERM is its fast one, either is fine here.
    return procs.start(name, layout.wrap(cmd, cpus), port=port)


# -- vllm-router ----------------------------------------------------------------------------

VLLM_ROUTER_VERSION = "0.1.17"


def find_vllm_router() -> str | None:
    """The ``vllm-router`` launcher (PyPI ``vllm-router``, the ``bench`` extra): next to
    this interpreter first, so the venv's copy wins over anything else on PATH."""
    here = Path(sys.executable).parent / "vllm-router"
    if os.access(here, os.X_OK):
        return str(here)
    return shutil.which("vllm-router")


def start_vllm_router(
    procs: Procs, name: str, port: int, backend_url: str, cpus: str | None, layout: Layout
) -> Proc:
    """vllm-router (Rust, axum/hyper) with ``consistent_hash`` on the session header, in
    front of one backend: the compiled session-affine router pinproxy is measured against.

    Its per-request INFO lines ("Consistent hash routing: ...") go to the log unless
    RUST_LOG says otherwise; ``warn`` keeps its logging as quiet as pinproxy's bench config
    (level warning), so neither pays for log lines the other does not write.
    """
    binary = find_vllm_router()
    if binary is None:
        raise BenchError("vllm-router is not installed (pip install -e '.[bench]')")
    cmd = [
        binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", backend_url,
        "--policy", "consistent_hash", "--log-level", "warning",
        # Its metrics listener defaults to the fixed port 29000: a second bench running
        # at the same time (another checkout, another sitting) would make it panic.
        "--prometheus-port", str(free_port()),
    ]
    return procs.start(
        name, layout.wrap(cmd, cpus), port=port, timeout_s=60.0, env={"RUST_LOG": "warn"}
    )


# -- the Python floor (bench/floor_proxy.py) -----------------------------------------------


def start_python_floor(
    procs: Procs, name: str, port: int, backend_url: str, cpus: str | None, layout: Layout
) -> Proc:
    """bench/floor_proxy.py in front of one backend: uvloop and httptools relaying bytes,
    the least a Python proxy costs per request on this machine."""
    cmd = [sys.executable, "-m", "bench.floor_proxy", "--port", str(port),
           "--upstream", backend_url]
    return procs.start(name, layout.wrap(cmd, cpus), port=port)
