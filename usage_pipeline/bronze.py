"""Bronze as a Delta Lake table (CONTRACT.md section 6): one atomic commit per write, dealer by dealer.

Layout: partitioned by `dealer_bucket = dealer_id // DEALERS_PER_BUCKET`, rows in dealer order
within each file, row groups of ROW_GROUP_ROWS. Replacing some dealers' rows (a predicate
overwrite) rewrites only the files of their buckets, and a bucket holds at most
DEALERS_PER_BUCKET dealers however many the table has: the rows rewritten per changed dealer
stay the same as the table grows, only the number of buckets grows. A reader of some dealers
skips other buckets by partition value and other dealers by row-group statistics.

Readers see a version, before a commit or after it. A writer killed before its commit leaves
data files no commit references; `maintain` (run every MAINTENANCE_EVERY commits by the bronze
flow, holding the bronze slot) compacts, vacuums them (`full=True`) once older than the
retention, and checkpoints the log.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Schema, WriterProperties, write_deltalake
from deltalake.fs import DeltaStorageHandler
from deltalake.transaction import AddAction, create_table_with_add_actions

from usage_pipeline.lake import DATA_FILE, STALE_TEMP_SECONDS, LakePath, bronze_path
from usage_pipeline.transforms import BRONZE_SCHEMA, empty, sort_by_dealer

BUCKET_COLUMN = "dealer_bucket"
# 32 dealers a bucket: a one-dealer tick on the bench set (1,650 rows a dealer) rewrites about
# 53 k rows, and 2,000 dealers make 63 files; 20,000 dealers make 625 files of the same size.
DEALERS_PER_BUCKET = 32
# About a dealer's rows (1,650 on the bench set): row-group statistics then skip the other partners'
# dealers. A partner with 0.5 % of the dealers (K = 10) reads 2.3 rows per row of its own (3.9 at 4,096).
ROW_GROUP_ROWS = 2048
GROUP_ROWS = 1_000_000  # rows of buckets a spilled full refresh sorts at once
SPILL_ROW_GROUP_ROWS = 16_384
SPILL_PREFIX = "usage-bronze-"  # a full refresh's local spill directory
MAINTENANCE_EVERY = 12  # commits between two maintenance runs: hourly at one write per 5-minute tick
# Removed and unreferenced files are vacuumed a day after they were written or removed: longer than a
# tick's silver runs read the version it pinned (USAGE_CHILD_RUN_TIMEOUT_SECONDS, 1 h by default), and a
# day of versions stays restorable (`DeltaTable.restore`). The log keeps two days, then checkpoints.
TABLE_CONFIG = {
    "delta.deletedFileRetentionDuration": "interval 24 hours",
    "delta.logRetentionDuration": "interval 2 days",
}
# Predicate overwrites and compaction close a file once this big; a bucket (about 1.5 MiB on the bench set) fits.
TARGET_FILE_BYTES = 64 * 2**20
COMPRESSION = "snappy"
WRITER = WriterProperties(max_row_group_size=ROW_GROUP_ROWS, compression=COMPRESSION.upper())  # delta-rs' writes
FILE_OPTIONS = {"row_group_size": ROW_GROUP_ROWS, "compression": COMPRESSION, "statistics": True}  # ours, by polars
STATS_COLUMNS = ("usage_id", "dealer_id", "customer_id", "service_id", "service_status_id", "usage_date")
MAINTENANCE_KEY = "usage.maintenance"  # table property: what the last maintenance did, and when
RUN_KEY = "usage.flow_run_id"  # commit metadata: the flow run that made a commit
READ_KEY = "usage.read_totals"  # commit metadata of a full refresh: what its extract read (checks.ExtractRead)


@dataclass(frozen=True)
class BronzeWrite:
    version: int
    written_rows: int  # rows in the files this commit added (new rows plus the kept rows of rewritten files)
    rows: int  # in the table now


@dataclass(frozen=True)
class TableStatus:
    version: int
    files: int
    rows: int
    maintenance: dict | None  # the last `maintain`: at, compacted files, vacuumed files

    def describe(self) -> str:
        m = self.maintenance
        last = "no maintenance yet" if m is None else (
            f"last compaction and vacuum {m['at']} ({m['compacted_removed']} file(s) compacted into"
            f" {m['compacted_added']}, {m['vacuumed']} vacuumed)")
        return f"version {self.version}, {self.files} file(s), {self.rows} row(s); {last}"

    def payload(self) -> dict:
        m = self.maintenance or {}
        return {"version": self.version, "files": self.files, "rows": self.rows,
                "last_compaction": m.get("at"), "last_vacuum": m.get("at")}


def table_uri(root: LakePath) -> str:
    return str(bronze_path(root))


def is_table(root: LakePath) -> bool:
    return DeltaTable.is_deltatable(table_uri(root))


def bucket_of(dealer: int) -> int:
    return dealer // DEALERS_PER_BUCKET


def with_bucket(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(*BRONZE_SCHEMA).with_columns((pl.col("dealer_id") // DEALERS_PER_BUCKET).alias(BUCKET_COLUMN))


TABLE_SCHEMA = with_bucket(empty(BRONZE_SCHEMA)).to_arrow().schema


def _commit(metadata: dict[str, str] | None) -> CommitProperties | None:
    return CommitProperties(custom_metadata=metadata) if metadata else None


def _stats(frame: pl.DataFrame) -> str:
    """A data file's Delta statistics: its rows, every column's nulls, and bounds of the integer and
    date columns only, which JSON holds exactly (readers skip files on dealer_id). Without bounds a
    Decimal, Datetime or String column is never used to skip a file, so it cannot skip one wrongly."""
    bounds = frame.select(STATS_COLUMNS)
    lo, hi = bounds.min().row(0, named=True), bounds.max().row(0, named=True)
    return json.dumps({
        "numRecords": frame.height,
        "minValues": {c: v if isinstance(v, int) else v.isoformat() for c, v in lo.items() if v is not None},
        "maxValues": {c: v if isinstance(v, int) else v.isoformat() for c, v in hi.items() if v is not None},
        "nullCount": dict(zip(frame.columns, frame.null_count().row(0), strict=True)),
    })


def _write_file(root: LakePath, files: pafs.FileSystem, bucket: int, frame: pl.DataFrame) -> AddAction:
    """One bucket's rows (bronze schema, dealer order) as one data file: a local file or one object
    upload, by polars with the lake's credentials (the output streams of `_table_files` reject
    pyarrow's buffers in deltalake 1.6.6). The bucket is in the path only, as delta-rs writes it."""
    path = f"{BUCKET_COLUMN}={bucket}/part-{uuid.uuid4()}.snappy.parquet"
    frame.write_parquet(f"{table_uri(root)}/{path}", mkdir=True, **FILE_OPTIONS)
    return AddAction(path, files.get_file_info(path).size, {BUCKET_COLUMN: str(bucket)}, int(time.time() * 1000),
                     True, _stats(frame))


