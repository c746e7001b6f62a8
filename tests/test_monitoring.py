"""Observability for operators: the dashboard and alert rules of deploy/monitoring/ name
only metrics and labels that a real replica exposes; the fan-out delay histogram; the
access log (its lines, its fields, never a token, off with --access-log false)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
import yaml

from harness.processes import RedisProcess
from presence.backplane.memory import MemoryBus
from presence.codecs import sse
from presence.endpoints.json import join as join_json
from presence.hub.hub import Hub
from presence.hub.outbox import Outbox
from presence.logs.access import REFUSAL_BURST, AccessLog
from presence.metrics import Metrics
from tests.conftest import FAST, Server
from tests.test_hub import Clock, make_hub, outbox_for
from tests.test_json_protocol import join
from tests.test_outbox import Peer
from tests.test_replicas import published
from tests.yjs_client import YClient

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
ServerFactory = Callable[..., Server]

# -- PromQL, as much of it as the dashboard and the rules use ----------------------------------

# Words of PromQL that are not metrics: aggregations, functions, keywords.
NOT_METRICS = {
    *("sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk"),
    *("quantile", "count_values", "group", "by", "without", "on", "ignoring"),
    *("group_left", "group_right", "and", "or", "unless", "bool", "offset"),
    *("rate", "irate", "increase", "delta", "idelta", "deriv", "absent", "histogram_quantile"),
    *("label_values", "time", "vector", "scalar", "clamp_min", "clamp_max", "abs", "inf"),
}
# Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"job", "instance"}
# Prometheus' own series.
PROMETHEUS_METRICS = {"up"}
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"


def parse_promql(expr: str) -> tuple[dict[str, set[str]], set[str]]:
    """The metrics ``expr`` selects, each with the labels its matchers name, and the
    labels of its ``by``/``without``/``on``/``ignoring`` clauses."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: no names in them
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval, $job)
    grouped: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        grouped |= {label.strip() for label in clause.split(",") if label.strip()}
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    metrics: dict[str, set[str]] = {}
    for name, matchers in re.findall(rf"({NAME})\s*\{{([^}}]*)\}}", expr):
        metrics.setdefault(name, set()).update(re.findall(rf"({NAME})\s*(?:=~|!~|!=|=)", matchers))
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    for name in re.findall(rf"(?<![\w.])({NAME})\b(?!\s*\()", expr):
        if name not in NOT_METRICS:
            metrics.setdefault(name, set())
    return metrics, grouped


def families(exposition: str) -> dict[str, tuple[str, set[str]]]:
    """The metric families of a /metrics page: their type and the labels of their
    samples (a histogram's ``le`` included)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for name, kind in re.findall(rf"^# TYPE ({NAME}) (\w+)$", exposition, re.M):
        found[name] = (kind, set())
    for name, labels in re.findall(rf"^({NAME})(?:\{{([^}}]*)\}})? \S+$", exposition, re.M):
        family = name if name in found else re.sub(r"_(bucket|sum|count|created)$", "", name)
        if family in found:
            found[family][1].update(re.findall(rf"({NAME})=", labels))
    return found


def problems(exprs: Iterable[str], exposed: dict[str, tuple[str, set[str]]]) -> list[str]:
    """What ``exprs`` name that ``exposed`` lacks: metrics, and labels of presence's."""
    found = []
    for expr in exprs:
        metrics, grouped = parse_promql(expr)
        known = set(TARGET_LABELS)
        for name, matched in metrics.items():
            if name in PROMETHEUS_METRICS:
                continue
            family = name
            if name not in exposed:
                family = re.sub(r"_(bucket|sum|count)$", "", name)
                if exposed.get(family, ("", set()))[0] != "histogram":
                    found.append(f"no metric {name} on /metrics (in {expr})")
                    continue
            labels = exposed[family][1]
            known |= labels
            missing = matched - labels - TARGET_LABELS
            if missing and family.startswith("presence_"):
                found.append(f"{name} has no label {', '.join(sorted(missing))} (in {expr})")
        if any(name.startswith("presence_") for name in metrics):
            for label in sorted(grouped - known):
                found.append(f"no metric of this expression has a label {label} (in {expr})")
    return found


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", ()) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return exprs


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


