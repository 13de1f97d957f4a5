"""The one-off move of proxy/ into layered packages, kept so branches cut before it can follow.

``python tools/relayout.py --move`` performs the move (git mv) in the current checkout;
``python tools/relayout.py --rewrite PATH...`` rewrites old dotted module paths (in imports,
strings such as ``"proxy.config_telemetry.Section"`` and ``mock``-style targets) to the new ones
in every .py/.toml/.md/.ini/.cfg file under PATH. Both are idempotent.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# old module -> new module (proxy.X -> proxy.layer.Y). Packages that stay put are not listed.
MODULES: dict[str, str] = {
    # core: value types and pure rules; imports nothing of pinproxy above it.
    "proxy.models": "proxy.core.models",
    "proxy.errors": "proxy.core.errors",
    "proxy.clock": "proxy.core.clock",
    "proxy.headers": "proxy.core.headers",
    "proxy.json_body": "proxy.core.json_body",
    "proxy.json_scan": "proxy.core.json_scan",
    "proxy.events": "proxy.core.events",
    "proxy.answers": "proxy.core.answers",
    "proxy.outage": "proxy.core.outage",
    "proxy.continuation": "proxy.core.continuation",
    "proxy.ewma": "proxy.core.ewma",
    "proxy.outlier": "proxy.core.outlier",
    "proxy.edge_limits": "proxy.core.edge_limits",
    "proxy.rollout": "proxy.core.rollout",
    # config: the one frozen settings model.
    "proxy.config_telemetry": "proxy.config.observability",
    "proxy.config_listen": "proxy.config.listen",
    "proxy.config_rollout": "proxy.config.rollout",
    "proxy.config_store": "proxy.config.store",
    "proxy.config": "proxy.config.settings",
    # policy: pure decisions that read settings.
    "proxy.routing": "proxy.policy.routing",
    "proxy.lifecycle": "proxy.policy.lifecycle",
    "proxy.sessions": "proxy.policy.sessions",
    "proxy.pin_token": "proxy.policy.pin_token",
    # redis: connections and pub/sub shared by every Redis-backed port.
    "proxy.store.redis_client": "proxy.redis.client",
    "proxy.pubsub": "proxy.redis.pubsub",
    # upstream: the clients that speak to backends.
    "proxy.upstream": "proxy.upstream.client",
    "proxy.http1_pool": "proxy.upstream.pool",
    "proxy.http1": "proxy.upstream.http1",
    "proxy.tls": "proxy.upstream.tls",
    # fleet: what backends exist and serve which version; the control plane.
    "proxy.registry": "proxy.fleet.registry",
    "proxy.discovery": "proxy.fleet.discovery",
    "proxy.control_redis": "proxy.fleet.control_redis",
    "proxy.control": "proxy.fleet.control",
    "proxy.rollout_control": "proxy.fleet.rollout_control",
    # telemetry: metrics, logs, traces, audit, usage, traffic.
    "proxy.metrics": "proxy.telemetry.metrics",
    "proxy.audit_redis": "proxy.telemetry.audit_redis",
    "proxy.audit": "proxy.telemetry.audit",
    "proxy.requestlog": "proxy.telemetry.requestlog",
    "proxy.logs": "proxy.telemetry.logs",
    "proxy.tracing": "proxy.telemetry.tracing",
    "proxy.usage": "proxy.telemetry.usage",
    "proxy.traffic": "proxy.telemetry.traffic",
    "proxy.fleet_metrics": "proxy.telemetry.fleet_metrics",
    "proxy.loop_lag": "proxy.telemetry.loop_lag",
    "proxy.telemetry": "proxy.telemetry.observers",
    # dataplane: the data port's request handling.
    "proxy.dataplane": "proxy.dataplane.plane",
    "proxy.relay": "proxy.dataplane.relay",
    "proxy.request_body": "proxy.dataplane.request_body",
    "proxy.listener": "proxy.dataplane.listener",
    "proxy.lost_pin": "proxy.dataplane.lost_pin",
    "proxy.pin_token_http": "proxy.dataplane.pin_token_http",
    "proxy.health": "proxy.dataplane.health",
    # app: the composition of the data application.
    "proxy.app": "proxy.app.build",
    # runtime: processes, listeners, workers, signals.
    "proxy.server": "proxy.runtime.server",
    "proxy.gc_tuning": "proxy.runtime.gc_tuning",
    # cli: commands and their renderers.
    "proxy.cli": "proxy.cli.main",
    "proxy.demo": "proxy.cli.demo",
    "proxy.sessionview": "proxy.cli.sessionview",
}

# Tests mirror the package: old test path -> new test path (relative to tests/).
TESTS: dict[str, str] = {}

_UNIT = {
    "core": ["test_models", "test_ewma", "test_headers", "test_headers_fuzz", "test_json_scan",
             "test_continuation", "test_edge_limits", "test_outage", "test_rollout",
             "test_passive_health"],
    "config": ["test_config", "test_config_listen"],
    "policy": ["test_routing", "test_lifecycle", "test_sessions", "test_pin_token"],
    "upstream": ["test_http1_parser_fuzz", "test_http1_request"],
    "store": ["test_memory_store", "test_pin_cache", "test_repin_log", "test_store_timeouts",
              "test_pinned_counts"],
    "fleet": ["test_registry", "test_control", "test_version_reports_fuzz"],
    "telemetry": ["test_audit", "test_logs", "test_loop_lag", "test_traffic", "test_usage"],
    "dataplane": ["test_lost_pin"],
    "admin": ["test_admin_openapi", "test_backend_urls", "test_backend_urls_fuzz",
              "test_session_admin"],
    "runtime": ["test_gc_tuning"],
    "cli": ["test_sessionview"],
}
_INTEGRATION = {
    "dataplane": ["test_forwarding", "test_pinning", "test_faults", "test_bad_input",
                  "test_edge_malformed", "test_edge_slow_clients", "test_framing_fuzz",
                  "test_session_body", "test_pin_tokens", "test_lost_pins", "test_availability",
                  "test_health", "test_server", "test_replicas"],
    "upstream": ["test_http1", "test_http1_tls"],
    "store": ["test_redis_store", "test_store_faults", "test_store_outage",
              "test_store_topologies", "test_shared_counts"],
    "fleet": ["test_rollout"],
    "admin": ["test_admin_base", "test_admin_fleet", "test_admin_propagation",
              "test_admin_schema", "test_admin_sessions", "test_events", "fleet_helpers",
              "sessions_helpers"],
    "telemetry": ["test_audit", "test_metrics", "test_metrics_workers", "test_request_log",
                  "test_tracing", "test_alert_rules", "test_dashboard"],
    "cli": ["test_cli", "test_cli_session", "test_sim"],
}
for _layer, _names in _UNIT.items():
    for _n in _names:
        TESTS[f"unit/{_n}.py"] = f"unit/{_layer}/{_n}.py"
for _layer, _names in _INTEGRATION.items():
    for _n in _names:
        TESTS[f"integration/{_n}.py"] = f"integration/{_layer}/{_n}.py"


def _test_modules() -> dict[str, str]:
    out = {}
    for old, new in TESTS.items():
        out["tests." + old[:-3].replace("/", ".")] = "tests." + new[:-3].replace("/", ".")
    return out


def _pattern(mapping: dict[str, str]) -> re.Pattern[str]:
    # Longest first, and never inside a longer dotted name already rewritten
    # (proxy.config must not match proxy.config.settings or proxy.config_store).
    names = sorted(mapping, key=len, reverse=True)
    return re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in names) + r")(?![\w])")


def rewrite_text(text: str, python: bool = True) -> str:
    """Rewrite old module paths in one file's text (idempotent).

    In Python files only import statements and string literals are touched, so an
    attribute chain such as ``proxy.registry.snapshot`` on a fixture named ``proxy`` is
    left alone.
    """
    mapping = {**MODULES, **_test_modules()}
    pat = _pattern(mapping)
    new_paths = set(mapping.values())
    new_prefixes = {
        ".".join(parts[:i]) for v in new_paths for parts in [v.split(".")]
        for i in range(2, len(parts) + 1)
    }

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        # Already a new path ("proxy.config.listen", "proxy.telemetry.metrics")? Leave it.
        nxt = re.match(r"\.(\w+)", m.string[m.end():])
        if nxt and f"{name}.{nxt.group(1)}" in new_prefixes:
            return name
        return mapping[name]

    if not python:
        return pat.sub(repl, text)
    out = []
    in_import = False
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith(("from proxy", "import proxy", "from tests", "import tests")):
            in_import = "(" in line and ")" not in line
            out.append(pat.sub(repl, line))
            continue
        if in_import:
            in_import = ")" not in line
            out.append(line)
            continue
        # String literals: "proxy.x.y" or 'proxy.x'.
        out.append(re.sub(r"([\"'])(proxy\.[\w.:]+)", lambda m: m.group(1) + pat.sub(repl, m.group(2)), line))  # noqa: E501
    return "".join(out)


def rewrite(paths: list[str]) -> None:
    for root in paths:
        p = Path(root)
        files = [p] if p.is_file() else [
            f for f in p.rglob("*") if f.suffix in {".py", ".toml", ".md", ".ini", ".cfg", ".yml"}
        ]
        for f in files:
            if ".venv" in f.parts or f.name == "relayout.py":
                continue
            old = f.read_text()
            new = rewrite_text(old, python=f.suffix == ".py")
            if new != old:
                f.write_text(new)
                print("rewrote", f)


def move() -> None:
    root = Path("proxy")
    for old, new in MODULES.items():
        src = Path(*old.split(".")).with_suffix(".py")
        dst = Path(*new.split(".")).with_suffix(".py")
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "mv", str(src), str(dst)], check=True)
    for old, new in TESTS.items():
        src, dst = Path("tests", old), Path("tests", new)
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        init = dst.parent / "__init__.py"
        if not init.exists():
            init.write_text("")
            subprocess.run(["git", "add", str(init)], check=True)
        subprocess.run(["git", "mv", str(src), str(dst)], check=True)
    del root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--move", action="store_true")
    ap.add_argument("--rewrite", nargs="*", default=None)
    args = ap.parse_args()
    if args.move:
        move()
    if args.rewrite is not None:
        rewrite(args.rewrite or ["proxy", "tests", "bench"])
    if not args.move and args.rewrite is None:
        ap.print_help()
        sys.exit(2)


if __name__ == "__main__":
    main()
