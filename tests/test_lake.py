"""Unit tests for flows/lake.py: paths, UUID validation, atomic Parquet replacement."""

from __future__ import annotations

import fnmatch
import glob
import os
import time
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from usage_pipeline import lake
from usage_pipeline.lake import (
    DATA_FILE,
    GOLD_TABLES,
    SILVER_TABLES,
    STALE_TEMP_SECONDS,
    ObjectPath,
    bronze_path,
    partition_path,
    remove_stale_temp_files,
    resolve_lake_root,
    write_parquet_atomic,
)
from usage_pipeline.materialize import build_gold, build_silver, refresh_bronze
from usage_pipeline.partners import InvalidPartnerUUID
from usage_pipeline.transforms import normalize_bronze

P = "aaaaaaaa-0000-4000-8000-000000000001"


def frame(n: int, tag: str = "v") -> pl.DataFrame:
    return pl.DataFrame({"id": list(range(n)), "tag": [tag] * n})


def temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# --- paths ----------------------------------------------------------------------------------------


def test_paths_follow_the_contract(tmp_path):
    assert bronze_path(tmp_path) == tmp_path / "bronze" / "billing_usage_raw"  # a Delta table's directory
    assert partition_path(tmp_path, "silver", "billing_usage_aggregated", P) == (
        tmp_path / "silver" / "billing_usage_aggregated" / f"partner={P}" / "data.parquet"
    )
    assert partition_path(tmp_path, "gold", "active_services", P) == (
        tmp_path / "gold" / "active_services" / f"partner={P}" / DATA_FILE
    )


def test_upper_case_uuid_is_lower_cased_in_the_path(tmp_path):
    path = partition_path(tmp_path, "gold", "usage_report", P.upper())
    assert path == tmp_path / "gold" / "usage_report" / f"partner={P}" / "data.parquet"
    assert P.upper() not in str(path)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc",
        "x' OR '1'='1",
        "",
        "a" * 10240,
        P + "/../../../etc",
        "../" + P,
        P + "\n",
        " " + P,
        P.replace("-", ""),
        "{" + P + "}",
        "urn:uuid:" + P,
        "gggggggg-0000-4000-8000-000000000001",
        P[:-1],
        P + "0",
        None,
        123,
    ],
)
def test_partition_path_rejects_bad_uuids_before_touching_the_filesystem(tmp_path, bad):
    root = tmp_path / "lake"
    with pytest.raises(InvalidPartnerUUID) as caught:
        partition_path(root, "silver", "billing_usage_aggregated", bad)
    assert "partner_uuid must be a canonical" in str(caught.value)
    assert len(str(caught.value)) < 200  # a 10 KB value is not echoed in full
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []


def test_invalid_partner_uuid_is_a_value_error():
    assert issubclass(InvalidPartnerUUID, ValueError)


def test_a_path_root_is_resolved_to_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_lake_root("elsewhere") == (tmp_path / "elsewhere").resolve()
    assert resolve_lake_root("lake").is_absolute()


# --- atomic writes ---------------------------------------------------------------------------------


def test_write_creates_directories_and_a_readable_file(tmp_path):
    path = partition_path(tmp_path, "gold", "usage_report", P)
    write_parquet_atomic(frame(3), path)
    assert pl.read_parquet(path).equals(frame(3))
    assert os.listdir(path.parent) == ["data.parquet"]


def test_write_replaces_the_file_with_a_new_inode_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "t" / "data.parquet"
    write_parquet_atomic(frame(3, "old"), path)
    old_inode = path.stat().st_ino
    with open(path, "rb") as reader:  # a reader that opened the old version
        write_parquet_atomic(frame(5, "new"), path)
        assert pl.read_parquet(reader).equals(frame(3, "old"))  # still sees the complete old file
    assert path.stat().st_ino != old_inode
    assert pl.read_parquet(path).equals(frame(5, "new"))
    assert os.listdir(path.parent) == ["data.parquet"]


