"""Running the app: uvloop, the listening socket, worker processes, graceful drain.

With ``workers = 1`` the proxy runs in this process. With more, this process only
supervises: each worker is a spawned process that binds the same port with
SO_REUSEPORT (the kernel spreads connections among them) and shares pins through
Redis. A worker that dies unexpectedly is restarted, within a budget, so a single
crash does not take the sidecar down; past the budget the supervisor exits non-zero
and leaves restarting to the orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import tempfile
import time
from typing import TYPE_CHECKING

from pydantic import SecretStr

from proxy.runtime.gc_tuning import GcPauses, tune_gc
from proxy.runtime.instance import running_proxy
from proxy.telemetry.logs import configure_logging

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from multiprocessing.process import BaseProcess

    from proxy.config.settings import Settings

logger = logging.getLogger(__name__)

_RESTARTS_PER_MINUTE = 5


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code."""
    if settings.listen.workers == 1:
        _run_loop(settings, reuse_port=False)
        return 0
    with _multiprocess_metrics():
        return _supervise(_with_session_hash_key(settings))


_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def _multiprocess_metrics() -> Iterator[str]:
    """A directory where every worker's counters live, so /metrics can sum them.

    Set in the environment before any worker starts: prometheus-client chooses its
    multiprocess mode when a worker first imports it. An operator's own directory is
    used (emptied of stale files) and kept; otherwise a temp dir is removed at exit.
    """
    given = os.environ.get(_MULTIPROC_ENV)
    if given:
        for stale in os.scandir(given):
            if stale.name.endswith(".db"):
                os.unlink(stale.path)
        yield given
        return
    path = tempfile.mkdtemp(prefix="pinproxy-metrics-")
    os.environ[_MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        del os.environ[_MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


def _with_session_hash_key(settings: Settings) -> Settings:
    """One random session-hash key for all workers, unless one is configured.

    Each worker would otherwise pick its own, and one session's log lines would carry
    a different hash depending on which worker served them.
    """
    if settings.log.session_hash_key is not None:
        return settings
    log = settings.log.model_copy(update={"session_hash_key": SecretStr(secrets.token_hex(32))})
    return settings.model_copy(update={"log": log})


def _run_loop(settings: Settings, *, reuse_port: bool) -> None:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        logger.info("uvloop not available; using the default event loop")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, reuse_port=reuse_port))


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    """Run one proxy in the current event loop until a stop signal arrives."""
    multiprocess_dir = os.environ.get(_MULTIPROC_ENV)
    async with running_proxy(
        settings, reuse_port=reuse_port, metrics_multiprocess_dir=multiprocess_dir
    ) as proxy:
        for host, port in proxy.data_addresses:
            logger.info("pinproxy listening on http://%s:%s", host, port)
        for host, port in proxy.admin_addresses:
            logger.info("admin API listening on http://%s:%s", host, port)
        gc_pauses = GcPauses(proxy.services.metrics.gc_paused)
        gc_pauses.install()
        # Everything start-up allocated now lives as long as the process: freeze it.
        tune_gc(settings.runtime)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
            # Readiness turns 503 first while requests are still served, so load
            # balancers take this replica out of rotation before its listener closes.
            # A second signal ends the grace period early.
            proxy.services.drain.begin()
            if settings.listen.drain_grace_s > 0:
                logger.info(
                    "stopping: readiness is 503; serving %.1fs more",
                    settings.listen.drain_grace_s,
                )
                stop.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), settings.listen.drain_grace_s)
        finally:
            # Graceful drain, as running_proxy exits: the listening sockets close first
            # (new connections go to other workers or replicas), in-flight requests get
            # up to shutdown_timeout_s to finish, then the services close in reverse.
            logger.info(
                "stopping: draining in-flight requests (up to %.0fs)",
                settings.listen.shutdown_timeout_s,
            )
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
    gc_pauses.uninstall()
    logger.info("stopped")


def _worker_main(settings: Settings, index: int) -> None:
    configure_logging(settings.log, worker=index)
    _run_loop(settings, reuse_port=True)


def _supervise(settings: Settings) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(index: int) -> BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(settings, index), name=f"pinproxy-{index}")
        proc.start()
        return proc

    workers = {i: start(i) for i in range(settings.listen.workers)}
    restarts: list[float] = []
    code = 0
    while not stopping:
        time.sleep(0.2)
        for index, proc in list(workers.items()):
            if proc.is_alive() or stopping:
                continue
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > _RESTARTS_PER_MINUTE:
                logger.error(
                    "workers keep dying (%d restarts in a minute); giving up", len(restarts) - 1
                )
                stopping, code = True, 1
                break
            logger.error("worker %d exited with %s; restarting it", index, proc.exitcode)
            workers[index] = start(index)

    for proc in workers.values():
        if proc.is_alive() and proc.pid is not None:
            proc.terminate()  # SIGTERM: each worker drains on its own
    # Each worker first stays up (not ready) for the drain grace, then drains.
    deadline = (
        time.monotonic() + settings.listen.drain_grace_s + settings.listen.shutdown_timeout_s + 5
    )
    for proc in workers.values():
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
    return code
