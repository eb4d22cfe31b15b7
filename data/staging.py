"""`recforge data prepare` with inputs or output on object storage (``s3://``).

Both engines work on local files (DuckDB spills beside its database, the readers parse text
formats whole), so remote files are staged: inputs are copied, object by object, into a fresh
local folder (``--spill-dir`` or the system temp folder), the engine prepares into that folder,
and a remote ``--out`` receives the finished files with ``manifest.json`` uploaded last. Readers
of prepared data treat a prefix without a manifest as no dataset, so a crash mid-upload leaves
nothing that looks complete. The manifest names the original URIs, not the staging paths.

Staging costs local disk equal to the input plus the output; the memory bound is the engine's.
"""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from recforge.data import layout, storage
from recforge.data.errors import DataError
from recforge.data.layout import MANIFEST

if TYPE_CHECKING:
    from recforge.data.prepare import PrepareConfig

log = logging.getLogger(__name__)


def involves_remote(config: PrepareConfig) -> bool:
    locations = [
        *config.input,
        config.out,
        config.item_features or "",
        config.user_features or "",
        config.vocab_from or "",
    ]
    return any(storage.is_remote(p) for p in locations)


def prepare_staged(
    config: PrepareConfig, prepare_local: Callable[[PrepareConfig], dict[str, Any]]
) -> dict[str, Any]:
    """Run ``prepare_local`` on local copies of remote inputs, then publish a remote output."""
    remote_out = storage.is_remote(config.out)
    for location in [
        *config.input,
        config.out,
        config.item_features,
        config.user_features,
        config.vocab_from,
    ]:
        if location and storage.is_remote(location):
            storage.check_reachable(location)
    manifest_uri = storage.join(config.out, MANIFEST)
    if remote_out and storage.exists(manifest_uri) and not config.overwrite:
        raise DataError("output exists (pass --overwrite to replace it)", path=config.out)
    if config.spill_dir:
        Path(config.spill_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".recforge-staging-", dir=config.spill_dir))
    try:
        originals: dict[str, str] = {}
        inputs = [
            _stage(uri, staging / "input" / str(i), originals) for i, uri in enumerate(config.input)
        ]
        staged = {
            name: _stage(getattr(config, name), staging / name, originals)
            for name in ("item_features", "user_features")
            if getattr(config, name)
        }
        if config.vocab_from and storage.is_remote(config.vocab_from):
            # Only the vocabularies and the manifest: the previous sequences are not needed.
            names = [MANIFEST, layout.USERS, layout.ITEMS]
            staged["vocab_from"] = _stage_files(
                config.vocab_from, names, staging / "vocab_from", originals
            )
        local_out = staging / "out" if remote_out else Path(config.out)
        manifest = prepare_local(
            replace(
                config,
                input=inputs,
                out=str(local_out),
                spill_dir=config.spill_dir or str(staging),
                **staged,
            )
        )
        manifest = _name_originals(manifest, originals)
        # Rewrites the manifest only: the engine's files are already complete where they are.
        storage.write_bytes(local_out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        if remote_out:
            if storage.exists(manifest_uri):
                # The old manifest goes first: from then on the prefix reads as "no dataset".
                storage.delete_directory(manifest_uri)
                storage.delete_directory(config.out)
            storage.upload_directory(local_out, config.out, last=MANIFEST)
            log.info("uploaded the prepared dataset to %s", config.out)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage(location: str, local_root: Path, originals: dict[str, str]) -> str:
    """Local path standing for ``location``: itself when local, else a copy of the object (or
    of every visible object under the prefix, keeping relative paths)."""
    if not storage.is_remote(location):
        return location
    if any(ch in location for ch in "*?["):
        raise DataError(
            "globs are not supported in s3:// inputs; name an object or a prefix", path=location
        )
    fs, root = storage.filesystem(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        objects = [(root, posixpath.basename(root))]
    else:
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        objects = [
            (f.path, posixpath.relpath(f.path, root))
            for f in listing
            if f.type == pafs.FileType.File
            and not any(
                part.startswith((".", "_")) for part in posixpath.relpath(f.path, root).split("/")
            )
        ]
        if not objects:
            raise DataError("no such object, and no objects under this prefix", path=location)
    local_root.mkdir(parents=True, exist_ok=True)
    for key, relative in objects:
        target = local_root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            key, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        originals[str(target)] = f"s3://{key}"
    local = local_root / objects[0][1] if info.type == pafs.FileType.File else local_root
    originals.setdefault(str(local), location)
    return str(local)


def _stage_files(location: str, names: list[str], local: Path, originals: dict[str, str]) -> str:
    """Copy the named files of the remote directory ``location`` into ``local``."""
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        uri = storage.join(location, name)
        try:
            (local / name).write_bytes(storage.read_bytes(uri))
        except FileNotFoundError:
            raise DataError("missing; not a prepared directory", path=uri) from None
        originals[str(local / name)] = uri
    originals[str(local)] = location
    return str(local)


def _name_originals(manifest: dict[str, Any], originals: dict[str, str]) -> dict[str, Any]:
    """The manifest with staging paths replaced by the URIs they were copied from."""
    text = json.dumps(manifest)
    for local, uri in sorted(originals.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(json.dumps(local)[1:-1], json.dumps(uri)[1:-1])
    return json.loads(text)
