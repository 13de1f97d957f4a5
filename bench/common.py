"""What every scenario shares: its run context, the event loop, readiness checks."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.httpload import SerialClient, build_request
from bench.procs import Layout, Procs, machine_facts, pinned_self, raised_fd_limit
from bench.report import new_run_dir
from proxy.config.settings import RuntimeConfig
from proxy.runtime.gc_tuning import tune_gc

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterator

T = TypeVar("T")


@dataclass
class RunContext:
    scenario: str
    out: Path  # bench/results/<scenario>-<timestamp>
    work: Path  # temp dir for configs, logs, nginx temp files (logs copied to out/logs)
    procs: Procs
    layout: Layout
    facts: dict[str, Any]
    command: str


@contextlib.contextmanager
def run_context(scenario: str, out_root: Path | None, *, pin: bool = True) -> Iterator[RunContext]:
    """Set up a run: result dir, temp work dir, CPU layout; tear everything down after.

    The bench process itself (the load generator) runs on the load CPUs while inside.
    """
    out = new_run_dir(scenario, out_root)
    layout = Layout.detect(pin=pin)
    with tempfile.TemporaryDirectory(prefix=f"bench-{scenario}-") as tmp:
        work = Path(tmp)
        procs = Procs(work)
        command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if not sys.argv[0].endswith("__main__.py"):
            command = f"(library call) bench {scenario}"
        ctx = RunContext(scenario, out, work, procs, layout, machine_facts(), command)
        try:
            with raised_fd_limit(), pinned_self(layout.load_cpus):
                yield ctx
        finally:
            procs.close()
            logs = out / "logs"
            for log in work.glob("*.log"):
                logs.mkdir(exist_ok=True)
                shutil.copy(log, logs / log.name)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is there (the client should cost as little as possible).

    The load generator measures latency, so its own GC pauses must not land in the
    numbers: it gets pinproxy's GC settings.
    """
    tune_gc(RuntimeConfig())
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinproxy dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


async def wait_ready(
    url_host: str, port: int, *, timeout_s: float = 30.0, path: str = "/v1/chat/completions"
) -> None:
    """Return once ``port`` answers a chat completion with 200 (the proxy found its fleet)."""
    request = build_request(url_host, port, path)
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        client = SerialClient(url_host, port)
        try:
            status, _ = await client.request(request, timeout_s=2.0)
            if status == 200:
                return
            last = f"status {status}"
        except (OSError, TimeoutError, ConnectionError) as exc:
            last = repr(exc)
        finally:
            client.close()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port} not ready within {timeout_s}s ({last})")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])
