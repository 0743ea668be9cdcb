"""The ledger's sums (usage_report.totals), as `keys list`, the `usage` command and /admin/usage read
them, on rows from a real SQLite ledger."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vllm_gateway.usage_ledger import HOUR, SQLiteUsageStore
from vllm_gateway.usage_report import UsageQuery, key_totals, totals, usage_page, usage_table

NOW = 1_750_000_000 // HOUR * HOUR
EARLIER = NOW - 3 * HOUR


@pytest.fixture
def store(tmp_path: Path) -> SQLiteUsageStore:
    store = SQLiteUsageStore(tmp_path / "usage.db")
    # (hour, key, model) -> requests, prompt, completion, errors, aborted, aborted completion tokens
    store.add(
        {
            (EARLIER, "key_a", "m1"): [1, 10, 100, 0, 0, 0],
            (NOW, "key_a", "m1"): [2, 20, 200, 1, 0, 0],
            (NOW, "key_a", "m2"): [3, 30, 300, 0, 1, 7],
            (NOW, "key_b", "m1"): [4, 40, 400, 0, 0, 0],
        }
    )
    return store


def test_totals_sum_every_field_over_what_is_not_grouped(store: SQLiteUsageStore) -> None:
    rows = store.rows(0, NOW + HOUR)
    assert totals(rows, ["key"]) == {("key_a",): [6, 60, 600, 1, 1, 7], ("key_b",): [4, 40, 400, 0, 0, 0]}
    assert totals(rows, ["model", "hour"]) == {
        ("m1", str(EARLIER)): [1, 10, 100, 0, 0, 0],
        ("m1", str(NOW)): [6, 60, 600, 1, 0, 0],
        ("m2", str(NOW)): [3, 30, 300, 0, 1, 7],
    }
    assert totals(rows, []) == {(): [10, 100, 1000, 1, 1, 7]}


def test_key_totals_are_requests_prompt_and_completion_from_the_hour_of_since(store: SQLiteUsageStore) -> None:
    assert key_totals(store, NOW + 60) == {"key_a": (5, 50, 500), "key_b": (4, 40, 400)}
    assert key_totals(store, EARLIER) == {"key_a": (6, 60, 600), "key_b": (4, 40, 400)}


def test_usage_table_names_keys_marks_revoked_ones_and_shows_hours_in_local_time(store: SQLiteUsageStore) -> None:
    table = usage_table(store, EARLIER, ["key", "hour"], {"key_a": "alice"})
    hour = time.strftime("%Y-%m-%d %H:00", time.localtime(NOW))
    assert [(entry["key_name"], entry["hour"], entry["requests"]) for entry in table] == [
        ("alice", time.strftime("%Y-%m-%d %H:00", time.localtime(EARLIER)), 1),
        ("alice", hour, 5),
        ("(revoked)", hour, 4),
    ]
    assert table[1] == {
        "key_id": "key_a",
        "key_name": "alice",
        "hour": hour,
        "requests": 5,
        "prompt_tokens": 50,
        "completion_tokens": 500,
        "errors": 1,
        "aborted": 1,
        "aborted_completion_tokens": 7,
    }


def test_usage_pages_sum_the_same_rows_by_key_and_model(store: SQLiteUsageStore) -> None:
    query = UsageQuery(start_time=EARLIER, end_time=NOW + HOUR, bucket_width="1d", group_by=["api_key_id"])
    (bucket,) = usage_page(store, query)["data"]  # type: ignore[misc]
    assert [(r["api_key_id"], r["model"], r["num_model_requests"], r["input_tokens"]) for r in bucket["results"]] == [
        ("key_a", None, 6, 60),
        ("key_b", None, 4, 40),
    ]


@pytest.mark.parametrize("by", [(), ("api_key_id",), ("model",), ("api_key_id", "model")])
@pytest.mark.parametrize("width", [HOUR, 24 * HOUR])
def test_the_stores_sums_in_sql_equal_the_rows_added_up(store: SQLiteUsageStore, by, width) -> None:
    rows = store.rows(0, NOW + HOUR)
    names = [{"api_key_id": "key", "model": "model"}[group] for group in by]
    expected = {}
    for group, counts in totals(rows, [*names, "hour"]).items():
        named = dict(zip([*names, "hour"], group, strict=True))
        where = (int(named["hour"]) // width * width, named.get("key"), named.get("model"))
        sums = expected.setdefault(where, [0, 0, 0])
        for index in range(3):
            sums[index] += counts[index]

    found = {(bucket, key, model): [r, p, c] for bucket, key, model, r, p, c in store.sums(0, NOW + HOUR, width, by)}
    assert found == expected
    filtered = store.sums(0, NOW + HOUR, width, by, key_ids=["key_b"], models=["m1"])
    assert [row[3:] for row in filtered] == [(4, 40, 400)]
