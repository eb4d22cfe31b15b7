"""`recforge export`: a checkpoint (or an MLflow run's best checkpoint) -> an ONNX artifact dir.

DESIGN §9. The sharded checkpoint is read with ``torch.distributed.checkpoint`` into a plain,
unsharded CPU network (DCP reshards any layout into full tensors), which is wrapped in a module
that takes padded tensors (TorchRec's KeyedJaggedTensor does not export, DESIGN §11) and
exported with the dynamo exporter, dynamic in batch and sequence length. The artifact
directory (written to a temp dir, then renamed):

- ``model.onnx``: the user encoder (:mod:`recforge.trainer.export.encoders`). SASRec: ``item_ids`` (B, L) int64,
  right-padded with 0 -> ``user_vector`` (B, D) float32. Two-tower: ``item_ids`` (B, H) plus the
  user inputs the model uses (``user_idx``, ``user_<feature>`` codes, ``user_dense``) ->
  ``user_vector`` (B, out_dim), unit rows;
- ``item_embeddings.npy``: (N, D) float32, row i - 1 = item index i (padding row dropped): the
  SASRec item table, or the two-tower item tower's output for every item (its features baked in);
- ``items.parquet``: ``item_idx`` (1..N), original ``item_id``, training ``count``;
- ``users.parquet``: ``user_id``, ``user_idx`` and ``history`` (all item indexes, oldest first:
  the encoder reads the last L or H, ``exclude_seen`` all), plus each user input of a two-tower
  model, so known users can be served by id;
- ``user_features.json`` (two-tower models that read user features): each feature's code values
  and the numeric feature names, so a new user's raw features can be encoded when served;
- ``manifest.json``: kind, dims, opset, inputs/outputs (names, dtypes, shapes), sha256 of every
  other file, run id, metrics, dataset fingerprint, parity figures.

Parity gate: onnxruntime and PyTorch on fresh random histories, several batch sizes and lengths;
max |diff| of the user vector <= ``tolerance`` and identical top-10 over the catalogue, or the
export fails naming the measured difference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recforge.data.readers import file_sha256
from recforge.trainer.checkpoint import CheckpointError, read_trainer_state
from recforge.trainer.export.encoders import user_encoder

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = 1
OPSET = 18
PARITY_SHAPES = ((1, 1), (3, 7), (16, 50), (64, 200))
"""(batch, length) pairs the parity gate runs; lengths above the model's max_len are clipped."""


class ExportError(RuntimeError):
    """Export cannot produce a faithful artifact (unknown model, failed parity, bad input)."""


@dataclass
class LoadedCheckpoint:
    family: str
    network: nn.Module
    datamodule: Any
    hparams: dict[str, Any]
    path: Path


def load_checkpoint(path: str | Path, data_dir: str | None = None) -> LoadedCheckpoint:
    """The unsharded CPU network of a recforge checkpoint directory, with its DataModule."""
    import torch.distributed.checkpoint as dcp
    from lightning.pytorch.cli import instantiate_module

    from recforge.data.datamodule import SequenceDataModule

    path = Path(path)
    state = read_trainer_state(path)
    hparams = dict(state.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if class_path not in ("recforge.trainer.sasrec_module.SASRecModule", "recforge.trainer.two_tower_module.TwoTowerModule"):
        raise ExportError(f"checkpoint {path}: model class {class_path!r} cannot be exported "
                          "(expected SASRecModule or TwoTowerModule)")
    dm_hparams = {k: v for k, v in (state.get("datamodule_hyper_parameters") or {}).items() if not k.startswith("_")}
    if data_dir is not None:
        dm_hparams["data_dir"] = data_dir
    if not Path(dm_hparams.get("data_dir", "")).joinpath("manifest.json").is_file():
        raise ExportError(f"checkpoint {path}: its prepared data {dm_hparams.get('data_dir')!r} is not there "
                          "(the export needs the item/user vocabularies); pass --data-dir")
    dm_hparams["synthesize"] = None
    dm = SequenceDataModule(**dm_hparams)
    module_cls = _import(class_path)
    module = instantiate_module(module_cls, hparams)
    network, _ = module.build_model(dm)  # tables on meta
    _materialize_meta(network)
    if class_path.endswith("TwoTowerModule"):
        module.set_data_state(network, dm)  # data-derived buffers: not in the checkpoint
    else:
        network.set_item_frequencies(torch.as_tensor(dm.item_counts, dtype=torch.float32))
    skeleton = {f"model.{k}": v for k, v in network.state_dict().items()}
    try:
        dcp.load(skeleton, checkpoint_id=str(path), no_dist=True)
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"checkpoint {path}: weights do not load ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})") from None
    network.load_state_dict({k[len("model."):]: v for k, v in skeleton.items()})
    network.eval()
    family = "sasrec" if class_path.endswith("SASRecModule") else "two_tower"
    return LoadedCheckpoint(family, network, dm, hparams, path)


