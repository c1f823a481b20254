"""The lake on the S3 protocol: bronze -> silver -> gold, and the pipeline's state, against `moto_server`.

moto serves the S3 API over HTTP on 127.0.0.1; polars' and delta-rs' object stores talk to it
through the standard AWS_* variables, as they would to S3 or another S3-compatible store.

Commit safety: delta-rs commits a version on S3 with a conditional put (`If-None-Match: *` on the
version's log file), so that of two writers of the same version one fails and retries. moto
5.2.5 honours it: a second conditional put of an existing key gets 412 PreconditionFailed, and
concurrent delta-rs appends from several processes all land, with retries counted in their
commits (`test_moto_honours_the_conditional_put_delta_rs_commits_with`). So this test does
exercise commit safety, not only the file layout.
"""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import time
from datetime import date
from decimal import Decimal
from pathlib import Path

import boto3
import httpx
import polars as pl
import pytest
from botocore.exceptions import ClientError
from deltalake import DeltaTable, write_deltalake

from usage_pipeline import bronze
from usage_pipeline.lake import read_state_document, resolve_lake_root, write_parquet_atomic, write_state_document
from usage_pipeline.materialize import build_gold, build_silver, refresh_bronze
from usage_pipeline.transforms import BRONZE_SCHEMA

P = "aaaaaaaa-0000-4000-8000-000000000001"
BUCKET = "usage-lake"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = Path(sys.executable).parent / "moto_server"
    server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "wb"),
                              stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=20)


@pytest.fixture
def s3_root(s3_endpoint, monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    yield resolve_lake_root(f"s3://{BUCKET}/lake/"), s3
    for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    s3.delete_bucket(Bucket=BUCKET)


def bronze_rows() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "usage_id": [1, 2, 3],
            "dealer_id": [1, 1, 2],
            "customer_id": [10, 10, 11],
            "service_id": [1, 2, 1],
            "usage_date": [date(2026, 10, 1), date(2026, 10, 2), date(2026, 9, 30)],
            "quantity": [Decimal("1"), Decimal("2"), Decimal("3")],
            "amount": [Decimal("10.5"), Decimal("-1.25"), Decimal("4")],
            "usage_modified": [None, None, None],
            "service_status_id": [3, 3, 10],
            "service_name": ["Voice", None, "Data"],
        },
        schema=BRONZE_SCHEMA,
    )


def test_bronze_silver_gold_and_the_state_on_s3(s3_root):
    root, s3 = s3_root
    rows = bronze_rows()
    first = refresh_bronze(root, lambda _: rows, None)
    assert (first.rows, first.version) == (3, 0)
    silver = build_silver(root, P, [1, 2], first.version)
    gold = build_gold(root, P)
    assert (silver.bronze_rows, gold.usage_report_rows) == (3, 2)
    keys = sorted(item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert [k for k in keys if not k.startswith("lake/bronze/")] == sorted(
        f"lake/{layer}/{table}/partner={P}/data.parquet" for layer, table in (
            ("silver", "billing_usage_aggregated"), ("silver", "billing_monthly_usage_by_service"),
            ("gold", "usage_report"), ("gold", "active_services"))
    )
    assert "lake/bronze/billing_usage_raw/_delta_log/00000000000000000000.json" in keys
    assert {k.split("/")[3] for k in keys if k.startswith("lake/bronze/") and "_delta_log" not in k} == {"dealer_bucket=0"}
    report = pl.read_parquet(f"{root}/gold/usage_report/partner={P}/data.parquet")
    assert report["amount"].cast(pl.Float64).sum() == pytest.approx(13.25)

    # A one-dealer slice replaces that dealer's rows, in one commit; the first version stays readable.
    fresh = rows.filter(pl.col("dealer_id") == 2).with_columns(pl.lit(7).alias("customer_id").cast(pl.Int64))
    sliced = refresh_bronze(root, lambda dealers: fresh, [2])
    assert (sliced.mode, sliced.version) == ("slice", 1)
    table = f"{root}/bronze/billing_usage_raw"
    assert pl.read_delta(table).sort("usage_id")["customer_id"].to_list() == [10, 10, 7]
    assert pl.read_delta(table, version=0).sort("usage_id")["customer_id"].to_list() == [10, 10, 11]
    assert bronze.maintain(root, force=True) is not None and bronze.status(root).version == 2

    assert read_state_document(root) == (None, f"pipeline state {root}/_pipeline/detection_state.parquet does not exist")
    write_state_document(root, {"partitions": {P: {"failures": 1}}})
    assert read_state_document(root) == ({"partitions": {P: {"failures": 1}}}, None)


def test_an_old_bronze_object_is_migrated_and_deleted_on_s3(s3_root):
    root, s3 = s3_root
    write_parquet_atomic(bronze_rows(), bronze.legacy_file(root))
    result = refresh_bronze(root, lambda dealers: bronze_rows().filter(pl.col("dealer_id").is_in(dealers)), [2])
    assert result.migrated and (result.mode, result.version, result.rows) == ("slice", 1, 3)
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert "lake/bronze/billing_usage_raw/data.parquet" not in keys
    assert pl.read_delta(f"{root}/bronze/billing_usage_raw").height == 3


def _append(uri: str, value: int) -> None:
    write_deltalake(uri, pl.DataFrame({"x": [value]}).to_arrow(), mode="append")


def test_moto_honours_the_conditional_put_delta_rs_commits_with(s3_root, s3_endpoint):
    """Without it, two writers of one version would both "win" and one commit would be lost."""
    _, s3 = s3_root
    s3.put_object(Bucket=BUCKET, Key="probe", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket=BUCKET, Key="probe", Body=b"2", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=BUCKET, Key="probe")["Body"].read() == b"1"

    uri = f"s3://{BUCKET}/race"
    _append(uri, -1)
    writers = 8
    # spawn: delta-rs' runtime does not survive a fork
    with multiprocessing.get_context("spawn").Pool(writers) as pool:
        pool.starmap(_append, [(uri, i) for i in range(2 * writers)])
    table = DeltaTable(uri)
    assert table.version() == 2 * writers
    assert sorted(pl.read_delta(uri)["x"].to_list()) == list(range(-1, 2 * writers))
    assert sum(commit["operationMetrics"].get("num_retries", 0) for commit in table.history()) > 0
