"""The export-artifact contract: what `recforge export` writes and `recforge serve` reads.

An artifact is a directory holding the files named here and ``manifest.json``, which lists the
sha256 of every other file and carries ``format``, a ``"major.minor"`` version. A reader
refuses a major it does not know (the layout or the meaning of a field changed) and accepts
every minor of its own major (minors only add fields). Artifacts of the first release wrote
the integer ``1``, which reads as 1.0.

The writer is :mod:`recforge.trainer.export`; the readers are :mod:`recforge.serve`, the
model registry (:mod:`recforge.trainer.tracking.registry`) and the Triton repository writer.
This module imports neither torch nor anything of recforge's but :mod:`recforge.families`,
so the torch-free serving layer may import it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from recforge.families import FAMILIES

# --- files ---

MODEL = "model.onnx"
"""The user encoder: the manifest's ``inputs`` -> ``user_vector`` (B, D)."""
ITEM_EMBEDDINGS = "item_embeddings.npy"
"""(N, D) float32; row i - 1 scores item index i."""
ITEMS = "items.parquet"
"""``item_idx`` (1..N), original ``item_id``, training ``count``."""
USERS = "users.parquet"
"""Known users: ``user_id``, ``user_idx``, ``history`` and each further user input of the model.
Present only with a user store (:data:`USER_STORES`); with ``hashed`` the ``user_id`` column
holds :func:`user_key` values, not ids, and ``history`` only what the model reads."""
USER_FEATURES = "user_features.json"
"""Code values of the user features (models that read them), to encode a new user's raw ones."""
ANN_INDEX = "item_index.hnsw.faiss"
"""Optional: a faiss HNSW inner-product index over :data:`ITEM_EMBEDDINGS` (faiss
``write_index`` format, id = catalogue position = item index - 1), built at export so that serving
a large catalogue does not rebuild it; the manifest's ``ann`` entry describes it."""
MANIFEST = "manifest.json"

MODEL_CARD = "MODEL_CARD.md"
"""What the model is, its data, configuration, metrics overall and per group, popularity bias and
known limits (``recforge.trainer.export.model_card``); hashed and logged like the other files."""
CONTENT_FILES = (MODEL, ITEM_EMBEDDINGS, ITEMS, USERS, USER_FEATURES, ANN_INDEX, MODEL_CARD)
"""Every file the manifest may list, in the order it lists them."""
REQUIRED_FILES = (MODEL, ITEM_EMBEDDINGS, ITEMS)
INT8_MODEL = "model.int8.onnx"
"""Scratch name of the quantized graph during export; it then replaces :data:`MODEL`."""

USER_VECTOR = "user_vector"
"""The one output of :data:`MODEL`."""

TRITON_CONFIG = "config.pbtxt"
TRITON_VERSION = "1"
"""Triton repository layout: ``<repo>/<name>/config.pbtxt``, ``<repo>/<name>/1/model.onnx``."""
TRITON_SHA256_PARAMETER = "recforge_sha256"

# --- versions and kinds ---

FORMAT_VERSION = "1.1"
"""What the writer puts in ``format``. The optional :data:`ANN_INDEX` file and the manifest's
``ann`` entry came later within 1.0: a reader without them verifies the file's sha256 and ignores
it, and a reader looks for the index by its name in ``files``, not by the version. 1.1 adds the
manifest's ``user_store`` (:func:`user_store`); a 1.0 reader serves such an artifact by history,
and answers a raw ``user_id`` as unknown (a hashed store's keys are not ids)."""
SUPPORTED_MAJOR = 1
KINDS: tuple[str, ...] = tuple(FAMILIES)
"""Artifact kinds served: one per registered model family."""

# --- approximate search (the HNSW index of :data:`ANN_INDEX`) ---

ANN_AUTO_MIN_ITEMS = 200_000
"""Catalogues larger than this get an HNSW index at export by default (``--ann auto``) and are
searched through one when served with ``--index auto``; smaller ones are searched exactly."""
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 512
"""HNSW defaults shared by the export (build, recall measurement) and the server (search)."""
ANN_RECALL_K = 10
ANN_RECALL_QUERIES = 1000
"""The export measures recall@``ANN_RECALL_K`` of the index against exact search on this many
query vectors."""

# --- MLflow ---

EXPORT_ARTIFACT_PATH = "export"
"""Run artifact folder that holds the whole artifact directory."""
ARTIFACT_TAG = "recforge.artifact"
"""Model-version tag: the run artifact URI of the artifact directory (what ``recforge serve
models:/NAME@ALIAS`` downloads)."""
REGISTERED_MODEL_TAG = "recforge.registered_model"
"""Run tag: ``<name>/<version>`` the run's export was registered as."""
BEST_CHECKPOINT_TAG = "recforge.best_checkpoint"
LAST_CHECKPOINT_TAG = "recforge.last_checkpoint"
"""Run tags naming the checkpoints that `recforge export --run-id` reads."""
MODEL_METADATA_KIND = "recforge_kind"
MODEL_METADATA_FILES = "recforge_files"
"""Keys of the logged MLflow model's metadata."""


# --- the user store: what an artifact keeps of each known user (docs/architecture.md §9) ---