def _materialize_meta(network: nn.Module) -> None:
    """Give the meta tensors (the TorchRec tables) uninitialised CPU storage for the checkpoint
    to fill. Not ``to_empty`` on the whole network: that would also wipe the buffers the
    constructor computed and the checkpoint does not hold (e.g. fixed pooling weights)."""
    for module in network.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(module, name, nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")


def _import(class_path: str) -> type:
    import importlib

    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _export_onnx(encoder: nn.Module, example: tuple[Tensor, ...], path: Path) -> None:
    from torch.export import Dim

    batch, length = Dim("batch", min=1, max=65536), Dim("length", min=1, max=encoder.max_length)
    program = torch.onnx.export(encoder, example, dynamo=True, external_data=False, opset_version=OPSET,
                                input_names=list(encoder.names), output_names=["user_vector"],
                                dynamic_shapes=encoder.dynamic_shapes(batch, length), verbose=False)
    program.save(str(path), external_data=False)


def parity(encoder: nn.Module, onnx_path: Path, item_embeddings: np.ndarray, tolerance: float,
           seed: int = 0) -> dict[str, Any]:
    """onnxruntime vs PyTorch on random inputs; raises :class:`ExportError` past ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst, shapes = 0.0, []
    for batch, length in PARITY_SHAPES:
        length = min(length, encoder.max_length)
        inputs = encoder.random_inputs(batch, length, generator)
        with torch.no_grad():
            expected = encoder(*inputs).numpy()
        got = session.run(["user_vector"], {name: x.numpy() for name, x in zip(encoder.names, inputs)})[0]
        diff = float(np.abs(expected - got).max())
        worst = max(worst, diff)
        top_expected = _top_k(expected @ item_embeddings.T, 10)
        top_got = _top_k(got @ item_embeddings.T, 10)
        same_top = bool((top_expected == top_got).all())
        shapes.append({"batch": batch, "length": length, "max_abs_diff": diff, "same_top10": same_top})
        if not np.isfinite(diff) or diff > tolerance or not same_top:
            raise ExportError(f"ONNX parity failed at batch={batch}, length={length}: max |diff| of user_vector "
                              f"{diff:.3g} (tolerance {tolerance:g}), identical top-10: {same_top}")
    return {"max_abs_diff": worst, "tolerance": tolerance, "cases": shapes}


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    # Stable order (ties by index) so equal scores cannot flip the comparison.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def export(checkpoint: str | Path, out: str | Path, data_dir: str | None = None, run_id: str | None = None,
           metrics: dict[str, float] | None = None, tolerance: float = 1e-4, overwrite: bool = False,
           quantize: str | None = None, min_recall: float = 0.9) -> dict[str, Any]:
    """Export ``checkpoint`` into the artifact directory ``out``; returns the manifest.

    ``quantize="int8"``: ``model.onnx`` is the dynamically int8-quantized graph of the float one
    that passed the parity gate (see :mod:`recforge.trainer.export.quantize`; ``min_recall`` gates it)."""
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r}: expected 'int8' or none")
    if not 0.0 <= min_recall <= 1.0:
        raise ExportError(f"min_recall={min_recall}: expected a recall in [0, 1]")
    import pyarrow.parquet as pq

    from recforge.data.layout import ITEMS

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    loaded = load_checkpoint(checkpoint, data_dir)
    dm = loaded.datamodule
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        encoder = user_encoder(loaded.family, loaded.network)
        item_embeddings = encoder.item_vectors()  # (N, D)
        if not np.isfinite(item_embeddings).all():
            raise ExportError(f"checkpoint {checkpoint}: item vectors hold NaN or inf (a diverged model?)")
        np.save(tmp / "item_embeddings.npy", item_embeddings)
        example = encoder.random_inputs(2, min(8, encoder.max_length), torch.Generator().manual_seed(1))
        start = time.perf_counter()
        _export_onnx(encoder, example, tmp / "model.onnx")
        export_seconds = time.perf_counter() - start
        check = parity(encoder, tmp / "model.onnx", item_embeddings, tolerance)
        quantization = None
        if quantize == "int8":
            from recforge.trainer.export.quantize import quantize_int8

            quantization = quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx", encoder, item_embeddings,
                                         PARITY_SHAPES, min_recall)
            os.replace(tmp / "model.int8.onnx", tmp / "model.onnx")
        items = pq.read_table(Path(dm.data_dir) / ITEMS, columns=["item_idx", "item_id", "count"])
        pq.write_table(items.sort_by("item_idx"), tmp / "items.parquet")
        pq.write_table(_users_table(dm, encoder), tmp / "users.parquet")
        files = ["model.onnx", "item_embeddings.npy", "items.parquet", "users.parquet"]
        features = _user_feature_spec(dm, encoder)
        if features is not None:
            (tmp / "user_features.json").write_text(json.dumps(features, indent=1, default=str))
            files.append("user_features.json")
        config = encoder.config
        num_items, dim = item_embeddings.shape
        manifest = {
            "format": ARTIFACT_FORMAT,
            "kind": encoder.kind,
            "created_by": "recforge export",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": str(Path(checkpoint).resolve()),
            "run_id": run_id,
            "metrics": metrics or {},
            "dataset": {"path": str(Path(dm.data_dir).resolve()), "fingerprint": dm.manifest.get("fingerprint")},
            "num_items": num_items,
            "dim": dim,
            "max_len": encoder.max_length,
            "opset": OPSET,
            "inputs": _with_feature_kinds(encoder.input_specs(), _user_feature_kinds(dm.manifest)),
            "outputs": [{"name": "user_vector", "dtype": "float32", "shape": ["batch", dim]}],
            "input_example": {name: x[:1].tolist() for name, x in zip(encoder.names, example)},
            "scoring": "score(item i) = user_vector . item_embeddings[i - 1]"
                       + (" (cosine: both sides are unit vectors)" if encoder.kind == "two_tower" else ""),
            "parity": check,
            "quantization": quantization,
            "export_seconds": round(export_seconds, 2),
            "model_config": _plain(config),
        }
        manifest["files"] = {name: file_sha256(tmp / name) for name in files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        # Old artifact aside, new one in, old one deleted: never a moment without a complete one.
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _users_table(dm: Any, encoder: nn.Module) -> Any:
    """Known users: ``user_id``, ``user_idx``, ``history``, and (two-tower) each user input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recforge.data.layout import SEQUENCES, USERS
    from recforge.data.loader import load_feature_tables

    users = pq.read_table(Path(dm.data_dir) / USERS, columns=["user_idx", "user_id"]).sort_by("user_idx")
    sequences = pq.read_table(Path(dm.data_dir) / SEQUENCES, columns=["user_idx", "item_idx"]).sort_by("user_idx")
    if users.column("user_idx").to_pylist() != sequences.column("user_idx").to_pylist():
        raise ExportError(f"{dm.data_dir}: {USERS} and {SEQUENCES} list different users")
    # The whole history: the encoder reads its last L (or H) items, exclude_seen all of them.
    columns = {"user_id": users.column("user_id"), "user_idx": users.column("user_idx"),
               "history": sequences.column("item_idx").cast(pa.list_(pa.int32()))}
    config = encoder.config
    if encoder.kind == "two_tower" and (config.user_feature_keys or config.user_numeric_features):
        table = load_feature_tables(dm.data_dir, dm.manifest).user
        idx = users.column("user_idx").to_numpy().astype(np.int64)
        for name in config.user_feature_cardinalities:
            offsets, codes = table.sparse_columns[name]
            columns[f"user_{name}"] = pa.array([codes[offsets[i]:offsets[i + 1]].tolist() for i in idx],
                                               pa.list_(pa.int64()))
        if config.user_numeric_features:
            cols = [table.dense_names.index(name) for name in config.user_numeric_features]
            columns["user_dense"] = pa.array(table.dense[idx][:, cols].tolist(), pa.list_(pa.float32()))
    return pa.table(columns)


def _user_feature_spec(dm: Any, encoder: nn.Module) -> dict[str, Any] | None:
    """``user_features.json`` of a two-tower model that reads user features: the value of each
    code (1..K; 0 = missing) per categorical/list feature, and the numeric feature names, so a
    server can encode a new user's raw features."""
    from recforge.data.layout import FEATURE_VOCABS

    config = encoder.config
    if encoder.kind != "two_tower" or not (config.user_feature_cardinalities or config.user_numeric_features):
        return None
    vocabs = json.loads((Path(dm.data_dir) / FEATURE_VOCABS).read_text()).get("user", {})
    kinds = _user_feature_kinds(dm.manifest)
    spec: dict[str, Any] = {"categorical": {}, "list": {}, "numeric": list(config.user_numeric_features)}
    for name in config.user_feature_cardinalities:
        if kinds.get(name) not in ("categorical", "list") or name not in vocabs:
            raise ExportError(f"{dm.data_dir}: user feature {name!r} has no vocabulary in {FEATURE_VOCABS}")
        spec[kinds[name]][name] = vocabs[name]
    return spec


def _user_feature_kinds(data_manifest: dict[str, Any]) -> dict[str, str]:
    """Per user feature of the prepared data: ``categorical``, ``list`` or ``numeric``."""
    return {name: spec.get("kind") for name, spec in (data_manifest.get("features") or {}).get("user", {}).items()}


def _with_feature_kinds(specs: list[dict[str, Any]], kinds: dict[str, str]) -> list[dict[str, Any]]:
    """Mark user feature inputs ``categorical`` (one code per user, 0 = missing: what a user
    without known features must be given, as in training) or ``list`` (missing = no codes)."""
    for spec in specs:
        codes = spec["name"].startswith("user_") and spec["dtype"] == "int64" and len(spec["shape"]) == 2
        kind = kinds.get(spec["name"][len("user_"):]) if codes else None
        if kind in ("categorical", "list"):
            spec["feature_kind"] = kind
            spec["missing"] = [0] if kind == "categorical" else []
    return specs


def _plain(config: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config), default=str))


