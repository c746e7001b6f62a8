"""The load generator keeps working: a tiny run end to end, and its histogram."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from load.hist import Histogram
from load.report import write_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit
def test_histogram_percentiles_within_one_percent() -> None:
    h = Histogram()
    for ms in range(1, 1001):
        h.record(ms / 1000)
    assert h.percentile_ms(50) == pytest.approx(500, rel=0.011)
    assert h.percentile_ms(99) == pytest.approx(990, rel=0.011)
    assert h.share_within_ms(200) == pytest.approx(0.2, abs=0.003)
    other = Histogram()
    other.record(5.0)
    h.merge(Histogram.from_json(other.to_json()))
    assert h.total == 1001 and h.max_us == 5_000_000


def small_run(tmp_path: Path, *args: str) -> dict[str, Any]:
    """``python -m load custom`` with 2 rooms of 3 members at 5 Hz for 2 s: every update
    reaches the others."""
    out = tmp_path / "result.json"
    subprocess.run(
        [
            *(sys.executable, "-m", "load", "custom"),
            *("--rooms", "2", "--members", "3", "--hz", "5"),
            *("--duration", "2", "--warmup", "1", "--workers", "1", "--out", str(out)),
            *args,
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    assert result["joined"] == 6 and result["errors"] == 0
    assert result["updates_sent"] == pytest.approx(6 * 5 * 2, abs=6)
    assert result["delivered_or_superseded"] == 1.0
    assert result["updates_observed"] >= result["updates_sent"] * 2
    assert 0 < result["latency_ms"]["50"] < 1000
    assert result["server_cpu_us_per_delivered"] > 0
    assert result["machine_ms"] > 0  # the speed it was recorded at
    return result


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["json", "yjs"])
def test_a_small_run_reports_every_update(tmp_path: Path, protocol: str) -> None:
    small_run(tmp_path, "--protocol", protocol)
    # The report turns recorded results into a table and a plot.
    report = write_report(tmp_path, tmp_path / "report")
    assert f"| custom | {protocol} |" in report.read_text()
    png = (tmp_path / "report" / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["presence", "hocuspocus", "ywebsocket"])
def test_stock_yjs_clients_drive_presence_and_the_peers(tmp_path: Path, target: str) -> None:
    result = small_run(tmp_path, "--client", "stock", "--target", target)
    assert (result["target"], result["client"]) == (target, "stock")


@pytest.mark.unit
def test_scale_keeps_each_room_on_as_many_replicas_as_it_says() -> None:
    from load.__main__ import _replica_of

    cfg = {"rooms": 20, "members": 10, "span": 2}
    placed: dict[int, set[int]] = {}
    for i in range(200):
        placed.setdefault(i // 10, set()).add(_replica_of(i, cfg, 4))
    assert all(len(replicas) == 2 for replicas in placed.values())
    load = [sum(r in replicas for replicas in placed.values()) for r in range(4)]
    assert load == [10, 10, 10, 10]  # rooms spread evenly
    assert {_replica_of(i, {"members": 10}, 4) for i in range(10)} == {0, 1, 2, 3}