def write_all(root: LakePath, batches: Iterable[pl.DataFrame], metadata: dict[str, str] | None = None) -> BronzeWrite:
    """Replace the whole table, or create it, from batches in dealer order: one overwrite commit.

    Each bucket's file is written and closed as soon as the batches move past the bucket, then all
    are committed at once (`create_write_transaction`), so memory holds a batch and a bucket, not
    every bucket's open writer as `write_deltalake` does until its commit. A commit that slipped in
    meanwhile (the bronze slot's lease lapsed) fails it rather than being merged into it unseen:
    delta-rs' overwrite does not check for one, so the version read before the first file is compared
    first. A writer killed before the commit leaves only files no commit references (`maintain`
    vacuums them).
    """
    existing = DeltaTable(table_uri(root)) if is_table(root) else None
    files, actions = _table_files(root), []
    bucket, pending = None, []
    for batch in batches:
        for (key,), part in with_bucket(batch).partition_by(
                BUCKET_COLUMN, as_dict=True, maintain_order=True, include_key=False).items():
            if key != bucket and pending:
                actions.append(_write_file(root, files, bucket, pl.concat(pending)))
                pending = []
            bucket = key
            pending.append(part)
    if pending:
        actions.append(_write_file(root, files, bucket, pl.concat(pending)))
    if existing is not None:
        newest = DeltaTable(table_uri(root)).version()
        if newest != existing.version():
            raise RuntimeError(f"bronze table {table_uri(root)} moved from version {existing.version()} to {newest}"
                               " while a full refresh wrote its files; nothing committed (the next tick redoes it)")
        existing.create_write_transaction(
            actions, mode="overwrite", schema=TABLE_SCHEMA, partition_by=[BUCKET_COLUMN],
            commit_properties=_commit(metadata))
    else:
        create_table_with_add_actions(
            table_uri(root), Schema.from_arrow(TABLE_SCHEMA), actions, partition_by=[BUCKET_COLUMN],
            configuration=TABLE_CONFIG, commit_properties=_commit(metadata))
    return _written(root)