def export_after_fit(trainer: Any, module: Any, logger: Any, tracking: Any) -> dict[str, Any] | None:
    """``fit`` with ``mlflow.registered_model_name``: export the best checkpoint, log, register.

    Rank zero only, and without collectives (the checkpoint is read with ``no_dist``), so the
    other ranks may already be gone. A failure is logged, never raised: training is over and its
    checkpoints are on disk.
    """
    if trainer.global_rank != 0:
        return None
    from recforge.trainer.tracking.registry import log_and_register

    ckpt = trainer.checkpoint_callback
    path = (ckpt.best_model_path or ckpt.last_model_path) if ckpt is not None else ""
    if not path:
        log.warning("MLflow: no checkpoint was saved, so nothing is exported or registered")
        return None
    out = Path(path).parent.parent / "export"
    evaluation = getattr(module, "last_evaluation", None) or {}
    metrics = {f"test/{k}": v for k, v in evaluation.get("metrics", {}).items() if not k.startswith("segment/")}
    try:
        export(path, out, run_id=logger.run_id, metrics=metrics, overwrite=True)
        return log_and_register(out, logger._tracking_uri, logger.run_id, tracking.registered_model_name,
                                tracking.registered_model_alias)
    except Exception as exc:
        log.error("export/registration after fit failed (%s: %s); the checkpoint %s is intact, rerun "
                  "`recforge export --checkpoint %s --register %s`", type(exc).__name__, exc, path, path,
                  tracking.registered_model_name)
        return None


