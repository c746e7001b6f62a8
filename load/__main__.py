"""``python -m load SCENARIO``: start replicas (and Redis), drive them, report.

Scenarios (docs/benchmarks.md has the results):
  a      1 replica, 20 rooms x 10 members x 10 Hz
  b      2 replicas + Redis, same load, members of each room on both replicas
  c      2 replicas + Redis, 5 rooms x 40 members x 20 Hz (big rooms)
  d      memory per idle connection, 1,000 and 5,000 connections
  e      churn: 100 joins and leaves per second for a minute
  faults 2 replicas + Redis under load: a replica stalled and resumed, Redis restarted
         and frozen, a replica killed; what the members saw (load/faults.py)
  claims what one POST /identities costs with 0, 2,000 and 20,000 claims made before
         in its scope (load/claims.py)
  hall   the lecture hall: 1 room of 300 stock clients joining within 10 s, a presenter
         at 20 Hz, 10 others at 5 Hz (the presenter's cursor as every viewer sees it)
  scale  the mid load of compare on 1, 2 and 4 presence replicas, each room on 2 of
         them, and on 4 with every room on all 4 (CPU per update as replicas are added;
         Redis CPU apart)
  compare  the stock Yjs clients (y-websocket, Hocuspocus's provider) against presence,
         Hocuspocus and the reference y-websocket server, in one run: low load
         10 x 5 @ 10 Hz, mid 20 x 10 @ 10 Hz, big rooms 5 x 40 @ 20 Hz (load/peers.py)
  custom --replicas --rooms --members --hz (--client stock --target …: see compare)
  sweep  scenario (a) at 2, 5, 10, 20 and 30 Hz (the latency-against-load curve)
  report the recorded results as load/results/report.md and latency.png, and the
         tables of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.processes import RedisProcess, Server
from load.clients import Plan, run_churn_worker, run_idle_worker, run_worker
from load.hist import Histogram
from load.peers import start_presence

SCENARIOS: dict[str, dict[str, Any]] = {
    "a": {"replicas": 1, "rooms": 20, "members": 10, "hz": 10},
    "b": {"replicas": 2, "rooms": 20, "members": 10, "hz": 10},
    "c": {"replicas": 2, "rooms": 5, "members": 40, "hz": 20},
}
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_ms() -> float:
    """This machine's speed before a run: milliseconds for a fixed pure-Python loop, the
    best of 5. Results recorded at different speeds do not compare (a shared host has run
    the same scenario on the same kind of machine at 16.6 and at 28 µs per update)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i * i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def progress(label: str, until: float, total: float) -> None:
    while (left := until - time.time()) > 0:
        done = 1 - left / total
        bar = "#" * int(done * 30)
        print(f"\r{label} [{bar:<30}] {done:4.0%}", end="", file=sys.stderr, flush=True)
        time.sleep(min(1.0, left))
    print(f"\r{label} [{'#' * 30}] 100%", file=sys.stderr)


# The cells of ``compare``: (name, rooms, members, hz), each on 2 replicas + Redis.
COMPARE = [("low", 10, 5, 10), ("mid", 20, 10, 10), ("big", 5, 40, 20)]


