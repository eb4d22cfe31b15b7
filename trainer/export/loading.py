"""Reading a recforge checkpoint into a plain, unsharded CPU network for export
(docs/architecture.md §9).

The sharded checkpoint is read with ``torch.distributed.checkpoint`` (DCP reshards any layout
into full tensors) into the network that the checkpoint's LightningModule builds from its
prepared data. Which module that is comes from :mod:`recforge.families`, also for checkpoints
of earlier versions (legacy class paths, and the DataModule's former ``model_family`` key).
The checkpoint may be a local directory or an ``s3://`` prefix (:mod:`recforge.trainer.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recforge.data import storage
from recforge.families import FAMILIES, ModelFamily, UnknownFamilyError, family, family_of_module
from recforge.trainer.checkpoint import CheckpointError, dcp_source, read_trainer_state
from recforge.trainer.export.errors import ExportError


@dataclass
class LoadedCheckpoint:
    family: ModelFamily
    network: nn.Module
    datamodule: Any
    hparams: dict[str, Any]
    path: Path | str
    """A local directory, or the checkpoint's ``s3://`` URI as given."""


def load_checkpoint(path: str | Path, data_dir: str | None = None) -> LoadedCheckpoint:
    """The unsharded CPU network of a recforge checkpoint directory or ``s3://`` prefix, with
    its DataModule."""
    import torch.distributed.checkpoint as dcp
    from lightning.pytorch.cli import instantiate_module

    from recforge.data.datamodule import SequenceDataModule

    # Not Path() for a URI: it would fold "s3://" into "s3:/".
    path = str(path).rstrip("/") if storage.is_remote(path) else Path(path)
    state = read_trainer_state(path)
    hparams = dict(state.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    try:
        fam = family_of_module(class_path)
    except UnknownFamilyError:
        raise ExportError(
            f"checkpoint {path}: model class {class_path!r} cannot be exported "
            f"(expected one of {[f.module for f in FAMILIES.values()]})"
        ) from None
    if isinstance(hparams.get("model"), dict):
        # A saved config without a field that was added later: the value it was trained with.
        hparams["model"] = {**dict(fam.legacy_config), **hparams["model"]}
    dm_hparams = _datamodule_hparams(path, state.get("datamodule_hyper_parameters") or {})
    if data_dir is not None:
        dm_hparams["data_dir"] = data_dir
    if not _has_manifest(dm_hparams.get("data_dir", "")):
        raise ExportError(
            f"checkpoint {path}: its prepared data {dm_hparams.get('data_dir')!r} is "
            "not there (the export needs the item/user vocabularies); "
            "pass --data-dir"
        )
    dm_hparams["synthesize"] = None
    dm = SequenceDataModule(**dm_hparams)
    module = instantiate_module(fam.load("module"), hparams)
    network, _ = module.build_model(dm)  # tables on meta
    _materialize_meta(network)
    module.prepare_for_export(network, dm)  # data-derived buffers: not in the checkpoint
    skeleton = {f"model.{k}": v for k, v in network.state_dict().items()}
    try:
        dcp.load(skeleton, **dcp_source(path, state), no_dist=True)
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {path}: weights do not load ({type(exc).__name__}: {first_line})"
        ) from None
    network.load_state_dict({k[len("model.") :]: v for k, v in skeleton.items()})
    network.eval()
    return LoadedCheckpoint(fam, network, dm, hparams, path)


def _has_manifest(data_dir: str) -> bool:
    from recforge.data.layout import MANIFEST

    try:
        return storage.exists(storage.join(data_dir, MANIFEST))
    except storage.StorageError:
        return False


def _datamodule_hparams(path: Path | str, saved: dict[str, Any]) -> dict[str, Any]:
    """The DataModule's saved arguments, in today's names: checkpoints of earlier versions
    name the batch format by the model family (``model_family``), not by ``batch_format``."""
    hparams = {k: v for k, v in saved.items() if not k.startswith("_")}
    legacy = hparams.pop("model_family", None)
    if legacy is not None and "batch_format" not in hparams:
        try:
            hparams["batch_format"] = family(legacy).batch_format
        except UnknownFamilyError as exc:
            raise ExportError(
                f"checkpoint {path}: datamodule hyper-parameter model_family: {exc}"
            ) from None
    return hparams


def _materialize_meta(network: nn.Module) -> None:
    """Give the meta tensors (the TorchRec tables) uninitialised CPU storage for the checkpoint
    to fill. Not ``to_empty`` on the whole network: that would also wipe the buffers the
    constructor computed and the checkpoint does not hold (e.g. fixed pooling weights)."""
    for module in network.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                setattr(
                    module,
                    name,
                    nn.Parameter(
                        torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad
                    ),
                )
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