def test_temp_file_is_hidden_beside_the_target_and_never_matches_parquet_globs(tmp_path, monkeypatch):
    path = tmp_path / "t" / "data.parquet"
    write_parquet_atomic(frame(2, "old"), path)
    real_replace = os.replace
    seen = {}

    def checking_replace(src, dst):
        src, dst = Path(src), Path(dst)
        seen["temp"] = src.name
        assert src.parent == dst.parent == path.parent  # same file system: rename is atomic
        assert src.name.startswith(".")
        assert src.exists()
        assert pl.read_parquet(src).equals(frame(4, "new"))  # fully written before the rename
        # readers globbing for Parquet files see only the complete old file
        assert glob.glob(str(path.parent / "*.parquet")) == [str(path)]
        assert [p.name for p in path.parent.glob("*.parquet")] == ["data.parquet"]
        assert not fnmatch.fnmatch(src.name, "*.parquet")
        assert pl.read_parquet(str(path.parent / "*.parquet")).equals(frame(2, "old"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    write_parquet_atomic(frame(4, "new"), path)
    assert seen["temp"].startswith(".data.parquet.") and seen["temp"].endswith(".tmp")
    assert pl.read_parquet(path).equals(frame(4, "new"))
    assert temp_files(path.parent) == []


class ExplodingFrame:
    """Writes half a Parquet file, then fails, like a writer killed by an error mid-way."""

    def write_parquet(self, handle, **kwargs):
        handle.write(b"PAR1 partial garbage")
        raise RuntimeError("disk full")


def test_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path):
    path = tmp_path / "t" / "data.parquet"
    write_parquet_atomic(frame(3, "old"), path)
    before = path.read_bytes()
    inode = path.stat().st_ino
    with pytest.raises(RuntimeError, match="disk full"):
        write_parquet_atomic(ExplodingFrame(), path)
    assert path.read_bytes() == before
    assert path.stat().st_ino == inode
    assert pl.read_parquet(path).equals(frame(3, "old"))
    assert temp_files(path.parent) == []


def test_failed_first_write_leaves_no_file_at_all(tmp_path):
    path = tmp_path / "t" / "data.parquet"
    with pytest.raises(RuntimeError):
        write_parquet_atomic(ExplodingFrame(), path)
    assert os.listdir(path.parent) == []


def test_stale_temp_files_are_removed_anywhere_in_the_lake_and_young_ones_kept(tmp_path):
    path = tmp_path / "gold" / "t" / "data.parquet"
    write_parquet_atomic(frame(1), path)
    deeper = tmp_path / "silver" / "s" / "partner=x"
    deeper.mkdir(parents=True)
    now = time.time()
    stale = path.parent / ".data.parquet.0123abcd.tmp"
    stale_deeper = deeper / ".data.parquet.76543210.tmp"
    young = path.parent / ".data.parquet.4567ef01.tmp"  # may belong to a live writer
    almost = path.parent / ".data.parquet.89abcdef.tmp"
    unrelated = path.parent / "notes.tmp"
    hidden = path.parent / ".keep.tmp"  # not a name write_parquet_atomic makes
    for file in (stale, stale_deeper, young, almost, unrelated, hidden):
        file.write_bytes(b"partial")
    for file in (stale, stale_deeper, unrelated, hidden):
        os.utime(file, (now - STALE_TEMP_SECONDS - 60,) * 2)
    os.utime(almost, (now - STALE_TEMP_SECONDS + 300,) * 2)

    removed = remove_stale_temp_files(tmp_path)

    assert sorted(removed) == ["gold/t/.data.parquet.0123abcd.tmp", "silver/s/partner=x/.data.parquet.76543210.tmp"]
    assert not stale.exists() and not stale_deeper.exists()
    assert young.exists() and almost.exists() and unrelated.exists() and hidden.exists()
    assert pl.read_parquet(path).equals(frame(1))
    assert remove_stale_temp_files(tmp_path / "missing") == []
    assert remove_stale_temp_files(ObjectPath("s3://bucket/lake")) == []  # one upload per file: no temp files


def test_a_killed_publishs_staging_directory_is_removed_once_stale_and_a_live_one_kept(tmp_path):
    old_id, live_id = "0b3f6a52-3c0e-4c39-9a52-8e1f1d3c2a10", "1c4a7b63-4d1f-4d4a-8b63-9f2a2e4d3b21"
    for publish_id in (old_id, live_id):
        write_parquet_atomic(frame(1), lake.staged_path(tmp_path, publish_id, "silver", SILVER_TABLES[0], P))
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(lake.staging_dir(tmp_path, old_id), (old, old))

    assert remove_stale_temp_files(tmp_path) == [f"_staging/{old_id}"]
    assert not lake.staging_dir(tmp_path, old_id).exists() and lake.staging_dir(tmp_path, live_id).exists()


def test_stale_temp_cleanup_tolerates_a_file_removed_concurrently(tmp_path, monkeypatch):
    path = tmp_path / "t" / "data.parquet"
    path.parent.mkdir(parents=True)
    stale = path.parent / ".data.parquet.deadbeef.tmp"
    stale.write_bytes(b"x")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    real_stat = Path.stat

    def vanishing_stat(self, *args, **kwargs):
        if self.name == stale.name and os.path.exists(self):
            os.unlink(self)  # another sweep removed it between glob and stat
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing_stat)
    assert remove_stale_temp_files(tmp_path) == []
    monkeypatch.undo()
    assert not stale.exists()


