"""The ``rollout`` settings section: rollout discipline for new sessions (proxy/core/rollout.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from proxy.config.observability import Section


class RolloutConfig(Section):
    # atomic: a region's backends serve new sessions only its current version, which
    # flips when every replica reports the new one; per_replica: each backend serves
    # new sessions whatever it runs (no region discipline).
    mode: Literal["atomic", "per_replica"] = "atomic"
    region_modes: dict[str, Literal["atomic", "per_replica"]] = Field(default_factory=dict)
    # How long every replica of a region must report the new version before it flips
    # (0: at once; raise it if runtimes may report a version and then go back).
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    soak_s: Annotated[float, Field(gt=0, le=7 * 86_400)] = 600.0
    max_soaking_regions: Annotated[int, Field(ge=1, le=1000)] = 1
    # A region whose current version lost every healthy backend while the rest of it
    # runs a new one: other_regions (it takes no new sessions) or flip.
    on_current_lost: Literal["other_regions", "flip"] = "other_regions"
    # The kill switch: block the regressed version fleet-wide and return its regions to
    # their previous version; block_and_repin also moves its sessions back.
    on_regression: Literal["block", "block_and_repin"] = "block"
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.01
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.005
    min_samples: Annotated[int, Field(ge=1)] = 200
    check_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    events_kept: Annotated[int, Field(ge=1, le=100_000)] = 500


class EvalsConfig(Section):
    """Eval coverage (proxy/eval_coverage.py): eval traffic counted apart from production."""

    # Requests carrying this header (any value) are eval traffic: counted apart from
    # production, never in the soak judge's signals or the production distribution.
    header: Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")] | None = "X-Eval-Run"
    # A version carrying more than this share of a region's production requests over
    # window_s, while no eval request exercised it there in that window, is uncovered.
    min_production_share: Annotated[float, Field(ge=0, lt=1)] = 0.05
    window_s: Annotated[int, Field(ge=60, le=86_400, multiple_of=60)] = 3600
