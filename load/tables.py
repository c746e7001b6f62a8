"""The tables of docs/benchmarks.md, generated from ``load/results/*.json``.

``python -m load report`` rewrites what lies between ``<!-- results:begin NAME -->`` and
``<!-- results:end NAME -->`` in the doc; tests/test_docs.py checks the doc is up to date,
so a hand edit or a new result that was not written into the doc fails the suite.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "load" / "results"
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
# python -m load's defaults: a command shows --duration and --warmup only when they differ.
DURATION, WARMUP, CHURN_DURATION = 30.0, 5.0, 60.0
X = "\u00d7"  # the multiplication sign, spelt out for ruff (RUF001)
NOTE = "_Generated from `load/results/*.json` by `python -m load report`: do not edit._"

_BLOCK = re.compile(r"(<!-- results:begin (\S+) -->\n).*?(<!-- results:end \2 -->)", re.S)

Result = dict[str, Any]


def load_results(results_dir: Path = RESULTS) -> list[Result]:
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]


def update_doc(text: str, loaded: list[Result]) -> str:
    """``text`` with every marked block replaced by its table; each table must be marked."""
    tables = render(loaded)
    found = [m.group(2) for m in _BLOCK.finditer(text)]
    if sorted(found) != sorted(tables):
        raise ValueError(f"expected one marked block for each of {sorted(tables)}, found {found}")
    return _BLOCK.sub(lambda m: f"{m.group(1)}\n{NOTE}\n\n{tables[m.group(2)]}\n{m.group(3)}", text)


def render(loaded: list[Result]) -> dict[str, str]:
    by = {(r["scenario"], r.get("protocol", "json")): r for r in loaded}
    runs = sorted(
        (r for r in loaded if "latency_ms" in r), key=lambda r: (r["scenario"], r["protocol"])
    )
    sweep: list[Result] = next((r["runs"] for r in loaded if r["scenario"] == "sweep"), [])
    return {
        "runs": _runs(runs, by.get(("c", "json"))),
        "memory": _memory(by.get(("d", "json")), by.get(("e", "json")), by.get(("d", "yjs"))),
        "sweep": _sweep(sweep),
        "targets": _targets(by),
        "faults": _faults(by.get(("faults", "json"))),
        "compare": _compare(by.get(("compare", "json"))),
        "hall": _hall(by.get(("hall", "json"))),
        "scale": _scale(by.get(("scale", "json"))),
    }


def _machine(*results: Result) -> str:
    """The machine speed the results were recorded at, where they say (``machine_ms``)."""
    measured = [r for r in results if "machine_ms" in r]
    if not measured:
        return ""
    speeds = sorted({r["machine_ms"] for r in measured})
    which = "" if len(measured) == len(results) else f" ({len(measured)} of the rows)"
    return (
        f" Machine: {' and '.join(f'{x:g}' for x in speeds)} ms for `load`'s reference "
        f"loop{which} (lower is faster; results at different speeds do not compare)."
    )


def _hall(r: Result | None) -> str:
    if r is None:
        return "Not recorded yet: `python -m load hall`.\n"
    during, after = r["presenter_latency_ms_during_joins"], r["presenter_latency_ms_after"]
    lines = [
        f"Recorded {r['date'][:10]} with `python -m load hall`: {r['members']} stock clients "
        f"in one room on 2 replicas + Redis, {r['joined']} joined, {r['errors']} errors, "
        f"{r['disconnects']} disconnects.{_machine(r)}",
        "",
        "| | presenter's cursor, p50 | p99 | p99.9 | max |",
        "| --- | --- | --- | --- | --- |",
        _row(
            ["while the class joins (10 s)", *(_ms(during[q]) for q in ("50", "99", "99.9", "max"))]
        ),
        _row(["after", *(_ms(after[q]) for q in ("50", "99", "99.9", "max"))]),
        "",
        f"Bytes the clients received while joining: {r['bytes_per_join'] / 1024:.0f} KiB per "
        f"join, all clients together (the joiner's snapshot, and everybody else learning "
        f"of the joiner); server memory: "
        f"{' and '.join(f'{m:g} MiB' for m in r['server_rss_mib'])} (RSS of each replica).",
    ]
    return "\n".join(lines) + "\n"


def _scale(r: Result | None) -> str:
    if r is None:
        return "Not recorded yet: `python -m load scale`.\n"
    runs: list[Result] = r["runs"]
    two = next((x for x in runs if x["config"]["replicas"] == 2), None)
    lines = [
        f"Recorded {r['date'][:10]} with `python -m load scale --duration "
        f"{runs[0]['duration_s']:g}{_workers(runs[0])}` (20 rooms {X} 10 @ 10 Hz, "
        f"stock clients).{_machine(r)}",
        "",
        "| replicas | each room on | delivered or superseded | p50 | p99 "
        "| server CPU per delivered update | against 2 replicas | Redis CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in runs:
        cpu = x["server_cpu_us_per_delivered"]
        ratio = "-" if two is None else f"{cpu / two['server_cpu_us_per_delivered']:.2f}"
        replicas = x["config"]["replicas"]
        redis = f"{x['redis_cpu_s']:g} s" if replicas > 1 else "-"
        span = x["config"].get("span") or replicas
        lines.append(
            _row(
                [
                    str(replicas),
                    f"{span} replica{'s' if span > 1 else ''}",
                    _pct(x["delivered_or_superseded"]),
                    _ms(x["latency_ms"]["50"]),
                    _ms(x["latency_ms"]["99"]),
                    f"{cpu} µs",
                    ratio,
                    redis,
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _workers(run: Result) -> str:
    workers = run.get("workers", 2)
    return "" if workers == 2 else f" --workers {workers}"


PEERS = {"presence": "presence", "hocuspocus": "Hocuspocus", "ywebsocket": "y-websocket server"}


def _compare(result: Result | None) -> str:
    """presence beside its peers, with stock Yjs clients, from one run."""
    if result is None:
        return "Not recorded yet: `python -m load compare`.\n"
    cells: list[Result] = result["cells"]
    first = cells[0]
    lines = [
        f"Recorded {result['date'][:10]} with `python -m load compare` "
        f"({first['warmup_s']:g} s warm-up, {first['duration_s']:g} s measured per cell); "
        "2 replicas + Redis for presence and Hocuspocus, one process for the y-websocket "
        f"server (it has no replicas).{_machine(result)}",
        "",
        "| load | server | delivered or superseded | p50 | p99 | server CPU per delivered "
        "update | its ratio to Hocuspocus's | Redis CPU | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in cells:
        cfg, target = r["config"], r["target"]
        load = f"{cfg['rooms']} rooms {X} {cfg['members']} @ {cfg['hz']:g} Hz"
        peer = next((c for c in cells if c["config"] == cfg and c["target"] == "hocuspocus"), None)
        ratio = "-"
        if peer is not None and peer["server_cpu_us_per_delivered"] and target != "hocuspocus":
            ratio = f"{r['server_cpu_us_per_delivered'] / peer['server_cpu_us_per_delivered']:.2f}"
        lines.append(
            _row(
                [
                    load,
                    PEERS[target],
                    _pct(r["delivered_or_superseded"]),
                    _ms(r["latency_ms"]["50"]),
                    _ms(r["latency_ms"]["99"]),
                    f"{r['server_cpu_us_per_delivered']} µs",
                    ratio,
                    f"{r['redis_cpu_s']:g} s"
                    if r["config"]["replicas"] > 1 and target != "ywebsocket"
                    else "-",
                    str(r["errors"]),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _runs(runs: list[Result], c: Result | None) -> str:
    dates = ", ".join(sorted({r["date"][:10] for r in runs}))
    lines = [
        f"Recorded {dates}; {_values(runs, 'warmup_s')} warm-up, "
        f"{_values(runs, 'duration_s')} measured.{_machine(*runs)}",
        "",
        "| scenario | command | delivered or superseded | seen within 200 ms | p50 | p90 "
        "| p99 | p99.9 | max | server CPU per delivered update | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lat = r["latency_ms"]
        cells = [
            _scenario(r),
            f"`{_command(r)}`",
            _pct(r["delivered_or_superseded"]),
            _pct(r["share_within_200ms"]),
            *(_ms(lat[p]) for p in ("50", "90", "99", "99.9", "max")),
            f"{r['server_cpu_us_per_delivered']} µs",
            str(r["errors"]),
        ]
        lines.append(_row(cells))
    if c is not None:
        lines += [
            "",
            f"In (c) {c['joined']} of {c['clients']} clients joined, {c['disconnects']} were "
            f"disconnected, {_pct(c['share_within_200ms'])} of the delivered updates were seen "
            f"within 200 ms of being sent, and the replicas ended at "
            f"{' and '.join(map(str, c['server_rss_mib']))} MiB RSS.",
        ]
    return "\n".join(lines) + "\n"


def _memory(d: Result | None, e: Result | None, d_yjs: Result | None = None) -> str:
    lines = ["| scenario | command | result |", "| --- | --- | --- |"]
    for idle_run, label, command in (
        (d, "(d) idle connections", "python -m load d"),
        (d_yjs, "(d) idle Yjs connections", "python -m load d --protocol yjs"),
    ):
        if idle_run is None:
            continue
        idle = [
            f"{i['connections']:,}: {i['kib_per_connection']:.1f} KiB RSS per connection "
            f"({i['rss_before_mib']} → {i['rss_after_mib']} MiB"
            + ("" if i["joined"] == i["connections"] else f", {i['joined']:,} joined")
            + ")"
            for i in idle_run["idle"]
        ]
        lines.append(_row([label, f"`{command}`", "; ".join(idle)]))
    if e is not None:
        duration = "" if e["duration_s"] == CHURN_DURATION else f" --duration {e['duration_s']:g}"
        churn = (
            f"(e) churn, {e['rate_per_s']} joins and leaves per second for {e['duration_s']:g} s"
        )
        result = f"{e['visits']:,} visits, {e['errors']} errors; {_growth(e)}"
        lines.append(_row([churn, f"`python -m load e{duration}`", result]))
    return "\n".join(lines) + "\n"


def _sweep(runs: list[Result]) -> str:
    if not runs:
        return "No sweep recorded.\n"
    cfg = runs[0]["config"]
    lines = [
        f"The sweep (`{_command({**runs[0], 'scenario': 'sweep'})}`), {_replicas(cfg)}, "
        f"{cfg['rooms']} rooms {X} {cfg['members']} members:",
        "",
        "| rate | offered peer deliveries/s | delivered or superseded | p50 | p99 | p99.9 "
        "| CPU per delivered update |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(runs, key=lambda r: float(r["config"]["hz"])):
        c, lat = r["config"], r["latency_ms"]
        offered = c["rooms"] * c["members"] * c["hz"] * (c["members"] - 1)
        cells = [f"{c['hz']:g} Hz", f"{offered:,.0f}", _pct(r["delivered_or_superseded"])]
        cells += [_ms(lat["50"]), _ms(lat["99"]), _ms(lat["99.9"])]
        lines.append(_row([*cells, f"{r['server_cpu_us_per_delivered']} µs"]))
    return "\n".join(lines) + "\n"


def _faults(f: Result | None) -> str:
    if f is None:
        return "No fault run recorded.\n"
    stall, restart, freeze = f["stall"], f["redis_restart"], f["redis_freeze"]
    lines = [
        f"Recorded {f['date'][:10]} with `python -m load faults`: 2 replicas + Redis, "
        f"{f['members']} members in {f['rooms']} rooms on both replicas, each moving at "
        f"{f['hz']:g} Hz, `--replica-timeout {f['replica_timeout_s']:g}`. Seconds from the "
        "fault (or from its end, where it says so).",
        "",
        "| fault | what the members on the other replica saw | /readyz |",
        "| --- | --- | --- |",
        _row(
            [
                f"a replica stopped (SIGSTOP) {stall['stopped_s']:g} s, then resumed",
                f"its members left after {_s(stall['members_left_after_s'])}; everyone seen "
                f"again {_s(stall['everyone_again_after_resume_s'])} after it resumed, its "
                f"updates flowing again after {_s(stall['updates_flow_again_after_resume_s'])}",
                "—",
            ]
        ),
        _row(
            [
                f"Redis killed (SIGKILL), started again {restart['outage_s']:.0f} s later",
                f"updates across replicas again {_s(restart['updates_flow_again_after_s'])} "
                "after Redis was back",
                f"not ready after {_s(restart['not_ready_after_s'])}, ready "
                f"{_s(restart['ready_again_after_s'])} after Redis was back",
            ]
        ),
        _row(
            [
                f"Redis frozen (SIGSTOP) {freeze['outage_s']:.0f} s",
                f"updates across replicas again {_s(freeze['updates_flow_again_after_s'])} "
                "after the thaw",
                f"not ready after {_s(freeze['not_ready_after_s'])}, ready "
                f"{_s(freeze['ready_again_after_s'])} after the thaw",
            ]
        ),
        _row(
            [
                "a replica killed (SIGKILL)",
                f"its members left after {_s(f['kill']['members_left_after_s'])}",
                "—",
            ]
        ),
    ]
    return "\n".join(lines) + "\n"


def _s(seconds: float | None) -> str:
    return "never (within the run)" if seconds is None else f"{seconds:.2f} s"


def _growth(e: Result) -> str:
    before, after = e["baseline"], e["after"]
    counts = [("rooms", "rooms"), ("connections", "connections"), ("asyncio tasks", "tasks")]
    return f"RSS {before['rss_mib']} → {after['rss_mib']} MiB, " + ", ".join(
        f"{label} {before[k]:g} → {after[k]:g}" for label, k in counts
    )


# (target, scenarios it is judged on, passes, what was measured); a check of
# None means the target has no threshold to check: the figure is shown for the reader.
TARGETS: list[tuple[str, str, Callable[[Result], bool] | None, Callable[[Result], str]]] = [
    (
        "(a), (b): ≥ 99.9% delivered or superseded, no error",
        "ab",
        lambda r: r["delivered_or_superseded"] >= 0.999 and r["errors"] == 0,
        lambda r: f"{_pct(r['delivered_or_superseded'])}, {r['errors']} errors",
    ),
    ("(a), (b): p99 ≤ 20 ms", "ab", lambda r: r["latency_ms"]["99"] <= 20, lambda r: _p99(r)),
    (
        "(a), (b): ≤ 25 µs server CPU per delivered update",
        "ab",
        lambda r: r["server_cpu_us_per_delivered"] <= 25,
        lambda r: f"{r['server_cpu_us_per_delivered']} µs",
    ),
    ("(c): p99 ≤ 100 ms", "c", lambda r: r["latency_ms"]["99"] <= 100, lambda r: _p99(r)),
    (
        "(c): latest cursor everywhere within 200 ms",
        "c",
        lambda r: r["share_within_200ms"] == 1.0,
        lambda r: f"{_pct(r['share_within_200ms'])} of delivered updates seen within 200 ms",
    ),
    (
        "(c): every client joins",
        "c",
        lambda r: r["joined"] == r["clients"] and r["disconnects"] == 0,
        lambda r: f"{r['joined']}/{r['clients']} joined, {r['disconnects']} disconnected",
    ),
    (
        "(c): memory bounded",
        "c",
        None,
        lambda r: f"{' and '.join(map(str, r['server_rss_mib']))} MiB RSS per replica",
    ),
    (
        "(d): ≤ 20 KiB per idle connection",
        "d",
        lambda r: all(i["kib_per_connection"] <= 20 for i in r["idle"]),
        lambda r: ", ".join(f"{i['kib_per_connection']:.1f} KiB" for i in r["idle"]),
    ),
    (
        "(e): no growth (rooms, connections and asyncio tasks back to where they were)",
        "e",
        lambda r: all(r["after"][k] == r["baseline"][k] for k in ("rooms", "connections", "tasks")),
        _growth,
    ),
]


def _targets(by: dict[tuple[str, str], Result]) -> str:
    lines = ["| target | JSON protocol | Yjs endpoint |", "| --- | --- | --- |"]
    for target, scenarios, passes, measured in TARGETS:
        cells = [
            _judge({s: by.get((s, protocol)) for s in scenarios}, passes, measured)
            for protocol in ("json", "yjs")
        ]
        lines.append(_row([target, *cells]))
    return "\n".join(lines) + "\n"


def _judge(
    runs: dict[str, Result | None],
    passes: Callable[[Result], bool] | None,
    measured: Callable[[Result], str],
) -> str:
    done = {s: r for s, r in runs.items() if r is not None}
    if not done:
        return "—"
    shown = "; ".join((f"({s}) " if len(runs) > 1 else "") + measured(r) for s, r in done.items())
    if len(done) < len(runs):
        status = "partly measured"
    elif passes is None:
        status = "no threshold"
    else:
        status = "met" if all(passes(r) for r in done.values()) else "**not met**"
    return f"{status}: {shown}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _scenario(r: Result) -> str:
    cfg = r["config"]
    label = (
        f"({r['scenario']}) {_replicas(cfg)}, {cfg['rooms']} rooms {X} {cfg['members']} members "
        f"{X} {cfg['hz']:g} Hz"
    )
    return label + (", Yjs endpoint" if r["protocol"] == "yjs" else "")


def _replicas(cfg: Result) -> str:
    n = cfg["replicas"]
    return "1 replica" if n == 1 else f"{n} replicas + Redis"


def _command(r: Result) -> str:
    """The ``python -m load`` command line that records ``r``."""
    words = ["python -m load", r["scenario"]]
    if r["scenario"] not in ("a", "b", "c", "sweep"):
        cfg = r["config"]
        words += [f"--{k} {cfg[k]:g}" for k in ("replicas", "rooms", "members", "hz")]
    if r["protocol"] != "json":
        words.append(f"--protocol {r['protocol']}")
    if r["duration_s"] != DURATION:
        words.append(f"--duration {r['duration_s']:g}")
    if r["warmup_s"] != WARMUP:
        words.append(f"--warmup {r['warmup_s']:g}")
    return " ".join(words)


def _values(runs: list[Result], key: str) -> str:
    return " or ".join(f"{v:g} s" for v in sorted({float(r[key]) for r in runs}))


def _pct(share: float) -> str:
    # Rounded down, so that anything short of everything never reads as 100%.
    percent = math.floor(share * 100_000 + 1e-6) / 1000
    return f"{percent:.3f}".rstrip("0").rstrip(".") + "%"


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _p99(r: Result) -> str:
    return _ms(r["latency_ms"]["99"])