def test_empty_frame_keeps_its_schema_on_disk(tmp_path):
    path = tmp_path / "t" / "data.parquet"
    empty = pl.DataFrame(schema={"partner_uuid": pl.String, "amount": pl.Decimal(38, 4), "month": pl.Date})
    write_parquet_atomic(frame(3), path)
    write_parquet_atomic(empty, path)
    back = pl.read_parquet(path)
    assert back.height == 0
    assert dict(back.schema) == dict(empty.schema)


def test_module_constants():
    assert lake.STALE_TEMP_SECONDS >= 600  # long enough never to remove a live writer's file
    assert lake.DATA_FILE == "data.parquet"


# --- object-storage roots (file:// goes through the same polars object-store path as s3://) --------


def test_a_url_root_is_an_object_path(tmp_path):
    root = resolve_lake_root(f"file://{tmp_path}/lake/")
    assert isinstance(root, ObjectPath) and root == f"file://{tmp_path}/lake"
    assert partition_path(root, "gold", "usage_report", P) == f"file://{tmp_path}/lake/gold/usage_report/partner={P}/data.parquet"
    with pytest.raises(InvalidPartnerUUID):
        partition_path(root, "gold", "usage_report", "../../etc")


def test_url_root_write_replace_and_exists(tmp_path):
    path = partition_path(ObjectPath(f"file://{tmp_path}"), "gold", "usage_report", P)
    assert not path.exists()
    write_parquet_atomic(frame(3), path)
    assert path.exists() and pl.read_parquet(path).equals(frame(3))
    write_parquet_atomic(frame(5, "w"), path)
    assert pl.read_parquet(path).equals(frame(5, "w"))
    assert os.listdir(tmp_path / "gold" / "usage_report" / f"partner={P}") == ["data.parquet"]


def test_silver_reads_the_bronze_version_it_is_given_whatever_was_committed_since(tmp_path):
    """A tick's silver runs read the version its bronze run committed (time travel), not the newest."""
    def rows(dealers, usage_ids, amount):
        return normalize_bronze(pl.DataFrame({
            "usage_id": usage_ids, "dealer_id": dealers, "customer_id": [10] * len(dealers),
            "service_id": [5] * len(dealers), "usage_date": [date(2026, 10, 1)] * len(dealers),
            "quantity": [Decimal("1")] * len(dealers), "amount": [Decimal(amount)] * len(dealers),
            "usage_modified": [datetime(2026, 10, 1, 9)] * len(dealers), "service_status_id": [3] * len(dealers),
            "service_name": ["a"] * len(dealers),
        }))
    root = tmp_path / "lake"
    first = refresh_bronze(root, lambda _: rows([1, 2, 2, 3], [1, 2, 3, 4], "1"), None)
    sliced = refresh_bronze(root, lambda dealers: rows([2], [5], "9"), [2])
    assert (first.mode, sliced.mode, sliced.version) == ("full", "slice", first.version + 1)
    assert build_silver(root, P, [2], first.version).bronze_rows == 2
    aggregated = pl.read_parquet(partition_path(root, "silver", SILVER_TABLES[0], P))
    assert aggregated["amount"].to_list() == [Decimal("2")]
    assert build_silver(root, P, [2], sliced.version).bronze_rows == 1
    assert build_silver(root, P, [2]).bronze_rows == 1  # a manual run: the newest
    assert pl.read_parquet(partition_path(root, "silver", SILVER_TABLES[0], P))["amount"].to_list() == [Decimal("9")]


def test_layers_build_the_same_files_under_a_url_root(tmp_path):
    """Bronze, silver and gold through materialize: a URL root gives the same frames as a local one."""
    bronze = normalize_bronze(pl.DataFrame({
        "usage_id": [1, 2, 3], "dealer_id": [1, 1, 2], "customer_id": [10, 11, 10], "service_id": [5, 5, 6],
        "usage_date": [date(2026, 9, 30), date(2026, 10, 1), date(2026, 10, 1)],
        "quantity": [Decimal("1.5"), Decimal("2"), Decimal("3")], "amount": [Decimal("10"), Decimal("-2.25"), Decimal("7")],
        "usage_modified": [datetime(2026, 10, 1, 9)] * 3, "service_status_id": [3, 3, 10], "service_name": ["a", "a", None],
    }))
    local, url = tmp_path / "local", ObjectPath(f"file://{tmp_path}/url")
    for root in (local, url):
        assert refresh_bronze(root, lambda _: bronze, None).rows == 3
        build_silver(root, P, [1])
        build_gold(root, P)
    for layer, table in [("silver", t) for t in SILVER_TABLES] + [("gold", t) for t in GOLD_TABLES]:
        expected = pl.read_parquet(partition_path(local, layer, table, P))
        assert expected.height > 0 and pl.read_parquet(partition_path(url, layer, table, P)).equals(expected)
    assert pl.read_delta(str(bronze_path(url))).sort("usage_id").select(*bronze.columns).equals(bronze)
