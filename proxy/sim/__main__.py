"""``python -m proxy.sim``: run one simulated POP until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

import click

from proxy.config.settings import RuntimeConfig
from proxy.core.models import DIMENSIONS, Dimension, InvalidVersion, VersionBundle
from proxy.runtime.gc_tuning import tune_gc
from proxy.sim.pop import SimPop
from proxy.sim.state import PopState

if TYPE_CHECKING:
    from collections.abc import Callable


def _dimensions(text: str) -> tuple[Dimension, ...]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names or names - set(DIMENSIONS):
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(DIMENSIONS)}")
    return tuple(d for d in DIMENSIONS if d in names)


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(pop: SimPop, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await pop.start(host, port)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
    click.echo(f"sim POP ready: {pop!r}")
    try:
        await stop.wait()
    finally:
        await pop.stop()
        click.echo(f"sim POP stopped: {pop.state.backend_id}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--id", "backend_id", required=True, help="Backend id, e.g. us-east-1.")
@click.option("--region", required=True, help="Region name, e.g. us-east.")
@click.option("--prompt", required=True, help="Prompt version served, e.g. v47.")
@click.option("--parser", default=None, help="Parser version (omitted when not given).")
@click.option("--tools", default=None, help="Tools version (omitted when not given).")
@click.option("--model", default=None, help="Model version (omitted when not given).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=18101,
    show_default=True,
    help="Port to listen on (0: any free port, printed when ready).",
)
@click.option(
    "--ttfb-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Time to first byte of every answer, in milliseconds (the POP's latency).",
)
@click.option(
    "--tokens-per-second",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Streaming speed after the first byte (0: every token at once).",
)
@click.option(
    "--completion-tokens",
    type=click.IntRange(0, 1_000_000),
    default=8,
    show_default=True,
    help="Tokens in every completion (also reported in usage).",
)
@click.option("--strict", is_flag=True, help="Answer 409 to requests pinned to another version.")
@click.option("--no-stamp", is_flag=True, help="Send no version or backend-id headers.")
@click.option(
    "--fail-status",
    type=click.IntRange(400, 599),
    default=None,
    help="Answer every API request with this error status (a failing POP).",
)
@click.option(
    "--key-dimensions",
    default=",".join(DIMENSIONS),
    show_default=True,
    help="Dimensions the strict check compares, comma separated.",
)
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.option(
    "--uvloop/--no-uvloop",
    default=True,
    show_default=True,
    help="Run on uvloop (as pinproxy does) or on asyncio's default loop.",
)
def main(
    backend_id: str,
    region: str,
    prompt: str,
    parser: str | None,
    tools: str | None,
    model: str | None,
    host: str,
    port: int,
    ttfb_ms: float,
    tokens_per_second: float,
    completion_tokens: int,
    strict: bool,
    no_stamp: bool,
    fail_status: int | None,
    key_dimensions: str,
    access_log: bool,
    uvloop: bool,
) -> None:
    """Run one simulated POP (a fake regional OpenAI-compatible backend)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        version = VersionBundle(prompt=prompt, parser=parser, tools=tools, model=model)
        state = PopState(
            backend_id=backend_id,
            region=region,
            version=version,
            ttfb_ms=ttfb_ms,
            tokens_per_second=tokens_per_second,
            completion_tokens=completion_tokens,
            stamp=not no_stamp,
            strict=strict,
            key_dimensions=_dimensions(key_dimensions),
            fail_status=fail_status,
        )
    except (InvalidVersion, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    pop = SimPop(state, access_log=access_log)
    # The same GC settings as pinproxy's: a mock whose own GC pauses show up in the
    # benchmarks' direct baseline would hide (or fake) pinproxy's.
    tune_gc(RuntimeConfig())
    with asyncio.Runner(loop_factory=_loop_factory(uvloop)) as runner:
        runner.run(_serve(pop, host, port))


if __name__ == "__main__":
    main()
