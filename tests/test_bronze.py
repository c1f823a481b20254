"""The bronze Delta table (usage_pipeline/bronze.py): dealer slices, bounded rewrites, maintenance,
the upgrade from the old single file, and a writer killed before its commit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from usage_pipeline import bronze
from usage_pipeline.lake import write_parquet_atomic
from usage_pipeline.materialize import refresh_bronze
from usage_pipeline.transforms import normalize_bronze

REPO = Path(__file__).resolve().parents[1]


def rows(usage_ids: list[int], dealers: list[int], rng: random.Random, amount: str = "1") -> pl.DataFrame:
    return normalize_bronze(pl.DataFrame({
        "usage_id": usage_ids, "dealer_id": [rng.choice(dealers) for _ in usage_ids],
        "customer_id": [100] * len(usage_ids), "service_id": [10] * len(usage_ids),
        "usage_date": [date(2026, 1, 1)] * len(usage_ids), "quantity": [Decimal("1")] * len(usage_ids),
        "amount": [Decimal(amount)] * len(usage_ids), "usage_modified": [datetime(2026, 1, 2)] * len(usage_ids),
        "service_status_id": [3] * len(usage_ids), "service_name": ["Voice"] * len(usage_ids),
    }, strict=False))


def table(root: Path, version: int | None = None) -> pl.DataFrame:
    return pl.read_delta(str(bronze.table_uri(root)), version=version).select(*bronze.BRONZE_SCHEMA).sort("usage_id")


def file_paths(root: Path) -> dict[str, int]:
    actions = pl.DataFrame(DeltaTable(bronze.table_uri(root)).get_add_actions(flatten=True))
    return dict(zip(actions["path"], actions["partition.dealer_bucket"], strict=True))


@pytest.mark.parametrize("seed", range(12))
def test_replacing_dealers_equals_filtering_them_out_and_adding_the_fresh_rows(tmp_path, seed):
    """Whatever dealers change, appear or vanish (an empty fresh extract removes them)."""
    rng = random.Random(seed)
    current = rows(rng.sample(range(1, 5000), rng.randint(0, 1200)), list(range(1, 300)), rng)
    bronze.write_all(tmp_path, [current])
    dealers = rng.sample(range(1, 320), rng.randint(1, 6))
    fresh = rows(rng.sample(range(5000, 9000), rng.randint(0, 40)), dealers, rng, "7")
    written = bronze.replace_dealers(tmp_path, fresh, dealers)
    expected = pl.concat([current.filter(~pl.col("dealer_id").is_in(dealers)), fresh]).sort("usage_id")
    assert written.version == 1 and written.rows == expected.height
    assert table(tmp_path).equals(expected)
    assert table(tmp_path, version=0).equals(current.sort("usage_id"))


def test_a_one_dealer_write_rewrites_only_its_buckets_files_whatever_the_table_size(tmp_path):
    rng = random.Random(1)
    rewritten = []
    for dealers in (320, 3200):  # 10 and 100 buckets, about 50 rows a dealer
        root = tmp_path / str(dealers)
        bronze.write_all(root, [rows(list(range(dealers * 50)), list(range(dealers)), rng)])
        before = file_paths(root)
        written = bronze.replace_dealers(root, rows([10**7], [45], rng), [45])
        after = file_paths(root)
        assert {bucket for path, bucket in before.items() if path not in after} == {bronze.bucket_of(45)}
        assert set(after) - set(before) and {after[p] for p in set(after) - set(before)} == {bronze.bucket_of(45)}
        assert table(root).filter(pl.col("dealer_id") == 45)["usage_id"].to_list() == [10**7]
        rewritten.append(written.written_rows)
    # The same bucket size at 10x the dealers: about DEALERS_PER_BUCKET dealers' rows either way.
    assert all(20 * bronze.DEALERS_PER_BUCKET < r < 80 * bronze.DEALERS_PER_BUCKET for r in rewritten), rewritten


def test_a_slice_on_an_empty_table_and_an_empty_full_refresh(tmp_path):
    """A full refresh of a source with no relevant rows leaves an empty table; a slice then adds to it."""
    rng = random.Random(2)
    empty = bronze.write_all(tmp_path, [rows([], [1], rng)])
    assert (empty.version, empty.rows) == (0, 0) and table(tmp_path).height == 0
    assert bronze.replace_dealers(tmp_path, rows([1, 2], [7], rng), [7]).rows == 2
    assert bronze.replace_dealers(tmp_path, rows([], [7], rng), [7]).rows == 0
    bronze.replace_dealers(tmp_path, rows([1, 2, 3], [8], rng), [8])
    emptied = bronze.write_all(tmp_path, [])  # `full_refresh` of a source that lost every relevant row
    assert (emptied.rows, table(tmp_path).height) == (0, 0) and emptied.version == 4


def test_a_full_refresh_fails_rather_than_overwrite_a_commit_made_while_it_wrote(tmp_path):
    rng = random.Random(4)
    bronze.write_all(tmp_path, [rows([1, 2], [5], rng)])

    def batches():
        yield rows([1, 2], [6], rng)
        bronze.replace_dealers(tmp_path, rows([1], [9], rng), [9])  # another writer, between two batches
        yield rows([1, 2], [7], rng)

    with pytest.raises(RuntimeError, match="moved from version 0 to 1 while a full refresh wrote its files"):
        bronze.write_all(tmp_path, batches())
    assert set(table(tmp_path)["dealer_id"]) == {5, 9}


def test_reading_some_dealers_prunes_other_buckets_and_row_groups(tmp_path):
    rng = random.Random(3)
    bronze.write_all(tmp_path, [rows(list(range(64_000)), list(range(640)), rng)])
    wanted = [5, 300, 301, 639]
    got = bronze.read_dealers(tmp_path, wanted, None)
    assert set(got["dealer_id"]) == set(wanted) and got.height == table(tmp_path).filter(
        pl.col("dealer_id").is_in(wanted)).height
    assert bronze.read_dealers(tmp_path, [], None).height == 0


def test_maintenance_runs_every_n_commits_compacts_checkpoints_and_bounds_the_log(tmp_path):
    rng = random.Random(4)
    bronze.write_all(tmp_path, [rows(list(range(3200)), list(range(64)), rng)])
    runs = []
    for i in range(3 * bronze.MAINTENANCE_EVERY + 2):
        bronze.replace_dealers(tmp_path, rows([10**6 + i], [i % 64], rng), [i % 64])
        if (done := bronze.maintain(tmp_path)) is not None:
            runs.append(done)
    assert len(runs) == 3
    status = bronze.status(tmp_path)
    assert status.maintenance == runs[-1] and status.rows == table(tmp_path).height
    assert status.files <= 2 * (64 // bronze.DEALERS_PER_BUCKET)  # one file a bucket, after rewrites too
    log = os.listdir(Path(bronze.table_uri(tmp_path)) / "_delta_log")
    assert any(name.endswith(".checkpoint.parquet") for name in log)
    assert status.payload()["last_vacuum"] == runs[-1]["at"]


def test_an_old_single_file_bronze_is_migrated_by_the_first_write_and_nothing_of_it_is_left(tmp_path):
    rng = random.Random(5)
    old = rows(list(range(500)), list(range(1, 60)), rng)
    write_parquet_atomic(old, bronze.legacy_file(tmp_path))
    directory = Path(bronze.table_uri(tmp_path))
    (directory / ".data.parquet.0123abcd.tmp").write_bytes(b"a killed writer's temp file")
    fresh = rows([9000], [7], rng, "5")

    result = refresh_bronze(tmp_path, lambda dealers: fresh, [7])  # a one-dealer tick after the upgrade

    assert result.migrated and (result.mode, result.version) == ("slice", 1)
    assert table(tmp_path, version=0).equals(old.sort("usage_id"))  # the old file's rows, as they were
    assert table(tmp_path).equals(pl.concat([old.filter(pl.col("dealer_id") != 7), fresh]).sort("usage_id"))
    assert sorted(os.listdir(directory)) == ["_delta_log"] + sorted({f"dealer_bucket={b}" for b in (0, 1)})
    # What a vacuum would remove: only the file version 1 replaced, nothing of the old layout.
    vacuumable = DeltaTable(str(directory)).vacuum(retention_hours=0, enforce_retention_duration=False, full=True)
    assert len(vacuumable) == 1 and vacuumable[0].startswith(f"dealer_bucket={bronze.bucket_of(7)}/")
    assert not refresh_bronze(tmp_path, lambda dealers: fresh, [7]).migrated


KILLED_WRITER = """
import sys, time
from pathlib import Path
import polars as pl
from usage_pipeline import bronze
from tests.test_bronze import rows
import random

