"""Turn the samples of all rounds into medians, ratios to nginx and to Envoy, tables and JSON."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCENARIOS = ("ka-c1", "ka-c16", "ka-c64", "new-c16")
REFERENCE = "nginx"
DIRECT = "direct"
# Each svidgate target against the Envoy target doing the same work (envoy-jwt verifies the
# token itself from the inline JWKS, so it is the peer of both JWT routes).
PEERS = {
    "svidgate-rbac": "envoy",
    "svidgate-jwt-remote": "envoy-jwt",
    "svidgate-jwt-local": "envoy-jwt",
}

# Issue 5 targets, as ratios (same run) or absolute bounds.
TARGETS = {
    "jwt_keepalive_rps_ratio_min": 0.5,
    "new_conn_ratio_min": 0.9,
    "p99_added_ms_max": 1.0,
    "rss_per_worker_mb_max": 100.0,
}
# Issue 11 targets (data plane v2), on top of issue 5's.
TARGETS_11 = {
    "jwt_keepalive_c16_vs_nginx_min": 0.5,
    "jwt_keepalive_c16_vs_envoy_min": 1.3,
    "rbac_keepalive_c16_vs_nginx_min": 0.6,
    "new_conn_vs_nginx_min": 0.9,
    "p99_added_ms_max": 1.0,
    "rss_per_worker_mb_max": 100.0,
    "flood_rss_peak_mib_max": 200.0,
    "flood_rss_returns_within_mib": 20.0,  # RSS ~10 s after the flood <= before + this
    "two_workers_speedup_min": 1.7,
}
TWO_WORKERS_NOTE = (
    "not measured: needs two server cores besides the load generator's; on a 2-core machine "
    "ab and the upstream take one core, so two workers would share one core with them"
)

# DESIGN.md "Performance: what to beat" (nginx 1.22, one core, medians), for reading the tables.
DESIGN_REFERENCE: dict[str, dict[str, int]] = {
    "nginx ssl_verify_client on": {
        "ka-c1": 12000,
        "ka-c16": 36700,
        "ka-c64": 38600,
        "new-c16": 1130,
    },
    "haproxy verify required": {
        "ka-c1": 11600,
        "ka-c16": 37400,
        "ka-c64": 37300,
        "new-c16": 1090,
    },
    "nginx + njs SPIFFE check": {
        "ka-c1": 9100,
        "ka-c16": 19800,
        "ka-c64": 16400,
        "new-c16": 1060,
    },
}


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """target -> scenario -> medians over rounds (rps, p50, p99, server CPU) and the spread."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    keys = sorted({(s["target"], s["scenario"]) for s in samples})
    for target, scenario in keys:
        runs = [s for s in samples if s["target"] == target and s["scenario"] == scenario]
        ok = [s for s in runs if s.get("error") is None]
        rps = [s["rps"] for s in ok]
        out.setdefault(target, {})[scenario] = {
            "rps": _median(rps),
            "rps_min": min(rps) if rps else None,
            "rps_max": max(rps) if rps else None,
            "p50_ms": _median([s["p50_ms"] for s in ok]),
            "p99_ms": _median([s["p99_ms"] for s in ok]),
            "server_cpu": _median([s["server_cpu"] for s in ok]),
            # Throughput per busy server core: fairer when one side did not saturate its core.
            "rps_per_core": _median(
                [s["rps"] / s["server_cpu"] for s in ok if s["server_cpu"] > 0]
            ),
            "rounds": len(ok),
            "errors": [s["error"] for s in runs if s.get("error") is not None],
        }
    return out


def _ratio_row(
    mine: dict[str, dict[str, Any]], ref: dict[str, dict[str, Any]], mem: Any, ref_mem: Any
) -> dict[str, Any]:
    """Throughput (and per-core throughput, RSS per worker) of one target ÷ a reference's."""
    row: dict[str, Any] = {}
    for name in SCENARIOS:
        rps = mine.get(name, {}).get("rps")
        theirs = ref.get(name, {}).get("rps")
        row[name] = round(rps / theirs, 3) if rps and theirs else None
    for name in ("ka-c64", "new-c16"):
        mine_pc = mine.get(name, {}).get("rps_per_core")
        ref_pc = ref.get(name, {}).get("rps_per_core")
        row[f"{name}_per_core"] = round(mine_pc / ref_pc, 3) if mine_pc and ref_pc else None
    row["rss_per_worker"] = round(mem / ref_mem, 1) if mem and ref_mem else None
    return row


def _rss(memory: dict[str, Any], target: str) -> Any:
    return memory.get(_proxy_of(target), {}).get("rss_per_worker_mb_max")