def remove_stale_spills() -> list[str]:
    """Delete the spill directories of full refreshes killed before they removed them (each holds about
    the compressed table); returns their paths. One untouched for STALE_TEMP_SECONDS has no live
    writer: a refresh adds a spill file per batch, then reads them back within minutes."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    removed = []
    for spill in Path(tempfile.gettempdir()).glob(f"{SPILL_PREFIX}*"):
        try:
            if max([spill.stat().st_mtime] + [f.stat().st_mtime for f in spill.iterdir()]) < cutoff:
                shutil.rmtree(spill)
                removed.append(str(spill))
        except FileNotFoundError:  # removed meanwhile by its own refresh or another sweep
            pass
    return removed


def write_all_spilled(root: LakePath, batches: Iterable[pl.DataFrame], metadata: dict[str, str] | None = None,
                      group_rows: int = GROUP_ROWS) -> BronzeWrite:
    """`write_all` for batches in any order (a scan of `usage` comes in usage_id order), in bounded
    memory: each batch is sorted and spilled to a local temporary file, then the spills are read
    back a group of buckets at a time (row-group statistics skip the rest of each spill), sorted
    by dealer and written bucket by bucket into the one commit. Needs local disk for about the
    compressed table. Every batch is read before `metadata` is committed, so their source may add to it."""
    with tempfile.TemporaryDirectory(prefix=SPILL_PREFIX) as spill:
        runs, counts = [], []
        for batch in batches:
            run = with_bucket(sort_by_dealer(batch))
            runs.append(f"{spill}/{len(runs)}.parquet")
            run.write_parquet(runs[-1], compression="lz4", row_group_size=SPILL_ROW_GROUP_ROWS, statistics=True)
            counts.append(run.group_by(BUCKET_COLUMN).len())
        per_bucket = pl.concat(counts).group_by(BUCKET_COLUMN).agg(pl.col("len").sum()).sort(BUCKET_COLUMN) \
            if counts else pl.DataFrame()
        if per_bucket.is_empty():
            return write_all(root, [], metadata)
        groups: list[list[int]] = [[]]
        rows = 0
        for bucket, count in per_bucket.iter_rows():
            if groups[-1] and rows + count > group_rows:
                groups.append([])
                rows = 0
            groups[-1].append(bucket)
            rows += count

        def in_dealer_order() -> Iterator[pl.DataFrame]:
            for group in groups:
                yield (pl.scan_parquet(runs).filter(pl.col(BUCKET_COLUMN).is_between(group[0], group[-1]))
                       .sort("dealer_id", "usage_id").collect())

        return write_all(root, in_dealer_order(), metadata)


def replace_dealers(root: LakePath, frame: pl.DataFrame, dealers: list[int],
                    metadata: dict[str, str] | None = None) -> BronzeWrite:
    """Replace the rows of `dealers` (and of any dealer in `frame`) by `frame`: one predicate overwrite.

    Every written row matches the predicate, as delta-rs requires. Only on an existing table:
    a new one is made by `write_all` (delta-rs#3959, predicate writes on a new table).
    """
    dealers = sorted(set(dealers) | set(frame["dealer_id"].unique().to_list()))
    buckets = sorted({bucket_of(d) for d in dealers})
    predicate = (f"{BUCKET_COLUMN} IN ({', '.join(map(str, buckets))})"
                 f" AND dealer_id IN ({', '.join(map(str, dealers))})") if dealers else "false"
    write_deltalake(table_uri(root), with_bucket(sort_by_dealer(frame)).to_arrow().cast(TABLE_SCHEMA),
                    mode="overwrite", predicate=predicate, target_file_size=TARGET_FILE_BYTES,
                    writer_properties=WRITER, commit_properties=_commit(metadata))
    return _written(root)


def _files(table: DeltaTable) -> pl.DataFrame:
    return pl.DataFrame(table.get_add_actions(flatten=True)).select("path", "num_records")


def _written(root: LakePath) -> BronzeWrite:
    """The commit just made, and the rows of the files it added (what it cost to write)."""
    table = DeltaTable(table_uri(root))
    version, files = table.version(), _files(table)
    added = files
    if version > 0:
        table.load_as_version(version - 1)
        added = files.join(_files(table), on="path", how="anti")
    return BronzeWrite(version, int(added["num_records"].sum()), int(files["num_records"].sum()))


def scan(root: LakePath, version: int | None) -> pl.LazyFrame:
    """The table at `version` (None: the newest), in the bronze schema."""
    return pl.scan_delta(table_uri(root), version=version).select(*BRONZE_SCHEMA)


def read_dealers(root: LakePath, dealers: list[int], version: int | None) -> pl.DataFrame:
    """The dealers' rows at `version`: files of other buckets are not opened, and row groups of
    other dealers are skipped by their statistics."""
    if not dealers:
        return empty(BRONZE_SCHEMA)
    buckets = sorted({bucket_of(d) for d in dealers})
    return (
        pl.scan_delta(table_uri(root), version=version)
        .filter(pl.col(BUCKET_COLUMN).is_in(buckets) & pl.col("dealer_id").is_in(dealers))
        .select(*BRONZE_SCHEMA)
        .collect()
    )


def newest_version(root: LakePath) -> int:
    return DeltaTable(table_uri(root)).version()


def commit_metadata(root: LakePath, version: int) -> dict:
    """What the commit that made `version` recorded (RUN_KEY, READ_KEY); empty if it is no longer in the log."""
    table = DeltaTable(table_uri(root))
    for commit in table.history(limit=max(table.version() - version + 1, 1)):
        if commit["version"] == version:
            return commit
    return {}


def version_committed_by(root: LakePath, flow_run_id: str, look_back: int = 4 * MAINTENANCE_EVERY) -> int | None:
    """The version a flow run's write made, found in its commit metadata (deployment runs return no value)."""
    for commit in DeltaTable(table_uri(root)).history(limit=look_back):
        if commit.get(RUN_KEY) == flow_run_id:
            return commit["version"]
    return None


def status(root: LakePath) -> TableStatus | None:
    if not is_table(root):
        return None
    table = DeltaTable(table_uri(root))
    files = _files(table)
    maintenance = table.metadata().configuration.get(MAINTENANCE_KEY)
    return TableStatus(table.version(), files.height, int(files["num_records"].sum()),
                       json.loads(maintenance) if maintenance else None)


def maintenance_due(table: DeltaTable, every: int) -> bool:
    last = table.metadata().configuration.get(MAINTENANCE_KEY)
    return table.version() - (json.loads(last)["version"] if last else -1) > every


def maintain(root: LakePath, every: int = MAINTENANCE_EVERY, force: bool = False) -> dict | None:
    """Compact small files, vacuum (full: also files no commit references, e.g. a killed writer's)
    what is older than the retention, record it, checkpoint and trim the log. None when not due.
    The caller holds the bronze slot: compaction conflicts with concurrent writes."""
    table = DeltaTable(table_uri(root))
    if not (force or maintenance_due(table, every)):
        return None
    compacted = table.optimize.compact(target_size=TARGET_FILE_BYTES, writer_properties=WRITER)
    vacuumed = table.vacuum(dry_run=False, full=True)
    done = {"at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "version": table.version(),
            "compacted_removed": compacted["numFilesRemoved"], "compacted_added": compacted["numFilesAdded"],
            "vacuumed": len(vacuumed)}
    table.alter.set_table_properties({MAINTENANCE_KEY: json.dumps(done)}, raise_if_not_exists=False)
    table.create_checkpoint()
    table.cleanup_metadata()
    return done


def _table_files(root: LakePath) -> pafs.FileSystem:
    """The table directory through delta-rs' object store: the same access on a disk and on S3.
    A local directory is made first: the store opens only an existing one."""
    uri = table_uri(root)
    if "://" not in uri or uri.startswith("file://"):
        Path(uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    return pafs.PyFileSystem(DeltaStorageHandler(uri))


def legacy_file(root: LakePath) -> LakePath:
    """Bronze before it was a Delta table: one Parquet file in the table's directory."""
    return bronze_path(root) / DATA_FILE


def migrate_legacy(root: LakePath, metadata: dict[str, str] | None = None) -> bool:
    """Turn a lake's old `data.parquet` bronze into the table (one commit, read batch by batch; the
    file is in dealer order), then delete it and its writer's temp files, so that no reader finds
    it and vacuum has nothing of the old layout to remove. True when there was one."""
    legacy = legacy_file(root)
    if not legacy.exists():
        return False
    if not is_table(root):  # else a migration killed after its commit: only the deletes are left
        write_all(root, pl.scan_parquet(str(legacy)).select(*BRONZE_SCHEMA).collect_batches(), metadata)
    files = _table_files(root)
    for info in files.get_file_info(pafs.FileSelector("", recursive=False)):
        name = info.path.rsplit("/", 1)[-1]
        if name == DATA_FILE or (name.startswith(f".{DATA_FILE}.") and name.endswith(".tmp")):
            files.delete_file(info.path)
    return True