@pytest.mark.unit
def test_the_checker_reports_a_metric_or_label_that_does_not_exist() -> None:
    exposed = families(
        "# TYPE presence_sessions gauge\n"
        'presence_sessions{protocol="json"} 1\n'
        "# TYPE presence_fanout_seconds histogram\n"
        'presence_fanout_seconds_bucket{le="+Inf",protocol="json"} 1.0\n'
        "# TYPE presence_closes_total counter\n"
    )
    assert (
        problems(
            [
                'sum by (protocol) (presence_sessions{job=~"$job"})',
                "histogram_quantile(0.99, sum by (le, protocol) "
                "(rate(presence_fanout_seconds_bucket[$__rate_interval])))",
                "up == 0",
                "increase(presence_closes_total[5m]) > 0",  # no samples yet: the family is there
            ],
            exposed,
        )
        == []
    )
    assert problems(["rate(presence_nope_total[5m])"], exposed) == [
        "no metric presence_nope_total on /metrics (in rate(presence_nope_total[5m]))"
    ]
    assert len(problems(['presence_sessions{protocl="json"}'], exposed)) == 1
    assert len(problems(["sum by (reason) (presence_sessions)"], exposed)) == 1
    assert len(problems(["presence_sessions_bucket"], exposed)) == 1  # a gauge has none
    # The dashboard and the rules are read: every panel and rule has an expression.
    assert len(dashboard_exprs()) >= 30 and len(rule_exprs()) >= 10
    assert all(parse_promql(e)[0] for e in dashboard_exprs() + rule_exprs())


