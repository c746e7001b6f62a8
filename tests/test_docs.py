"""The docs say what the code and the recorded results say."""

from __future__ import annotations

import copy

import pytest

from load.tables import BENCHMARKS, load_results, update_doc


def test_benchmark_tables_are_generated_from_the_results() -> None:
    text = BENCHMARKS.read_text()
    assert update_doc(text, load_results()) == text, (
        "docs/benchmarks.md's tables differ from load/results/*.json: run `python -m load report`"
    )


def test_a_changed_result_changes_the_tables() -> None:
    text, results = BENCHMARKS.read_text(), copy.deepcopy(load_results())
    b = next(r for r in results if (r["scenario"], r.get("protocol")) == ("b", "json"))
    b["delivered_or_superseded"] = 0.99
    changed = update_doc(text, results)
    assert "| 99% |" in changed and "**not met**: (a) 100%, 0 errors; (b) 99%, 0 errors" in changed


def test_every_table_needs_its_markers() -> None:
    text = BENCHMARKS.read_text().replace("<!-- results:begin sweep -->", "")
    with pytest.raises(ValueError, match="sweep"):
        update_doc(text, load_results())
