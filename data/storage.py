"""Where recforge's files live: a local path or an ``s3://bucket/prefix`` URI, one interface.

Object storage is reached with the standard AWS configuration, nothing of our own:
credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` (or the
default credential chain), the region from ``AWS_REGION``/``AWS_DEFAULT_REGION``, and a
non-AWS endpoint (MinIO, Ceph, a local test server) from ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL`` or MLflow's ``MLFLOW_S3_ENDPOINT_URL``, in that order.

Two client libraries see the same objects: pyarrow's filesystem (Parquet reads and writes,
streamed by row group) and fsspec's ``s3fs`` (what ``torch.distributed.checkpoint`` and
Lightning take). Object stores have no rename, so "nothing half-written" is kept differently
there: a directory is complete when its commit file (a prepared dataset's ``manifest.json``,
a checkpoint's trainer state) exists, and that file is always written last.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recforge.atomic import hidden_sibling
from recforge.data.errors import DataError

SCHEMES = ("s3",)
_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


class StorageError(DataError):
    """Object storage that cannot be used: endpoint unreachable, bucket missing, access denied."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs (other schemes are refused by :func:`filesystem`)."""
    return "://" in str(location) and not str(location).startswith("file://")


def endpoint_url() -> str | None:
    """The S3 endpoint from the environment, or None for AWS itself."""
    for name in _ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location/part/...`` for a path or a URI."""
    if is_remote(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    return str(Path(location).joinpath(*parts))


def split_uri(uri: str) -> tuple[str, str]:
    """``(bucket, key prefix)`` of an ``s3://`` URI."""
    parsed = urlparse(uri)
    if parsed.scheme not in SCHEMES:
        raise StorageError(
            f"unsupported storage scheme {parsed.scheme!r}; expected a local path or "
            f"{', '.join(s + '://' for s in SCHEMES)}",
            path=uri,
        )
    if not parsed.netloc:
        raise StorageError("no bucket in the URI (expected s3://bucket/prefix)", path=uri)
    return parsed.netloc, parsed.path.lstrip("/")


def filesystem(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """pyarrow ``(filesystem, path)`` for a local path or URI."""
    if not is_remote(location):
        local = str(location)
        local = local[len("file://") :] if local.startswith("file://") else local
        return pafs.LocalFileSystem(), str(Path(local).absolute())
    bucket, key = split_uri(str(location))
    return _s3(), posixpath.join(bucket, key).rstrip("/")


def _s3() -> pafs.S3FileSystem:
    endpoint = endpoint_url()
    kwargs: dict[str, Any] = {"region": _region()}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or endpoint
        kwargs["scheme"] = parsed.scheme or "https"
    # Unreachable endpoints fail in seconds with one message rather than retrying for minutes.
    kwargs["connect_timeout"] = float(os.environ.get("RECFORGE_S3_CONNECT_TIMEOUT", "5"))
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    return pafs.S3FileSystem(**kwargs)


def fsspec_filesystem(location: str) -> Any:
    """An fsspec filesystem for ``location`` (s3fs for ``s3://``), as DCP and Lightning take."""
    import fsspec

    if not is_remote(location):
        return fsspec.filesystem("file")
    split_uri(location)  # refuses other schemes with our message
    options: dict[str, Any] = {}
    if endpoint_url():
        options["endpoint_url"] = endpoint_url()
    return fsspec.filesystem("s3", **options)


def storage_options() -> dict[str, Any]:
    """fsspec ``storage_options`` matching :func:`fsspec_filesystem` (for libraries that build
    their own filesystem from a URI, such as DCP's ``FsspecWriter``)."""
    return {"endpoint_url": endpoint_url()} if endpoint_url() else {}


def check_reachable(location: str | os.PathLike[str]) -> None:
    """Raise one :class:`StorageError` line naming ``location`` when its bucket cannot be used.

    Local paths always pass (their own errors are clear)."""
    if not is_remote(location):
        return
    uri = str(location)
    bucket, _ = split_uri(uri)
    try:
        fs = _s3()
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise StorageError(_reason(exc, bucket), path=uri) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket '{bucket}' does not exist", path=uri)


def _reason(exc: OSError, bucket: str) -> str:
    text = str(exc)
    endpoint = endpoint_url() or "AWS S3"
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text:
        return f"cannot reach the S3 endpoint {endpoint}"
    if "NO_SUCH_BUCKET" in text:
        return f"bucket '{bucket}' does not exist"
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "403" in text:
        return f"access denied to bucket '{bucket}' at {endpoint} (check the AWS credentials)"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"object storage error at {endpoint}: {first}"


def exists(location: str | os.PathLike[str]) -> bool:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(_reason(exc, path.split("/")[0]), path=str(location)) from None


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(location)) from None
        raise StorageError(_reason(exc, path.split("/")[0]), path=str(location)) from None


def read_text(location: str | os.PathLike[str]) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file: a temp file and rename locally; one PUT (atomic) on S3."""
    if not is_remote(location):
        target = Path(location)
        tmp = hidden_sibling(target, "partial")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except OSError as exc:
        raise StorageError(_reason(exc, path.split("/")[0]), path=str(location)) from None


def upload_directory(local: Path, uri: str, *, last: str | None = None) -> None:
    """Copy every file under ``local`` to ``uri``; ``last`` (a relative name) is copied after
    all others, so readers that wait for it never see a partial directory."""
    fs, root = filesystem(uri)
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    if last is not None:
        names = [n for n in names if n != last] + ([last] if (local / last).exists() else [])
    try:
        for name in names:
            pafs.copy_files(
                str(local / name),
                posixpath.join(root, name),
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )
    except OSError as exc:
        raise StorageError(_reason(exc, root.split("/")[0]), path=uri) from None


def delete_directory(uri: str) -> None:
    """Remove every object under ``uri`` (nothing if there is none)."""
    fs, root = filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return
    fs.delete_dir(root)


# --- Parquet through the filesystem of a location (local reads stay memory-mapped) ---


def parquet_file(location: str | os.PathLike[str]) -> pq.ParquetFile:
    """A :class:`pyarrow.parquet.ParquetFile` of a local path or URI; remote row groups are
    fetched as they are read, so a reader holds one row group, not the file."""
    if not is_remote(location):
        return pq.ParquetFile(location)
    fs, path = filesystem(location)
    try:
        # pre_buffer: the column chunks of a read are fetched in a few coalesced requests.
        return pq.ParquetFile(fs.open_input_file(path), pre_buffer=True)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(location)) from None
        raise StorageError(_reason(exc, path.split("/")[0]), path=str(location)) from None


def read_table(location: str | os.PathLike[str], columns: list[str] | None = None) -> pa.Table:
    return parquet_file(location).read(columns=columns)


def read_schema(location: str | os.PathLike[str]) -> pa.Schema:
    return parquet_file(location).schema_arrow


# --- Directory listing and single-object deletion (checkpoints on object storage) ---


def list_names(location: str | os.PathLike[str]) -> list[str]:
    """Names of the entries directly under ``location`` (files and sub-directories, or on S3
    objects and common prefixes); empty when there is nothing there."""
    fs, root = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise StorageError(_reason(exc, root.split("/")[0]), path=str(location)) from None
    return sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)


def delete_file(location: str | os.PathLike[str]) -> None:
    """Remove one file or object; nothing if it is not there."""
    fs, path = filesystem(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        raise StorageError(_reason(exc, path.split("/")[0]), path=str(location)) from None
