"""Microbenchmark: what the soak's ledger costs per request, and per soak check.

``python -m bench.micro_soak [--requests N] [--rounds R]``

``SoakCounter.observe`` runs inline for every proxied request (proxy/fleet/rollout_soak.py,
proxy/core/soak.py): it adds to cumulative counts and to a time bucket of the request's
arrival. Timed in CPU µs per request (``time.process_time``), with JSON-mode answers
(two signals per request, the most work it does):

- observe, 1 request per bucket: every request opens a bucket and prunes one (the
  worst case: a quiet proxy, or arrival times 10 ms apart or more);
- observe, 20 requests per bucket: 2,000 requests/s, the usual case under load;
- cumulative counts only: the same two additions into a dict, without buckets (what
  the ledger would cost if it did not place the flip in time), for the difference.

And per check of a soaking region (``SoakBook.sides``, once per ``check_interval_s``), with
a full horizon of buckets (60 s at 10 ms, 3 versions x 2 regions): the first judgement
of a soak (it reads the baseline before the flip) and every later one.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from bench.micro_request import print_stages, timed_rounds
from proxy.core.clock import ManualClock
from proxy.core.events import Outcome, RequestEvent
from proxy.core.rollout import RegionState
from proxy.fleet.rollout_soak import MIN_HORIZON_S, SoakBook, SoakCounter

if TYPE_CHECKING:
    from collections.abc import Callable

T0 = 1_764_000_000.0
VERSIONS = ("prompt=v46", "prompt=v47", "prompt=v48")


def _events(n: int, spacing_s: float) -> list[RequestEvent]:
    out = []
    for i in range(n):
        outcome = Outcome(session_id=f"s-{i % 1000}", status=200, backend_id="pop-1",
                          region=("eu", "us")[i % 2], version_key=VERSIONS[i % 3],
                          structured_output_valid=i % 50 != 0)
        out.append(outcome.event(at=T0 + i * spacing_s, request_id=f"{i:032x}",
                                 traceparent="", incoming_traceparent=None, method="POST",
                                 path="/v1/chat/completions", duration_s=0.004))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro_soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    n, rounds = args.requests, args.rounds
    clock = ManualClock(T0)  # the ledger is born before the events it counts
    rows: list[tuple[str, float, float]] = []

    def observing(events: list[RequestEvent]) -> Callable[[], Callable[[], object]]:
        def setup() -> Callable[[], object]:
            observe = SoakCounter(clock).observe

            def run() -> None:
                for event in events:
                    observe(event)
            return run
        return setup

    rows.append(("observe, 1 per bucket", *timed_rounds(rounds, n, observing(_events(n, 0.01)))))
    rows.append(("observe, 20 per bucket", *timed_rounds(rounds, n, observing(_events(n, 0.0005)))))
    dense = _events(n, 0.0005)

    def cumulative() -> Callable[[], object]:
        totals: dict[tuple[str, str, str], list[int]] = {}

        def run() -> None:
            for e in dense:
                for signal, failed in (("errors", e.status >= 500),
                                       ("structured_output", not e.structured_output_valid)):
                    key = (e.region or "", e.version_key or "", signal)
                    cell = totals.get(key)
                    if cell is None:
                        cell = totals[key] = [0, 0]
                    cell[0] += 1
                    cell[1] += int(failed)
        return run

    rows.append(("cumulative counts only", *timed_rounds(rounds, n, cumulative)))

    # A full horizon: one request per bucket for MIN_HORIZON_S, then a soak flipped
    # half-way through it (the baseline is what came before).
    full = _events(int(MIN_HORIZON_S / 0.01), 0.01)
    counter = SoakCounter(clock)
    for event in full:
        counter.observe(event)
    flipped = RegionState(VERSIONS[1], T0 + MIN_HORIZON_S / 2, previous=VERSIONS[0],
                          soaking=True)
    checks = 200

    def first() -> Callable[[], object]:
        books = [SoakBook(counter.ledger) for _ in range(checks)]
        return lambda: [book.sides("eu", flipped) for book in books]

    def later() -> Callable[[], object]:
        book = SoakBook(counter.ledger)
        book.sides("eu", flipped)
        return lambda: [book.sides("eu", flipped) for _ in range(checks)]

    rows.append(("check: first judgement", *timed_rounds(rounds, checks, first)))
    rows.append(("check: later judgements", *timed_rounds(rounds, checks, later)))
    print_stages(f"{n} requests x {rounds} rounds, checks over {len(full)} buckets", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
