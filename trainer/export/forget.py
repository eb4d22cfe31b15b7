"""`recforge forget-artifacts`: remove users from exported artifacts' user stores, on disk and in
MLflow (docs/architecture.md, "Personal data").

An artifact keeps per-user data only in ``users.parquet`` (:mod:`.user_store`); the weights are
left as they are (what they learnt from a user goes only with a retrain on erased data). The
file is rewritten without the listed users (``full`` stores match raw ids, ``hashed`` ones the
keys of those ids under the artifact's salt; ``none`` has nothing to remove) and the manifest's
sha256 list follows, so the artifact still verifies.

- a directory: rewritten under a hidden name and renamed into place (:mod:`recforge.atomic`);
- MLflow (``--mlflow-tracking-uri``): every run with an ``export/`` artifact (recforge logs the
  artifact there) and every model version registered from one (their logged model's copy of the
  files). Each copy is downloaded, rewritten, and its ``users.parquet`` and ``manifest.json``
  replaced through the artifact repository of the run or logged model (delete, then log), which
  needs a store that can delete: a local or S3 artifact root, or a server with
  ``--serve-artifacts``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge import artifact
from recforge.atomic import atomic_directory
from recforge.trainer.export.errors import ExportError


def remove_users(directory: Path, canonical_ids: frozenset[str]) -> int:
    """Rewrite the artifact files in ``directory`` (in place: the caller owns a copy) without the
    listed users; returns how many were removed."""
    manifest = artifact.read_manifest(directory)
    if artifact.user_store(manifest)["mode"] == "none":
        return 0
    return _rewrite_flat(directory, manifest, canonical_ids)


def forget_in_directory(directory: str | Path, canonical_ids: frozenset[str]) -> int:
    """Remove users from the artifact ``directory``, atomically; returns how many."""
    directory = Path(directory)
    artifact.read_verified_manifest(directory)
    with atomic_directory(directory, overwrite=True) as tmp:
        for entry in directory.iterdir():
            if entry.is_file():
                shutil.copy2(entry, tmp / entry.name)
        return remove_users(tmp, canonical_ids)


def forget_in_mlflow(
    tracking_uri: str, canonical_ids: frozenset[str], model: str | None = None
) -> dict[str, Any]:
    """Rewrite the user store of every run export and registered version (of ``model`` only,
    when given) in the tracking server at ``tracking_uri``; returns what was rewritten."""
    import mlflow
    from mlflow import MlflowClient

    # mlflow-artifacts:/ roots (a server with --serve-artifacts) resolve via the global URI.
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    models = [model] if model else [m.name for m in client.search_registered_models()]
    roots: dict[str, str] = {}  # artifact root URI -> what it is, for the report
    runs: set[str] = set()
    for name in models:
        for version in client.search_model_versions(f"name='{name}'"):
            if artifact.ARTIFACT_TAG not in (version.tags or {}):
                continue
            runs.add(version.run_id)
            if version.source and version.source.startswith("models:/"):
                logged = client.get_logged_model(version.source.split("/", 1)[1].strip("/"))
                roots[logged.artifact_location] = f"model {name}/{version.version}"
    if model is None:
        experiments = [e.experiment_id for e in client.search_experiments()]
        for run in client.search_runs(experiments, max_results=10000):
            runs.add(run.info.run_id)
    for run_id in runs:
        run = client.get_run(run_id)
        names = [a.path for a in client.list_artifacts(run_id, artifact.EXPORT_ARTIFACT_PATH)]
        if f"{artifact.EXPORT_ARTIFACT_PATH}/{artifact.MANIFEST}" in names:
            root = f"{run.info.artifact_uri.rstrip('/')}/{artifact.EXPORT_ARTIFACT_PATH}"
            roots[root] = f"run {run_id}"
    report = {"copies": [], "users_removed": 0}
    for root, what in sorted(roots.items()):
        removed = _rewrite_copy(root, canonical_ids)
        if removed is not None:
            report["copies"].append({"where": what, "users_removed": removed})
            report["users_removed"] += removed
    return report


def _rewrite_copy(root: str, canonical_ids: frozenset[str]) -> int | None:
    """Rewrite the artifact files under the artifact URI ``root`` (the folder that holds
    ``manifest.json``, found one level down for a logged model's extra files); None when it
    holds no recforge manifest."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(root)
    folder = _manifest_folder(repo)
    if folder is None:
        return None
    local = Path(tempfile.mkdtemp(prefix=".recforge-forget-"))
    try:
        for name in (artifact.MANIFEST, artifact.USERS):
            path = f"{folder}/{name}" if folder else name
            try:
                repo.download_artifacts(path, str(local))
            except Exception:  # noqa: BLE001  (a none store has no users.parquet: nothing to do)
                continue
        flat = local / folder if folder else local
        if not (flat / artifact.USERS).is_file():
            return 0
        manifest = json.loads((flat / artifact.MANIFEST).read_text())
        # Only the two files change: the others are hashed as the manifest recorded them.
        removed = _rewrite_flat(flat, manifest, canonical_ids)
        for name in (artifact.USERS, artifact.MANIFEST):
            path = f"{folder}/{name}" if folder else name
            try:
                repo.delete_artifacts(path)
            except NotImplementedError:
                raise ExportError(
                    f"{root}: this artifact store cannot delete files; rewrite it by hand"
                ) from None
            repo.log_artifact(str(flat / name), folder or None)
        return removed
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _rewrite_flat(flat: Path, manifest: dict[str, Any], canonical_ids: frozenset[str]) -> int:
    """Rewrite ``users.parquet`` in ``flat`` without the listed users and the manifest with its
    new sha256 (the other files, which need not be there, keep theirs); returns how many."""
    store = artifact.user_store(manifest)
    users = pq.read_table(flat / artifact.USERS)
    if store["mode"] == "hashed":
        wanted = pa.array(sorted(artifact.user_key(store["salt"], c) for c in canonical_ids))
        gone = pc.is_in(users["user_id"], value_set=wanted)
    else:
        canonical = [artifact.canonical_user_id(u) for u in users["user_id"].to_pylist()]
        gone = pa.array([c in canonical_ids for c in canonical])
    removed = int(pc.sum(gone).as_py() or 0)
    pq.write_table(users.filter(pc.invert(gone)), flat / artifact.USERS)
    manifest["user_store"] = {**store, "users_erased": store.get("users_erased", 0) + removed}
    manifest["files"][artifact.USERS] = artifact.file_sha256(flat / artifact.USERS)
    artifact.write_manifest(flat, manifest)
    return removed


def _manifest_folder(repo: Any) -> str | None:
    """'' when ``manifest.json`` is at the root of ``repo``, else the first sub-folder (one
    level down, as a logged model's extra files are) that holds it; None when there is none."""
    entries = repo.list_artifacts()
    if any(os.path.basename(e.path) == artifact.MANIFEST for e in entries if not e.is_dir):
        return ""
    for entry in entries:
        if entry.is_dir and any(
            os.path.basename(f.path) == artifact.MANIFEST for f in repo.list_artifacts(entry.path)
        ):
            return entry.path
    return None


def run_cli(args: Any) -> int:
    import sys

    from recforge.data.consent import read_user_list
    from recforge.data.errors import DataError

    try:
        ids = read_user_list(args.users).ids
        if args.artifact_dir:
            removed = forget_in_directory(args.artifact_dir, ids)
            print(json.dumps({"artifact": args.artifact_dir, "users_removed": removed}))
        else:
            print(json.dumps(forget_in_mlflow(args.mlflow_tracking_uri, ids, args.model)))
    except (ExportError, artifact.ArtifactError, DataError) as exc:
        print(f"recforge forget-artifacts: error: {exc}", file=sys.stderr)
        return 2
    return 0