def run_cli(args: Any) -> int:
    import sys

    from recforge.trainer.tracking.logger import TrackingConfig, TrackingError, resolve_tracking

    try:
        needs_mlflow = bool(args.run_id or args.register or args.log_to_run)
        uri = resolve_tracking(TrackingConfig(tracking_uri=args.tracking_uri))[0] if needs_mlflow else None
        checkpoint, run_id = args.checkpoint, args.run_id or args.log_to_run
        if args.run_id:
            from mlflow import MlflowClient

            tags = MlflowClient(uri).get_run(args.run_id).data.tags
            checkpoint = tags.get("recforge.best_checkpoint") or tags.get("recforge.last_checkpoint")
            if not checkpoint:
                raise ExportError(f"MLflow run {args.run_id} records no checkpoint (tag recforge.best_checkpoint)")
        metrics = None
        if run_id:
            from mlflow import MlflowClient

            metrics = {k: v for k, v in MlflowClient(uri).get_run(run_id).data.metrics.items() if k.startswith("test/")}
        manifest = export(checkpoint, args.out, data_dir=args.data_dir, run_id=run_id, metrics=metrics,
                          tolerance=args.tolerance, overwrite=args.overwrite, quantize=args.quantize,
                          min_recall=args.min_recall)
        print(f"exported {checkpoint} -> {args.out} (parity: max |diff| {manifest['parity']['max_abs_diff']:.2e})")
        q = manifest["quantization"]
        if q:
            print(f"int8: recall@10 vs float {q['recall@10_vs_float']:.3f}, max |diff| vs PyTorch "
                  f"{q['max_abs_diff_vs_pytorch']:.2e}, {q['bytes_float']} -> {q['bytes_int8']} bytes")
        if args.triton:
            from recforge.trainer.export.triton import write_triton_repository

            print(f"Triton model repository: {write_triton_repository(args.out, args.triton, args.triton_name)}")
        if needs_mlflow:
            if not run_id:
                raise ExportError("--register needs an MLflow run to log into: pass --run-id or --log-to-run")
            from recforge.trainer.tracking.registry import log_and_register

            result = log_and_register(args.out, uri, run_id, args.register, args.alias)
            print(json.dumps(result))
    except (ExportError, CheckpointError, TrackingError) as exc:
        print(f"recforge export: error: {exc}", file=sys.stderr)
        return 2
    return 0