@pytest.mark.unit
def test_every_rule_says_what_and_how_bad() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    for rule in (r for group in rules["groups"] for r in group["rules"]):
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.unit
def test_the_dashboard_asks_for_its_prometheus() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.e2e
def test_the_scrape_configuration_and_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool not found: install it with scripts/install-test-deps.sh (Debian's "
            "prometheus package ships it)"
        )
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    # It scrapes what deploy/kubernetes runs: the path under its base path, its pods.
    kubernetes = MONITORING.parent / "kubernetes"
    settings = yaml.safe_load((kubernetes / "presence-configmap.yaml").read_text())["data"]
    assert job["metrics_path"] == settings["PRESENCE_BASE_PATH"] + "/metrics"
    deployment = yaml.safe_load((kubernetes / "presence-deployment.yaml").read_text())
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    kept = {
        rule["source_labels"][0]: rule["regex"]
        for rule in job["relabel_configs"]
        if rule.get("action") == "keep"
    }
    for name, value in labels.items():
        meta = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9]", "_", name)
        assert kept.get(meta, value) == value
    assert kept["__meta_kubernetes_pod_label_app_kubernetes_io_name"] == "presence"
    # Debian's promtool is built without Kubernetes discovery: the rest is checked with
    # a static target in its place (and the rules through rule_files).
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    shutil.copy(MONITORING / "alerts.yaml", tmp_path / "alerts.yaml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
    assert f"SUCCESS: {sum(len(g['rules']) for g in rules)} rules found" in result.stdout


@pytest.mark.e2e
async def test_the_dashboard_and_rules_name_what_replicas_expose(
    server_factory: ServerFactory, redis_server: RedisProcess
) -> None:
    r1, r2 = (
        server_factory(
            *FAST, "--redis-url", redis_server.url, "--allowed-origins", "https://ok.example"
        )
        for _ in range(2)
    )
    # Traffic, so that labelled families have samples whose labels can be checked.
    a = await join(r1)
    await published(redis_server)
    b = await join(r2)
    await a.update(cursor={"x": 1})
    await b.until(lambda m: m["type"] == "update")
    y = await YClient.connect(f"{r1.ws}/yjs/doc", {"cursor": 1})
    await a.send({"type": "no-such-message"})  # a protocol error
    await a.until(lambda m: m["type"] == "error")
    with pytest.raises(websockets.InvalidStatus):  # a refusal
        await websockets.connect(f"{r1.ws}/rooms/doc", origin="https://evil.example")
    await b.close()  # a close code
    deadline = time.monotonic() + 5
    while 'presence_closes_total{code="1000",by="client"}' not in r2.metrics():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    page = httpx.get(r1.http + "/metrics").text
    assert 'presence_build_info{version="' in page
    exposed = families(page)
    for name, (kind, labels) in families(httpx.get(r2.http + "/metrics").text).items():
        exposed.setdefault(name, (kind, set()))[1].update(labels)
    assert problems(dashboard_exprs() + rule_exprs(), exposed) == []
    # The fan-out delay of a real update: from a's socket on r1, and from Redis on r2.
    m1, m2 = r1.metrics(), r2.metrics()
    assert m1['presence_fanout_seconds_count{origin="local",protocol="json"}'] >= 1
    assert m2['presence_fanout_seconds_count{origin="remote",protocol="json"}'] >= 1
    assert m1['presence_sessions{protocol="yjs"}'] == 1
    await y.close()
    await a.close()


# -- the fan-out delay, in process -------------------------------------------------------


def fanout(hub: Hub, name: str, protocol: str = "json", origin: str = "local") -> float:
    labels = {"protocol": protocol, "origin": origin}
    if ":" in name:  # name:le, of a bucket
        name, labels["le"] = name.split(":")
    return hub.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.unit
async def test_the_fanout_delay_runs_from_the_earliest_update_to_the_writes() -> None:
    bus, clock = MemoryBus(), Clock()
    a, b = make_hub("A", bus, clock), make_hub("B", bus, clock)
    await a.start()
    await b.start()
    member = (await join_json(a, "doc", outbox_for(a, Peer()), None)).member.id
    await join_json(b, "doc", outbox_for(b, Peer()), None)
    await asyncio.sleep(0.05)  # the joins' flushes, here and across
    joins = fanout(a, "presence_fanout_seconds_count")
    assert joins >= 1  # a join is timed too (it sent at once: no delay by this clock)
    a.tick_interval = 0.05  # the next flush waits for its tick: the updates batch up
    a._flushed["doc"] = asyncio.get_running_loop().time()
    a.update("doc", member, {"x": 1})
    clock.now += 0.002
    a.update("doc", member, {"x": 2})  # the same batch: one observation, from the first
    clock.now += 0.003
    await asyncio.sleep(0.1)
    assert fanout(a, "presence_fanout_seconds_count") == joins + 1
    assert fanout(a, "presence_fanout_seconds_sum") == pytest.approx(0.005)
    assert fanout(a, "presence_fanout_seconds_bucket:0.0025") == joins
    assert fanout(a, "presence_fanout_seconds_bucket:0.01") == joins + 1
    # On B the same update came from the other replica: timed from its arrival.
    assert fanout(b, "presence_fanout_seconds_count", origin="remote") >= 1
    await a.stop()
    await b.stop()


@pytest.mark.unit
async def test_sse_streams_count_as_sessions_but_are_not_timed() -> None:
    hub = make_hub("A", MemoryBus(), Clock())
    await hub.start()
    room = await hub.open("doc")
    viewer = Peer()
    stream: Outbox[str] = Outbox(
        viewer, sse.ENCODER, max_backlog=8, clock=hub.clock, metrics=hub.metrics
    )
    hub.attach(room, stream)
    hub.admit(room, outbox_for(hub, Peer()), "m1", None)  # its socket is not attached
    await asyncio.sleep(0.01)
    assert any("event: join" in frame for frame in viewer.frames)
    assert fanout(hub, "presence_fanout_seconds_count", "sse") == 0
    assert hub.sessions() == {"json": 0, "yjs": 0, "sse": 1}
    await hub.stop()


# -- the access log ----------------------------------------------------------------------


@pytest.mark.unit
def test_refusal_lines_are_rate_limited_and_say_how_many_were_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = AccessLog(clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "presence.access"):
        for _ in range(REFUSAL_BURST + 30):
            log.refused("tcp", "192.0.2.1", "per_ip", "too many connections", status=503)
        assert len(caplog.records) == REFUSAL_BURST
        now[0] += 1.0
        log.refused("tcp", "192.0.2.1", "per_ip", "too many connections", status=503)
    last = caplog.records[-1]
    assert last.suppressed == 30 and last.ip == "192.0.2.1" and last.status == 503  # type: ignore[attr-defined]


@pytest.mark.unit
def test_clients_cannot_add_close_code_series_without_end() -> None:
    metrics = Metrics()
    for code in range(3000, 5000):  # any code a client may send
        metrics.closed(code, "client")
    metrics.closed(1000, "client")
    metrics.closed(4403, "server")
    metrics.closed(1006, "")
    assert metrics.closes == {
        ("other", "client"): 2000,
        ("1000", "client"): 1,
        ("4403", "server"): 1,
        ("1006", ""): 1,
    }
    assert 'presence_closes_total{code="4403",by="server"} 1' in metrics.render()


@pytest.mark.unit
def test_what_a_client_chooses_is_bounded_in_the_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = AccessLog()
    with caplog.at_level(logging.INFO, "presence.access"):
        log.closed("yjs", "r" * 5000, "192.0.2.1", [f"y{n}" for n in range(2000)],
                   code=1000, reason="x" * 200, by="client", duration=1.0)  # fmt: skip
        log.refused("websocket", "192.0.2.1", "handshake", "bad request", room="r" * 5000)
    closed, refused = caplog.records
    assert closed.room == refused.room == "r" * 128 + "…"  # type: ignore[attr-defined]
    assert len(closed.members) == 16 and closed.members_more == 1984  # type: ignore[attr-defined]
    assert closed.reason == "x" * 128  # type: ignore[attr-defined]


def access_lines(server: Server) -> list[dict[str, Any]]:
    entries = [orjson.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    return [e for e in entries if e["logger"] == "presence.access"]


async def lines_until(
    server: Server, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 5
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not predicate(lines := access_lines(server)):
        assert time.monotonic() < deadline, lines
        await asyncio.sleep(0.05)
    return lines


@pytest.mark.e2e
async def test_the_access_log_has_a_line_per_open_close_and_refusal_and_no_token(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(*FAST, "--allowed-origins", "https://ok.example")
    first = await join(server, room="lobby")
    token = first.welcome["token"]  # an identity token, sent back on the next connection
    await first.close()
    a = await join(server, room="lobby", token=f"{token}&access_token=not-for-logs")
    y = await YClient.connect(f"{server.ws}/yjs/lobby?token={token}", {"cursor": 1})
    await a.until(lambda m: m["type"] == "join")
    await a.ws.close(1000, "bye")
    await y.close()
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(f"{server.ws}/yjs/lobby", origin="https://evil.example")
    lines = await lines_until(
        server,
        lambda lines: (
            sum(e["msg"] == "close" for e in lines) == 3
            and any(e["msg"] == "refused" for e in lines)
        ),
    )
    opened = [e for e in lines if e["msg"] == "open"]
    closed = [e for e in lines if e["msg"] == "close"]
    assert [e["protocol"] for e in opened] == ["json", "json", "yjs"]
    assert all(e["room"] == "lobby" and e["ip"] == "127.0.0.1" for e in opened + closed)
    assert opened[1]["members"] == [a.id]
    [closed_a] = [e for e in closed if e["members"] == [a.id]]
    assert closed_a["code"] == 1000 and closed_a["reason"] == "bye" and closed_a["by"] == "client"
    assert 0 <= closed_a["duration"] < 30
    [closed_y] = [e for e in closed if e["protocol"] == "yjs"]
    assert closed_y["members"] == [f"y{y.id}"]
    [refused] = [e for e in lines if e["msg"] == "refused"]
    assert refused["status"] == 403 and refused["refusal"] == "origin"
    assert refused["protocol"] == "yjs" and refused["ip"] == "127.0.0.1"
    output = server.output()
    assert token not in output and "not-for-logs" not in output and "token=" not in output


@pytest.mark.e2e
async def test_the_access_log_can_be_turned_off(server_factory: ServerFactory) -> None:
    server = server_factory(*FAST, env={"PRESENCE_ACCESS_LOG": "false"})
    a = await join(server)
    await a.close()
    async with httpx.AsyncClient() as http:  # the close is logged by now, if it is at all
        await http.get(server.http + "/healthz")
    await asyncio.sleep(0.3)
    assert access_lines(server) == []
    assert '"presence ready"' in server.output()  # the rest of the log is there