def run_stock(name: str, cfg: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    """A moving scenario with stock Yjs clients (Node) against ``opts.target``."""
    from load.peers import results, run_stock_workers, start_target

    servers, redis = start_target(opts.target, cfg["replicas"], opts.server_arg)
    try:
        n = cfg["rooms"] * cfg["members"]
        members = [
            {
                "index": i,
                "server": servers[_replica_of(i, cfg, len(servers))].base,
                "room": f"load-{i // cfg['members']}",
            }
            for i in range(n)
        ]
        room_of = {f"c{i}": i // cfg["members"] for i in range(n)}
        start_at = time.time() + 3 + n / 100  # time to connect everyone
        plan = {
            "kind": "hocuspocus" if opts.target == "hocuspocus" else "yws",
            "hz": cfg["hz"],
            "warmup": opts.warmup,
            "duration": opts.duration,
            "start_at": start_at,
        }
        procs = run_stock_workers(members, plan, max(1, opts.workers))
        measure_from = start_at + opts.warmup
        progress(f"{name} ({opts.target}): warm-up", measure_from, measure_from - time.time())
        pids = [s.proc.pid for s in servers if s.proc]
        if redis is not None and redis.proc is not None:
            redis_pid = redis.proc.pid
            redis0 = cpu_seconds(redis_pid)
            traffic0 = redis_traffic(redis)
        cpu0 = sum(cpu_seconds(p) for p in pids)
        clients0 = sum(cpu_seconds(p.pid) for p in procs)
        progress(f"{name} ({opts.target}): measuring", measure_from + opts.duration, opts.duration)
        cpu1 = sum(cpu_seconds(p) for p in pids)
        clients1 = sum(cpu_seconds(p.pid) for p in procs)
        redis_cpu = cpu_seconds(redis_pid) - redis0 if redis is not None else 0.0
        traffic = {}
        if redis is not None:
            traffic1 = redis_traffic(redis)
            traffic = {k: round((traffic1[k] - traffic0[k]) / opts.duration) for k in traffic1}
        parts = results(procs)
        result = summarize(name, cfg, opts, parts, room_of, cpu1 - cpu0, servers)  # type: ignore[arg-type]
        return {
            **result,
            "target": opts.target,
            "client": "stock",
            "workers": max(1, opts.workers),  # generator processes
            "redis_cpu_s": round(redis_cpu, 2),
            # Per second of the measurement: commands (publishes, hash writes), and
            # bytes into and out of Redis (out: every publish once per subscriber).
            "redis_per_s": traffic,
            # Near opts.workers x duration: the generator, not the server, was the limit.
            "clients_cpu_s": round(clients1 - clients0, 2),
        }
    finally:
        for s in servers:
            s.stop()
        if redis is not None:
            redis.stop()


def redis_traffic(redis: RedisProcess) -> dict[str, int]:
    with redis.client() as client:
        stats = client.info("stats")
    return {
        "commands": int(stats["total_commands_processed"]),
        "bytes_in": int(stats["total_net_input_bytes"]),
        "bytes_out": int(stats["total_net_output_bytes"]),
    }


def run_hall(opts: argparse.Namespace) -> dict[str, Any]:
    """The lecture hall: an instructor shares a notebook with a class. One room of 300
    stock clients on 2 replicas, joining over 10 s while the presenter moves at 20 Hz
    and 10 others at 5 Hz; the rest stay still (their providers renew every 15 s). What
    counts: the presenter's cursor as every viewer sees it, during the join storm and
    after, and the bytes the clients receive per join."""
    from load.peers import results, run_stock_workers, start_target

    members, storm, after = 300, 10.0, 20.0
    servers, redis = start_target("presence", 2, opts.server_arg)
    try:
        begin = time.time() + 3
        plan_members = [
            {
                "index": i,
                "server": servers[i % 2].base,
                "room": "hall",
                "hz": 20 if i == 0 else 5 if i <= 10 else 0,
                "join_at": begin + storm * i / members,
            }
            for i in range(members)
        ]
        plan = {
            "kind": "yws",
            "hz": 0,
            "warmup": 0.0,
            "duration": storm + after,
            "start_at": begin,
            "storm_end": begin + storm,
            "watch": "c0",
        }
        procs = run_stock_workers(plan_members, plan, max(1, opts.workers))
        pids = [s.proc.pid for s in servers if s.proc]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        progress("hall", begin + storm + after, storm + after + 3)
        cpu1 = sum(cpu_seconds(p) for p in pids)
        rss = [round(rss_bytes(p) / 2**20, 1) for p in pids]
        clients_cpu = sum(cpu_seconds(p.pid) for p in procs)  # is the generator the limit?
        parts = results(procs)
    finally:
        for s in servers:
            s.stop()
        if redis is not None:
            redis.stop()
    during, later = Histogram(), Histogram()
    for p in parts:
        during.merge(Histogram.from_json(p["latency_storm"]))
        later.merge(Histogram.from_json(p["latency"]))
    joined = sum(p["joined"] for p in parts)
    storm_bytes = sum(p["bytes_received_storm"] for p in parts)

    def percentiles(h: Histogram) -> dict[str, float]:
        return {q: round(h.percentile_ms(float(q)), 2) for q in ("50", "99", "99.9")} | {
            "max": h.max_us / 1000
        }

    return {
        "scenario": "hall",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": members,
        "joined": joined,
        "errors": sum(p["errors"] for p in parts),
        "disconnects": sum(p["disconnects"] for p in parts),
        "close_codes": _sum_counts(p["close_codes"] for p in parts),
        "worst_ms_by_second": {
            k: round(max(p["worst_by_second"].get(k, 0) for p in parts) * 1000, 1)
            for k in sorted({k for p in parts for k in p["worst_by_second"]}, key=int)
        },
        "presenter_latency_ms_during_joins": percentiles(during),
        "presenter_latency_ms_after": percentiles(later),
        "presenter_updates_seen": during.total + later.total,
        "bytes_received_during_joins": storm_bytes,
        "bytes_per_join": round(storm_bytes / joined) if joined else None,
        "bytes_received_after": sum(p["bytes_received_after"] for p in parts),
        "server_cpu_s": round(cpu1 - cpu0, 2),
        "clients_cpu_s": round(clients_cpu, 2),
        "wall_s": round(storm + after + 3, 1),
        "server_rss_mib": rss,
    }


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _replica_of(i: int, cfg: dict[str, Any], replicas: int) -> int:
    """Client ``i``'s replica: round-robin over all of them, or, with ``span``, over
    ``span`` consecutive replicas starting at its room's (rooms spread evenly)."""
    span = cfg.get("span")
    if span is None:
        return i % replicas
    room, k = divmod(i, cfg["members"])
    return (room + k % span) % replicas


# (replicas, replicas each room spans) of ``scale``: rooms on 2 replicas whatever the
# count, and, for the worst case, every room on all 4.
SCALE = [(1, 1), (2, 2), (4, 2), (4, 4)]


def run_scale(opts: argparse.Namespace) -> dict[str, Any]:
    """The mid load (20 rooms x 10 @ 10 Hz, stock clients) on 1, 2 and 4 replicas."""
    opts.target = "presence"
    runs = [
        run_stock(
            f"scale-{n}-{span}",
            {"replicas": n, "span": span, "rooms": 20, "members": 10, "hz": 10},
            opts,
        )
        for n, span in SCALE
    ]
    return {
        "scenario": "scale",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
    }


def run_compare(opts: argparse.Namespace) -> dict[str, Any]:
    from load.peers import TARGETS

    cells = []
    for name, rooms, members, hz in COMPARE:
        cfg = {"replicas": 2, "rooms": rooms, "members": members, "hz": hz}
        for target in TARGETS:
            opts.target = target
            cells.append(run_stock(f"{name}-{target}", cfg, opts))
    return {
        "scenario": "compare",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cells": cells,
    }


def run_moving(name: str, cfg: dict[str, Any], opts: argparse.Namespace) -> dict[str, Any]:
    replicas, redis = start_presence(cfg["replicas"], opts.server_arg)
    try:
        n = cfg["rooms"] * cfg["members"]
        path = "yjs" if opts.protocol == "yjs" else "rooms"
        urls = [
            f"{replicas[i % len(replicas)].ws}/{path}/load-{i // cfg['members']}" for i in range(n)
        ]
        room_of = {f"c{i}": i // cfg["members"] for i in range(n)}
        start_at = time.time() + 3 + n / 500  # time to connect everyone
        workers = max(1, opts.workers)
        chunks = [list(range(n))[w::workers] for w in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            futures = []
            for chunk in chunks:
                plan = Plan(
                    [urls[i] for i in chunk],
                    cfg["hz"],
                    opts.warmup,
                    opts.duration,
                    opts.protocol,
                    start_at,
                )
                futures.append(pool.submit(run_worker, chunk, plan))
            measure_from = start_at + opts.warmup
            progress(f"{name}: warm-up", measure_from, measure_from - time.time())
            pids = [r.proc.pid for r in replicas if r.proc]
            cpu0 = sum(cpu_seconds(p) for p in pids)
            progress(f"{name}: measuring", measure_from + opts.duration, opts.duration)
            cpu1 = sum(cpu_seconds(p) for p in pids)
            parts = [f.result() for f in futures]
        return summarize(name, cfg, opts, parts, room_of, cpu1 - cpu0, replicas)
    finally:
        for r in replicas:
            r.stop()
        if redis is not None:
            redis.stop()


def summarize(
    name: str,
    cfg: dict[str, Any],
    opts: argparse.Namespace,
    parts: list[dict[str, Any]],
    room_of: dict[str, int],
    cpu: float,
    replicas: list[Server],
) -> dict[str, Any]:
    latency = Histogram()
    sent = received = errors = disconnects = joined = 0
    highest: dict[str, dict[str, int]] = {}
    sent_by: dict[str, int] = {}
    first_by: dict[str, int] = {}
    for p in parts:
        latency.merge(Histogram.from_json(p["latency"]))
        sent += p["sent"]
        received += p["received"]
        errors += p["errors"]
        disconnects += p["disconnects"]
        joined += p["joined"]
        highest.update(p["highest"])
        sent_by.update(p["sent_by"])
        first_by.update(p["first_by"])
    members_of: dict[int, list[str]] = {}
    for client, room in room_of.items():
        members_of.setdefault(room, []).append(client)
    expected = covered = 0
    for receiver, room in room_of.items():
        seen = highest.get(receiver, {})
        for sender in members_of[room]:
            if sender == receiver:
                continue
            n = sent_by.get(sender, 0)
            expected += n
            # Everything up to the newest update seen was delivered or superseded by it.
            covered += max(0, min(n, seen.get(sender, -1) - first_by.get(sender, 0) + 1))
    delivered_share = covered / expected if expected else 0.0
    return {
        "scenario": name,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "protocol": opts.protocol,
        "config": cfg,
        "warmup_s": opts.warmup,
        "duration_s": opts.duration,
        "clients": len(room_of),
        "joined": joined,
        "updates_sent": sent,
        "updates_observed": received,
        "delivered_or_superseded": round(delivered_share, 5),
        "latency_ms": {
            p: round(latency.percentile_ms(float(p)), 2) for p in ("50", "90", "99", "99.9")
        }
        | {"max": latency.max_us / 1000},
        # Scenario (c) asks that every member see the others' latest cursor within 200 ms.
        "share_within_200ms": round(latency.share_within_ms(200), 6),
        "server_cpu_s": round(cpu, 2),
        "server_cpu_us_per_delivered": round(cpu / received * 1e6, 1) if received else None,
        "errors": errors,
        "disconnects": disconnects,
        "server_rss_mib": [round(rss_bytes(r.proc.pid) / 2**20, 1) for r in replicas if r.proc],
    }


def run_idle(opts: argparse.Namespace) -> dict[str, Any]:
    results = []
    for count in (1000, 5000):
        (server,), _ = start_presence(1, opts.server_arg)
        try:
            assert server.proc is not None
            time.sleep(1)
            before = rss_bytes(server.proc.pid)
            path = "yjs" if opts.protocol == "yjs" else "rooms"
            urls = [f"{server.ws}/{path}/idle-{i // 10}" for i in range(count)]
            hold = 8 + count / 400
            with ProcessPoolExecutor(2) as pool:
                parts = [pool.submit(run_idle_worker, urls[w::2], hold) for w in range(2)]
                progress(f"d: {count} idle", time.time() + hold - 2, hold - 2)
                after = rss_bytes(server.proc.pid)
                joined = sum(p.result()["joined"] for p in parts)
            results.append(
                {
                    "connections": count,
                    "joined": joined,
                    "rss_before_mib": round(before / 2**20, 1),
                    "rss_after_mib": round(after / 2**20, 1),
                    "kib_per_connection": round((after - before) / 1024 / max(1, joined), 2),
                }
            )
        finally:
            server.stop()
    return {
        "scenario": "d",
        "protocol": opts.protocol,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "idle": results,
    }


def run_churn(opts: argparse.Namespace) -> dict[str, Any]:
    (server,), _ = start_presence(1, opts.server_arg)
    try:
        assert server.proc is not None

        def sample() -> dict[str, float]:
            m = server.metrics()
            return {
                "rss_mib": round(rss_bytes(server.proc.pid) / 2**20, 1),  # type: ignore[union-attr]
                "rooms": m["presence_rooms"],
                "connections": sum(v for k, v in m.items() if k.startswith("presence_sessions{")),
                "tasks": m.get("presence_tasks", float("nan")),
            }

        time.sleep(1)
        baseline = sample()
        duration = opts.duration if opts.duration != 30 else 60
        with ProcessPoolExecutor(1) as pool:
            part = pool.submit(run_churn_worker, server.ws, 20, 100, duration)
            progress("e: churn", time.time() + duration, duration)
            result = part.result()
        time.sleep(2)
        after = sample()
        return {
            "scenario": "e",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "rate_per_s": 100,
            "duration_s": duration,
            **result,
            "baseline": baseline,
            "after": after,
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenario",
        choices=[
            *("a", "b", "c", "d", "e", "faults", "claims", "custom", "sweep"),
            *("compare", "hall", "scale", "report"),
        ],
    )
    parser.add_argument(
        "--client",
        choices=["python", "stock"],
        default="python",
        help="the project's clients (python) or stock Yjs providers in Node (stock)",
    )
    parser.add_argument(
        "--target",
        choices=["presence", "hocuspocus", "ywebsocket"],
        default="presence",
        help="with --client stock: the server under load",
    )
    parser.add_argument("--protocol", choices=["json", "yjs"], default="json")
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--hz", type=float, default=10)
    parser.add_argument("--out", type=Path, help="result file (default: load/results/)")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for presence serve (repeatable)",
    )
    opts = parser.parse_args()
    if opts.scenario == "report":
        from load.report import write_report
        from load.tables import BENCHMARKS, load_results, update_doc

        out = opts.out or RESULTS
        print(f"written to {write_report(RESULTS, out)}", file=sys.stderr)
        BENCHMARKS.write_text(update_doc(BENCHMARKS.read_text(), load_results(RESULTS)))
        print(f"tables rewritten in {BENCHMARKS}", file=sys.stderr)
        return
    if opts.client == "stock" or opts.scenario in ("compare", "hall", "scale"):
        from load.peers import node

        node()  # installs the Node packages if need be: before any run sets its schedule
    speed = machine_ms()
    if opts.scenario == "d":
        result = run_idle(opts)
    elif opts.scenario == "faults":
        from load.faults import run_faults

        result = run_faults()
    elif opts.scenario == "claims":
        from load.claims import run_claims

        result = run_claims()
    elif opts.scenario == "e":
        result = run_churn(opts)
    elif opts.scenario == "compare":
        result = run_compare(opts)
    elif opts.scenario == "hall":
        result = run_hall(opts)
    elif opts.scenario == "scale":
        result = run_scale(opts)
    elif opts.scenario == "sweep":
        runs = [
            run_moving(f"sweep-{hz}hz", {**SCENARIOS["a"], "hz": hz}, opts)
            for hz in (2, 5, 10, 20, 30)
        ]
        result = {"scenario": "sweep", "runs": runs}
    else:
        cfg = SCENARIOS.get(opts.scenario) or {
            "replicas": opts.replicas,
            "rooms": opts.rooms,
            "members": opts.members,
            "hz": opts.hz,
        }
        run = run_stock if opts.client == "stock" else run_moving
        result = run(opts.scenario, cfg, opts)
    result["machine_ms"] = speed
    stock = opts.client == "stock" or opts.scenario in ("compare", "hall", "scale")
    suffix = "stock" if stock else opts.protocol
    out = opts.out or RESULTS / f"{opts.scenario}-{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