USER_STORES = ("none", "hashed", "full")
"""``none``: no :data:`USERS` file, requests carry the history; ``hashed`` (the default): user
keys are salted hashes (:func:`user_key`, the salt in the manifest) and histories are capped to
what the model reads; ``full``: raw ids and whole histories (the only layout before 1.1)."""
DEFAULT_USER_STORE = "hashed"


def canonical_user_id(value: Any) -> str:
    """One text form per user id whatever type a file or a request gave it: text that is a
    whole number is that number (the data readers' rule), anything else its trimmed text."""
    text = str(value).strip()
    if text.lstrip("-").isdigit() and text.isascii() and len(text.lstrip("-")) <= 18:
        return str(int(text))
    return text


def user_key(salt: str, user_id: Any) -> str:
    """Salted sha256 of a user id (hex): the key of a ``hashed`` user store, and of the data
    layer's erasure ledger. Without the salt the key does not reveal the id; with it, a given
    id can be checked (what serving does), so the salt travels with the artifact only."""
    return hashlib.sha256(f"{salt}\x00{canonical_user_id(user_id)}".encode()).hexdigest()


def user_store(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``user_store`` (``mode``, and ``salt``/``history_cap`` for ``hashed``);
    artifacts of format 1.0 have a ``full`` store when they have :data:`USERS`."""
    store = manifest.get("user_store")
    if store is None:
        return {"mode": "full" if USERS in manifest.get("files", {}) else "none"}
    if not isinstance(store, dict) or store.get("mode") not in USER_STORES:
        raise ArtifactError(f"user_store {store!r}: 'mode' must be one of {USER_STORES}")
    if store["mode"] == "hashed" and not isinstance(store.get("salt"), str):
        raise ArtifactError("user_store: a hashed store needs its 'salt'")
    if (store["mode"] == "none") == (USERS in manifest.get("files", {})):
        raise ArtifactError(
            f"user_store {store['mode']!r} and the files disagree: {USERS} is "
            + ("listed" if store["mode"] == "none" else "missing")
        )
    return store


class ArtifactError(RuntimeError):
    """The artifact is missing, incomplete, tampered with, or of an unknown format or kind."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (artifacts and data files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_dims(shape: Iterable[Any]) -> list[int]:
    """A manifest shape as integers: symbolic (named) or unknown (``None``) dims become -1, the
    spelling of MLflow signatures, Triton configs and the Open Inference Protocol."""
    return [d if isinstance(d, int) and not isinstance(d, bool) else -1 for d in shape]


def format_version(value: Any, where: str | Path) -> tuple[int, int]:
    """``(major, minor)`` of a manifest's ``format``: ``"M.m"``, or the first release's integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, 0
    if isinstance(value, str):
        major, dot, minor = value.partition(".")
        if dot and major.isdigit() and minor.isdigit():
            return int(major), int(minor)
    raise ArtifactError(
        f'{where}: format {value!r} is not a version (expected "major.minor", '
        f"e.g. {FORMAT_VERSION!r})"
    )


def check_format(manifest: dict[str, Any], where: str | Path) -> tuple[int, int]:
    """Refuse a manifest whose format major this version does not read; returns its version."""
    major, minor = format_version(manifest.get("format"), where)
    if major != SUPPORTED_MAJOR:
        raise ArtifactError(
            f"{where}: artifact format {major}.{minor} is not supported; this "
            f"recforge reads format {SUPPORTED_MAJOR}.x (it writes "
            f"{FORMAT_VERSION}). Re-export the model with this recforge, or serve "
            "it with the version that wrote it"
        )
    return major, minor


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the artifact ``directory``, after checking its format, kind and file list
    (not the files' contents: see :func:`read_verified_manifest`)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ArtifactError(
            f"{directory}: not a directory (expected an artifact written by `recforge export`)"
        )
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: {MANIFEST} is missing; not an artifact of `recforge export`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    check_format(manifest, path)
    if manifest.get("kind") not in KINDS:
        raise ArtifactError(
            f"{path}: kind {manifest.get('kind')!r} is not served (expected one of {KINDS})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
        raise ArtifactError(f"{path}: 'files' must list sha256s of {', '.join(REQUIRED_FILES)}")
    for name in files:
        if Path(name).name != name:
            raise ArtifactError(f"{path}: file name {name!r} is not a plain name")
    try:
        user_store(manifest)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is in ``directory`` with the listed sha256."""
    directory = Path(directory)
    for name, expected in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(
                f"{directory}: {name} is missing (listed in {MANIFEST}); the artifact is incomplete"
            )
        actual = file_sha256(file)
        if actual != expected:
            raise ArtifactError(
                f"{file}: sha256 {actual[:16]}... does not match the manifest's "
                f"{str(expected)[:16]}...; the file was modified or damaged after "
                "export — refusing to serve it"
            )


def read_verified_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of ``directory`` after checking it and every file's sha256."""
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    return manifest


def hash_files(directory: str | Path) -> dict[str, str]:
    """``files`` of a new manifest: the sha256 of each artifact file present in ``directory``."""
    directory = Path(directory)
    return {
        name: file_sha256(directory / name)
        for name in CONTENT_FILES
        if (directory / name).is_file()
    }


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as ``directory/manifest.json`` (the writer fills ``format`` and ``files``
    first: see :mod:`recforge.trainer.export.writing`)."""
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
