"""recforge.artifact: the export-artifact contract's reader checks (format version, kind, sha256),
without torch and without a real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from recforge import artifact
from recforge.artifact import ArtifactError, read_manifest, read_verified_manifest
from recforge.families import FAMILIES


def _artifact(directory: Path, **fields: object) -> Path:
    """An artifact directory with placeholder files and a manifest listing their sha256s."""
    directory.mkdir()
    for name in artifact.REQUIRED_FILES:
        (directory / name).write_bytes(f"placeholder {name}".encode())
    manifest = {
        "format": artifact.FORMAT_VERSION,
        "kind": next(iter(FAMILIES)),
        "files": artifact.hash_files(directory),
        **fields,
    }
    artifact.write_manifest(directory, manifest)
    return directory


def test_a_fresh_artifact_reads_and_verifies(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a")
    manifest = read_verified_manifest(art)
    assert set(manifest["files"]) == set(artifact.REQUIRED_FILES)
    assert artifact.check_format(manifest, art) == artifact.format_version(
        artifact.FORMAT_VERSION, art
    )


def test_unknown_major_is_refused_naming_both_versions(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", format=f"{artifact.SUPPORTED_MAJOR + 1}.3")
    with pytest.raises(ArtifactError) as info:
        read_manifest(art)
    message = str(info.value)
    assert f"format {artifact.SUPPORTED_MAJOR + 1}.3" in message, message
    assert f"{artifact.SUPPORTED_MAJOR}.x" in message, message
    assert artifact.FORMAT_VERSION in message, message
    assert str(art / artifact.MANIFEST) in message


def test_first_release_integer_format_and_newer_minor_are_accepted(tmp_path: Path) -> None:
    old = _artifact(tmp_path / "old", format=1)
    assert read_verified_manifest(old)["format"] == 1
    assert artifact.format_version(1, "x") == (1, 0)
    newer = _artifact(tmp_path / "newer", format=f"{artifact.SUPPORTED_MAJOR}.99")
    assert read_verified_manifest(newer)["format"].endswith(".99")


@pytest.mark.parametrize("value", [None, True, "1", "one.0", "1.x", 1.0])
def test_malformed_format_is_refused(tmp_path: Path, value: object) -> None:
    art = _artifact(tmp_path / "a", format=value)
    with pytest.raises(ArtifactError, match="is not a version"):
        read_manifest(art)


def test_modified_file_fails_sha256_verification(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a")
    (art / artifact.ITEM_EMBEDDINGS).write_bytes(b"tampered")
    assert read_manifest(art)["kind"] in FAMILIES, "the file list itself is still fine"
    mismatch = rf"{artifact.ITEM_EMBEDDINGS}: sha256 .* does not match"
    with pytest.raises(ArtifactError, match=mismatch):
        read_verified_manifest(art)
    (art / artifact.ITEM_EMBEDDINGS).unlink()
    with pytest.raises(ArtifactError, match=rf"{artifact.ITEM_EMBEDDINGS} is missing"):
        read_verified_manifest(art)


def test_unknown_kind_and_incomplete_file_list_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is not served"):
        read_manifest(_artifact(tmp_path / "kind", kind="no-such-family"))
    with pytest.raises(ArtifactError, match="must list sha256s"):
        read_manifest(_artifact(tmp_path / "files", files={artifact.MODEL: "0" * 64}))
    with pytest.raises(ArtifactError, match="not a plain name"):
        listed = {name: "0" * 64 for name in (*artifact.REQUIRED_FILES, "../x")}
        read_manifest(_artifact(tmp_path / "path", files=listed))
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(tmp_path)


def test_kinds_are_the_registered_families() -> None:
    assert artifact.KINDS == tuple(FAMILIES)


def test_onnx_dims() -> None:
    assert artifact.onnx_dims(["batch", 64, None]) == [-1, 64, -1]


def test_contract_imports_no_torch() -> None:
    code = (
        "import sys, recforge.artifact, recforge.serve.artifact; "
        "assert 'torch' not in sys.modules; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_manifest_json_round_trip(tmp_path: Path) -> None:
    art = _artifact(tmp_path / "a", extra={"n": 1})
    assert json.loads((art / artifact.MANIFEST).read_text())["extra"] == {"n": 1}
