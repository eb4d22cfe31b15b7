"""recforge.data.storage against a real S3-API server (moto's, in its own process)."""

from __future__ import annotations

import pytest

from recforge.data import storage


def test_write_read_exists_round_trip(s3_bucket: str, tmp_path) -> None:
    uri = storage.join(s3_bucket, "a", "b.txt")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    assert storage.exists(uri)
    assert storage.read_text(uri) == "hello"
    local = tmp_path / "x.txt"
    storage.write_bytes(local, b"local")
    assert storage.read_text(local) == "local"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]  # no temp file left


def test_upload_directory_writes_the_commit_file_last(s3_bucket: str, tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("manifest.json", "a.parquet", "sub/c.bin"):
        (tmp_path / name).write_bytes(name.encode())
    uri = storage.join(s3_bucket, "ds")
    storage.upload_directory(tmp_path, uri, last="manifest.json")
    for name in ("manifest.json", "a.parquet", "sub/c.bin"):
        assert storage.read_text(storage.join(uri, name)) == name
    storage.delete_directory(uri)
    assert not storage.exists(storage.join(uri, "a.parquet"))


def test_missing_bucket_is_one_clear_line(s3_bucket: str) -> None:
    storage.check_reachable(s3_bucket + "/prefix")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_reachable("s3://no-such-bucket/prefix")


def test_unreachable_endpoint_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(storage.StorageError) as info:
        storage.check_reachable("s3://bucket/prefix")
    message = str(info.value)
    assert message.startswith("s3://bucket/prefix: cannot reach the S3 endpoint http://127.0.0.1:9")
    assert "\n" not in message


def test_other_schemes_are_refused() -> None:
    with pytest.raises(storage.StorageError, match="unsupported storage scheme 'gs'"):
        storage.filesystem("gs://bucket/x")
