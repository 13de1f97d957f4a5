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
from proxy.runtime.preflight import probe_bind
from proxy.telemetry.logs import configure_logging

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from multiprocessing.process import BaseProcess

    from proxy.config.settings import Settings

logger = logging.getLogger(__name__)

_RESTARTS_PER_MINUTE = 5


def run(settings: Settings, source: Callable[[], Settings] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code.

    ``source`` re-reads the settings for a live reload (SIGHUP, POST /admin/reload).
    """
    if settings.listen.workers == 1:
        _run_loop(settings, source, reuse_port=False)
        return 0
    probe_bind("listen.port", settings.listen.host, settings.listen.port)
    if settings.admin.enabled:
        probe_bind("admin.port", settings.admin.host, settings.admin.port)
    with _multiprocess_metrics():
        return _supervise(_with_session_hash_key(settings), source)


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
    key = secrets.token_hex(32)
    # In the environment too: a reload re-reads the file in each worker, and must find
    # the same key there or every reload would be refused as changing log.session_hash_key.
    os.environ[_HASH_KEY_ENV] = key
    log = settings.log.model_copy(update={"session_hash_key": SecretStr(key)})
    return settings.model_copy(update={"log": log})


_HASH_KEY_ENV = "PINPROXY_LOG__SESSION_HASH_KEY"


def _run_loop(
    settings: Settings,
    source: Callable[[], Settings] | None,
    *,
    reuse_port: bool,
    supervised: bool = False,
    reload_at_start: bool = False,
) -> None:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        logger.info("uvloop not available; using the default event loop")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, source, reuse_port=reuse_port, supervised=supervised,
                         reload_at_start=reload_at_start))


def _ask_supervisor_to_reload() -> None:
    # The supervisor answers SIGHUP by signalling every worker (this one included,
    # whose second reload then finds nothing changed).
    os.kill(os.getppid(), signal.SIGHUP)


async def serve(
    settings: Settings,
    source: Callable[[], Settings] | None = None,
    *,
    reuse_port: bool = False,
    supervised: bool = False,
    reload_at_start: bool = False,
) -> None:
    """Run one proxy in the current event loop until a stop signal arrives.

    ``source``: SIGHUP re-reads the settings from it and applies them (proxy/app/reload.py).
    ``supervised``: a worker of several, whose admin reloads reach its siblings through
    the supervisor. ``reload_at_start``: a restarted worker catches up with reloads
    its siblings applied since the supervisor started.
    """
    multiprocess_dir = os.environ.get(_MULTIPROC_ENV)
    # Until the loop's SIGHUP handler is installed below, a SIGHUP (the supervisor
    # relaying a sibling's reload to a worker that is still starting) must neither kill
    # the process, SIGHUP's default, nor be lost: it is noted and applied once ready.
    early_sighup: list[int] = []
    if source is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: early_sighup.append(signum))
    async with running_proxy(
        settings, reuse_port=reuse_port, metrics_multiprocess_dir=multiprocess_dir,
        reload_from=source, notify_peers=_ask_supervisor_to_reload if supervised else None,
    ) as proxy:
        for host, port in proxy.data_addresses:
            logger.info("pinproxy listening on http://%s:%s", host, port)
        for host, port in proxy.admin_addresses:
            logger.info("admin API listening on http://%s:%s", host, port)
        for host, port in proxy.metrics_addresses:
            logger.info("metrics listening on http://%s:%s/metrics", host, port)
        gc_pauses = GcPauses(proxy.services.metrics.gc_paused)
        gc_pauses.install()
        # Everything start-up allocated now lives as long as the process: freeze it.
        tune_gc(settings.runtime)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        reloads: set[asyncio.Task[None]] = set()
        reloader = proxy.services.reloader
        if reloader is not None:

            def on_sighup() -> None:
                task = loop.create_task(reloader.reload_logged(), name="config-reload")
                reloads.add(task)
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, on_sighup)
            if reload_at_start or early_sighup:
                await reloader.reload_logged()
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
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            for task in reloads:
                task.cancel()
    gc_pauses.uninstall()
    logger.info("stopped")


def _worker_main(
    settings: Settings, source: Callable[[], Settings] | None, index: int, restarted: bool
) -> None:
    configure_logging(settings.log, worker=index)
    _run_loop(settings, source, reuse_port=True, supervised=True,
              reload_at_start=restarted and source is not None)


def _supervise(settings: Settings, source: Callable[[], Settings] | None) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    reload_asked = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    def on_sighup(signum: int, _frame: object) -> None:
        nonlocal reload_asked
        reload_asked = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if source is not None:  # else SIGHUP keeps its default: nothing could re-read it
        signal.signal(signal.SIGHUP, on_sighup)
    reloaded = False  # a worker started after a reload must catch up with it

    def start(index: int) -> BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(settings, source, index, reloaded),
                           name=f"pinproxy-{index}")
        proc.start()
        return proc

    workers = {i: start(i) for i in range(settings.listen.workers)}
    restarts: list[float] = []
    code = 0
    while not stopping:
        time.sleep(0.2)
        if reload_asked:
            # SIGHUP (an operator's, or a worker's after POST /admin/reload): each
            # worker re-reads and applies the config itself, and logs the outcome.
            reload_asked, reloaded = False, True
            for proc in workers.values():
                if proc.is_alive() and proc.pid is not None:
                    os.kill(proc.pid, signal.SIGHUP)
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