def ratios(
    summary: dict[str, dict[str, dict[str, Any]]], memory: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    ref = summary.get(REFERENCE, {})
    direct_p99 = summary.get(DIRECT, {}).get("ka-c1", {}).get("p99_ms")
    out: dict[str, dict[str, Any]] = {}
    for target, scen in summary.items():
        if target == DIRECT:
            continue
        row = _ratio_row(scen, ref, _rss(memory, target), _rss(memory, REFERENCE))
        p99 = scen.get("ka-c1", {}).get("p99_ms")
        row["p99_added_ms"] = round(p99 - direct_p99, 3) if p99 is not None and direct_p99 else None
        out[target] = row
    return out


def peer_ratios(
    summary: dict[str, dict[str, dict[str, Any]]], memory: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each svidgate target ÷ its Envoy peer (PEERS) in the same run; p99 at c=1 as a
    difference. Empty when Envoy was not measured."""
    out: dict[str, dict[str, Any]] = {}
    for target, peer in PEERS.items():
        if target not in summary or peer not in summary:
            continue
        mine, theirs = summary[target], summary[peer]
        row = _ratio_row(mine, theirs, _rss(memory, target), _rss(memory, peer))
        p99 = mine.get("ka-c1", {}).get("p99_ms")
        peer_p99 = theirs.get("ka-c1", {}).get("p99_ms")
        row["p99_vs_peer_ms"] = (
            round(p99 - peer_p99, 3) if p99 is not None and peer_p99 is not None else None
        )
        row["versus"] = peer
        out[target] = row
    return out


def _proxy_of(target: str) -> str:
    for proxy in ("svidgate", "envoy"):
        if target.startswith(proxy):
            return proxy
    return target


def verdicts(
    ratio: dict[str, dict[str, Any]], memory: dict[str, Any], *, idle: int = 1000
) -> dict[str, Any]:
    """Where svidgate stands against each issue-5 target (None = not measured)."""

    def ge(v: float | None, bound: float) -> bool | None:
        return None if v is None else v >= bound

    def le(v: float | None, bound: float) -> bool | None:
        return None if v is None else v <= bound

    out: dict[str, Any] = {}
    for target in ("svidgate-jwt-remote", "svidgate-jwt-local"):
        r = ratio.get(target, {})
        worst = min((r[s] for s in ("ka-c1", "ka-c16", "ka-c64") if r.get(s)), default=None)
        out[f"{target} keep-alive >= 0.5x nginx (worst concurrency)"] = {
            "value": worst,
            "ok": ge(worst, TARGETS["jwt_keepalive_rps_ratio_min"]),
        }
    for target in ("svidgate-jwt-remote", "svidgate-jwt-local"):
        pc = ratio.get(target, {}).get("ka-c64_per_core")
        out[f"{target} keep-alive c=64 per server core >= 0.5x nginx"] = {
            "value": pc,
            "ok": ge(pc, TARGETS["jwt_keepalive_rps_ratio_min"]),
        }
    new = ratio.get("svidgate-rbac", {}).get("new-c16")
    out["svidgate new mTLS conn/s >= 0.9x nginx"] = {
        "value": new,
        "ok": ge(new, TARGETS["new_conn_ratio_min"]),
    }
    # When ab (one process) cannot saturate nginx, conn/s flatters the slower side: per core.
    new_pc = ratio.get("svidgate-rbac", {}).get("new-c16_per_core")
    out["svidgate new mTLS conn per server core >= 0.9x nginx"] = {
        "value": new_pc,
        "ok": ge(new_pc, TARGETS["new_conn_ratio_min"]),
    }
    for target in ("svidgate-rbac", "svidgate-jwt-remote", "svidgate-jwt-local"):
        added = ratio.get(target, {}).get("p99_added_ms")
        out[f"{target} p99 added at c=1 <= 1 ms"] = {
            "value": added,
            "ok": le(added, TARGETS["p99_added_ms_max"]),
        }
    rss = memory.get("svidgate", {}).get("rss_per_worker_mb_max")
    out[f"svidgate RSS per worker at 1k idle <= 100 MB (measured with {idle})"] = {
        "value": rss,
        # Fewer idle connections than the target's 1,000 cannot pass it.
        "ok": le(rss, TARGETS["rss_per_worker_mb_max"]) if idle >= 1000 else None,
    }
    return out


def verdicts_11(
    ratio: dict[str, dict[str, Any]],
    peers: dict[str, dict[str, Any]],
    memory: dict[str, Any],
    flood: dict[str, Any] | None,
    *,
    idle: int = 1000,
    server_cores: int = 1,
) -> dict[str, Any]:
    """Issue 11's table: keep-alive c=16 against nginx and Envoy, new connections, p99, RSS at
    1k idle, RSS during the stalled-handshake flood, two workers (None = not measured)."""
    t = TARGETS_11

    def check(value: float | None, bound: float, *, low: bool = False) -> dict[str, Any]:
        ok = None if value is None else (value <= bound if low else value >= bound)
        return {"value": value, "ok": ok}

    out: dict[str, Any] = {}
    for target in ("svidgate-jwt-remote", "svidgate-jwt-local"):
        out[f"{target} keep-alive c=16 >= 0.5x nginx"] = check(
            ratio.get(target, {}).get("ka-c16"), t["jwt_keepalive_c16_vs_nginx_min"]
        )
        out[f"{target} keep-alive c=16 >= 1.3x Envoy (RBAC + jwt_authn)"] = check(
            peers.get(target, {}).get("ka-c16"), t["jwt_keepalive_c16_vs_envoy_min"]
        )
    out["svidgate-rbac keep-alive c=16 >= 0.6x nginx"] = check(
        ratio.get("svidgate-rbac", {}).get("ka-c16"), t["rbac_keepalive_c16_vs_nginx_min"]
    )
    out["svidgate new mTLS conn/s c=16 >= 0.9x nginx"] = check(
        ratio.get("svidgate-rbac", {}).get("new-c16"), t["new_conn_vs_nginx_min"]
    )
    added = [
        ratio.get(x, {}).get("p99_added_ms")
        for x in ("svidgate-rbac", "svidgate-jwt-remote", "svidgate-jwt-local")
    ]
    worst = max((a for a in added if a is not None), default=None)
    out["svidgate p99 added at c=1 <= 1 ms (worst route)"] = check(
        worst, t["p99_added_ms_max"], low=True
    )
    rss = memory.get("svidgate", {}).get("rss_per_worker_mb_max")
    out[f"svidgate RSS per worker at 1k idle <= 100 MB (measured with {idle})"] = (
        check(rss, t["rss_per_worker_mb_max"], low=True)
        if idle >= 1000
        else {"value": rss, "ok": None}
    )
    if flood is not None and "error" not in flood:
        w = flood["worst"]
        out[f"svidgate RSS during {flood['connections']:,} stalled handshakes <= 200 MiB"] = check(
            w["rss_peak_mb"], t["flood_rss_peak_mib_max"], low=True
        )
        back = round(w["rss_after_mb"] - w["rss_before_mb"], 1)
        out[f"  … and {flood['settle_seconds']:.0f} s after: <= before + 20 MiB (MiB above)"] = (
            check(back, t["flood_rss_returns_within_mib"], low=True)
        )
    else:
        out["svidgate RSS during stalled handshakes <= 200 MiB"] = {"value": None, "ok": None}
    out["two workers / two cores >= 1.7x one / one"] = {
        "value": TWO_WORKERS_NOTE if server_cores < 2 else None,
        "ok": None,
    }
    return out


def _us(per_core: float | None) -> float | None:
    """Server CPU microseconds per request, from requests per busy core-second."""
    return 1e6 / per_core if per_core else None


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None else format(v, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = (str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "| " + " | ".join([first, *rest]) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


RATIO_COLUMNS = (
    "ka c=1",
    "ka c=16",
    "ka c=64",
    "new c=16",
    "ka c=64 per core",
    "new c=16 per core",
)


def _ratio_cells(r: dict[str, Any], p99_key: str) -> list[str]:
    """The cells of one ratio row: throughput ratios, p99 (ms, signed), RSS ratio; "—" where
    not measured."""
    keys = [*SCENARIOS, "ka-c64_per_core", "new-c16_per_core"]
    cells = [_fmt(r.get(k), ".2f") + ("x" if r.get(k) else "") for k in keys]
    rss = r.get("rss_per_worker")
    return [*cells, _fmt(r.get(p99_key), "+.3f"), _fmt(rss, ".1f") + ("x" if rss else "")]


def render(result: dict[str, Any]) -> str:
    summary: dict[str, dict[str, dict[str, Any]]] = result["summary"]
    ratio: dict[str, dict[str, Any]] = result["ratios"]
    memory: dict[str, Any] = result["memory"]
    meta = result["meta"]
    order = [t for t in result["targets"] if t in summary]
    direct_p99 = summary.get(DIRECT, {}).get("ka-c1", {}).get("p99_ms")

    header = [
        "target",
        "ka c=1 rps",
        "ka c=16 rps",
        "ka c=64 rps",
        "new c=16 conn/s",
        "p50 c=1 ms",
        "p99 c=1 ms",
        "p99 c=64 ms",
        "+p99 c=1 ms",
        "CPU c=64",
        "CPU µs/req c=64",
        "CPU µs/conn new",
        f"RSS/worker {meta.get('idle_connections', 1000)} idle MB",
        "KB/conn",
    ]
    rows = []
    for t in order:
        s = summary[t]
        p99 = s.get("ka-c1", {}).get("p99_ms")
        added = None if p99 is None or direct_p99 is None or t == DIRECT else p99 - direct_p99
        mem = memory.get(_proxy_of(t), {})
        rows.append(
            [
                t,
                _fmt(s.get("ka-c1", {}).get("rps")),
                _fmt(s.get("ka-c16", {}).get("rps")),
                _fmt(s.get("ka-c64", {}).get("rps")),
                _fmt(s.get("new-c16", {}).get("rps")),
                _fmt(s.get("ka-c1", {}).get("p50_ms"), ".3f"),
                _fmt(p99, ".3f"),
                _fmt(s.get("ka-c64", {}).get("p99_ms"), ".3f"),
                _fmt(added, "+.3f"),
                _fmt(s.get("ka-c64", {}).get("server_cpu"), ".2f"),
                _fmt(_us(s.get("ka-c64", {}).get("rps_per_core"))),
                _fmt(_us(s.get("new-c16", {}).get("rps_per_core"))),
                _fmt(mem.get("rss_per_worker_mb_max"), ".1f") if t != DIRECT else "—",
                _fmt(mem.get("kb_per_connection"), ".1f") if t != DIRECT else "—",
            ]
        )
    rheader = ["vs nginx", *RATIO_COLUMNS, "+p99 c=1 ms", "RSS/worker"]
    rrows = [[t, *_ratio_cells(ratio[t], "p99_added_ms")] for t in order if t in ratio]
    lines = [
        f"svidgate bench {meta['started']}  mode={meta['mode']} rounds={meta['rounds']} "
        f"seconds/run={meta['seconds']} server cpus={meta['server_cpus']} "
        f"load cpus={meta['client_cpus']} workers={meta['workers']}",
        f"note: {meta['note']}",
        "",
        "Absolute (medians over rounds; ka = keep-alive, new = full mTLS handshake per request;",
        "CPU = server cores busy during the c=64 run; +p99 = p99 over the direct upstream at c=1;",
        "per core / CPU µs = requests per busy server core-second and its inverse: fair even",
        "when a side did not saturate its core or shared it with other load)",
        _table(header, rows),
        "",
        "Ratios to nginx in the same run (throughput: higher is better)",
        _table(rheader, rrows),
    ]
    peers: dict[str, dict[str, Any]] = result.get("ratios_envoy") or {}
    if peers:
        pheader = ["vs Envoy", "Envoy target", *RATIO_COLUMNS, "p99 c=1 - Envoy's ms"]
        pheader.append("RSS/worker")
        prows = [[t, r["versus"], *_ratio_cells(r, "p99_vs_peer_ms")] for t, r in peers.items()]
        lines += [
            "",
            "Ratios to Envoy in the same run (svidgate-rbac ÷ envoy, the JWT routes ÷ envoy-jwt)",
            _table(pheader, prows),
        ]
    if meta.get("ab_note"):
        lines += ["", f"note: {meta['ab_note']}"]
    if result.get("verdicts"):
        lines += ["", "Issue 5 targets"]
        for name, v in result["verdicts"].items():
            mark = {True: "PASS", False: "MISS", None: "n/a "}[v["ok"]]
            value = v["value"]
            lines.append(f"  [{mark}] {name}: {'—' if value is None else value}")
    if result.get("verdicts_11"):
        lines += ["", "Issue 11 targets (data plane v2)"]
        for name, v in result["verdicts_11"].items():
            mark = {True: "PASS", False: "MISS", None: "n/a "}[v["ok"]]
            value = v["value"]
            lines.append(f"  [{mark}] {name}: {'—' if value is None else value}")
    flood = result.get("flood")
    if flood and "error" not in flood:
        w = flood["worst"]
        lines += [
            "",
            f"stalled-handshake flood: {flood['connections']:,} TCP connections, a ClientHello "
            f"each (no client certificate), never finished; the server answered "
            f"{flood['answered']:,}, held at most {flood['held_max']:,} at once (limits: "
            f"max_connections 4096/worker, handshake_timeout 5 s, 1,024 handshakes in "
            f"progress/worker), reset {flood['refused']:,} at accept, connect failed "
            f"{flood['connect_failed']:,}; worker RSS {w['rss_before_mb']} MB before, peak "
            f"{w['rss_peak_mb']} MB, {w['rss_after_mb']} MB {flood['settle_seconds']:.0f} s "
            f"after ({flood['seconds']} s flood)",
        ]
    errors = [
        f"  {t} {s}: {e}"
        for t, scen in summary.items()
        for s, d in scen.items()
        for e in d["errors"]
    ]
    if errors:
        lines += ["", "Failed runs (excluded from medians):", *errors]
    return "\n".join(lines)


def write(result: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{stamp}.json"
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    path.write_text(text)
    (directory / "latest.json").write_text(text)
    return path