root, marker = Path(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(7)

def batches():
    for start in range(0, 200_000, 20_000):
        yield rows(list(range(start, start + 20_000)), list(range(start // 1000, start // 1000 + 20)), rng, "9")
    marker.touch()
    time.sleep(600)  # killed here: the buckets passed are written out, the commit is not

bronze.write_all(root, batches())
"""


def kill_when_marked(script: str, root: Path, marker: Path, **env: str) -> None:
    """Run a writer script on `root`, and SIGKILL it once it has touched `marker`."""
    writer = subprocess.Popen([sys.executable, "-c", script, str(root), str(marker)], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer died or hung"
            time.sleep(0.1)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)


def test_a_bronze_write_killed_before_its_commit_changes_nothing_and_vacuum_removes_its_files(tmp_path):
    rng = random.Random(6)
    root, marker = tmp_path / "lake", tmp_path / "files-written"
    before = rows(list(range(1000)), list(range(200)), rng)
    bronze.write_all(root, [before])
    committed = set(file_paths(root))
    kill_when_marked(KILLED_WRITER, root, marker)
    directory = Path(bronze.table_uri(root))
    leftovers = {str(p.relative_to(directory)) for p in directory.rglob("*.parquet")
                 if "_delta_log" not in p.parts} - committed
    assert leftovers, "the killed writer wrote no data file"

    assert DeltaTable(str(directory)).version() == 0 and table(root).equals(before.sort("usage_id"))
    assert set(file_paths(root)) == committed

    # Maintenance vacuums (full) what no commit references, once older than the retention.
    assert bronze.maintain(root, force=True)["vacuumed"] == 0  # too young yet
    day_ago = time.time() - 25 * 3600
    for path in leftovers:
        os.utime(directory / path, (day_ago, day_ago))
    done = bronze.maintain(root, force=True)
    assert done["vacuumed"] == len(leftovers)
    assert not any((directory / path).exists() for path in leftovers)
    assert table(root).equals(before.sort("usage_id"))


KILLED_SPILLING_REFRESH = """
import sys, time
from pathlib import Path
from usage_pipeline import bronze
from tests.test_bronze import rows
import random

root, marker = Path(sys.argv[1]), Path(sys.argv[2])
rng = random.Random(9)

def batches():
    for start in range(0, 6000, 3000):
        yield rows(list(range(start, start + 3000)), list(range(50)), rng)
    marker.touch()
    time.sleep(600)  # killed here, with two batches spilled

bronze.write_all_spilled(root, batches())
"""


def test_the_spills_of_a_killed_full_refresh_are_removed_once_stale(tmp_path, monkeypatch):
    """A full refresh SIGKILLed while it spills leaves its spill directory (about the compressed table);
    the next bronze run removes it once untouched for an hour, and leaves a live refresh's alone."""
    spills, marker = tmp_path / "tmp", tmp_path / "spilled"
    spills.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spills))
    kill_when_marked(KILLED_SPILLING_REFRESH, tmp_path / "lake", marker, TMPDIR=str(spills))
    [left] = list(spills.glob(f"{bronze.SPILL_PREFIX}*"))
    assert len(list(left.iterdir())) == 2 and not bronze.is_table(tmp_path / "lake")
    assert bronze.remove_stale_spills() == []  # as young as a live refresh's
    hour_ago = time.time() - bronze.STALE_TEMP_SECONDS - 60
    for path in [left, *left.iterdir()]:
        os.utime(path, (hour_ago, hour_ago))
    assert bronze.remove_stale_spills() == [str(left)] and not left.exists()


def test_a_full_refresh_from_batches_in_any_order_writes_every_file_in_dealer_order(tmp_path):
    """The streamed extract comes in usage_id order; spilled and read back a few buckets at a time."""
    rng = random.Random(8)
    everything = rows(list(range(20_000)), list(range(300)), rng)
    shuffled = everything.sample(fraction=1.0, shuffle=True, seed=8)
    batches = [shuffled.slice(start, 3000) for start in range(0, shuffled.height, 3000)]
    written = bronze.write_all_spilled(tmp_path, batches, group_rows=2500)
    assert (written.version, written.rows) == (0, everything.height)
    assert table(tmp_path).equals(everything.sort("usage_id"))
    dataset = DeltaTable(bronze.table_uri(tmp_path)).to_pyarrow_dataset()  # the other reader, the same rows
    assert pl.from_arrow(dataset.to_table()).select(*bronze.BRONZE_SCHEMA).sort("usage_id").equals(table(tmp_path))
    actions = pl.DataFrame(DeltaTable(bronze.table_uri(tmp_path)).get_add_actions(flatten=True))
    assert actions.height == len(set(actions["partition.dealer_bucket"]))  # one file a bucket
    for action in actions.iter_rows(named=True):  # the statistics written with each file are its own
        data = pl.read_parquet(Path(bronze.table_uri(tmp_path)) / action["path"])
        assert bronze.BUCKET_COLUMN not in data.columns and data["dealer_id"].is_sorted()
        assert (action["num_records"], action["min.dealer_id"], action["max.dealer_id"], action["min.usage_id"],
                action["max.usage_id"], action["null_count.service_name"]) == (
            data.height, data["dealer_id"].min(), data["dealer_id"].max(), data["usage_id"].min(),
            data["usage_id"].max(), data["service_name"].null_count())
    assert pl.scan_delta(bronze.table_uri(tmp_path)).filter(pl.col("dealer_id") == 45).collect().height == \
        everything.filter(pl.col("dealer_id") == 45).height
    assert bronze.write_all_spilled(tmp_path / "empty", []).rows == 0
