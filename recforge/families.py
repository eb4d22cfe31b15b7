"""The model-family registry: the one place that knows which families exist.

A family ties together the pieces each layer provides for one kind of model:

- ``model``: the plain ``nn.Module`` (:mod:`recforge.models`);
- ``module``: the LightningModule that trains it (:mod:`recforge.trainer`);
- ``batch_format``: what the DataModule yields for it (:data:`recforge.data.examples.BatchFormat`);
- ``user_encoder``: the padded-tensor module that is exported to ONNX
  (:mod:`recforge.trainer.export.encoders`).

Classes are named by dotted path and imported only when asked for, so this module imports
nothing of recforge's: every layer (and the torch-free ``serve``) may read it. Code elsewhere
asks the registry (``family_of_module``, ``FAMILIES``) instead of comparing family names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    """Registry key; also the ``kind`` of an exported artifact and the prefix of default
    experiment names (``<family>-<dataset>``)."""
    model: str
    """Dotted path of the ``nn.Module``."""
    module: str
    """Dotted path of the LightningModule (a config's ``model.class_path``)."""
    batch_format: str
    """The DataModule's batch format for this family."""
    user_encoder: str
    """Dotted path of the export wrapper that takes padded tensors."""
    legacy_modules: tuple[str, ...] = ()
    """Class paths under which checkpoints written by earlier versions name the module."""
    legacy_config: tuple[tuple[str, object], ...] = ()
    """Model-config fields added since the first release, each with the value that reproduces a
    checkpoint saved before the field existed (its saved config lacks the key; the field's
    default may since have changed)."""

    def load(self, attribute: str) -> type:
        """The class behind ``model``, ``module`` or ``user_encoder``, imported now."""
        module_name, _, name = getattr(self, attribute).rpartition(".")
        return getattr(importlib.import_module(module_name), name)


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="sasrec",
            model="recforge.models.sasrec.SASRec",
            module="recforge.trainer.sasrec_module.SASRecModule",
            batch_format="sequence",
            user_encoder="recforge.trainer.export.encoders.SASRecUserEncoder",
            legacy_modules=("trainer.sasrec_module.SASRecModule",),
            legacy_config=(("position_origin", "oldest"),),
        ),
        ModelFamily(
            name="two_tower",
            model="recforge.models.two_tower.TwoTower",
            module="recforge.trainer.two_tower_module.TwoTowerModule",
            batch_format="history",
            user_encoder="recforge.trainer.export.encoders.TwoTowerUserEncoder",
            legacy_modules=("trainer.two_tower_module.TwoTowerModule",),
        ),
    )
}


class UnknownFamilyError(ValueError):
    """A name or class path that no registered family owns."""


def family(name: str) -> ModelFamily:
    """The family registered under ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(
            f"model family {name!r} is not registered (known: {sorted(FAMILIES)})"
        ) from None


def family_of_module(class_path: str) -> ModelFamily:
    """The family whose LightningModule is ``class_path`` (current or legacy path)."""
    for candidate in FAMILIES.values():
        if class_path == candidate.module or class_path in candidate.legacy_modules:
            return candidate
    raise UnknownFamilyError(
        f"model class {class_path!r} belongs to no registered family "
        f"(expected one of {[f.module for f in FAMILIES.values()]})"
    )


def family_of_model(network: object) -> ModelFamily:
    """The family whose ``nn.Module`` class ``network`` is an instance of."""
    cls = type(network)
    path = f"{cls.__module__}.{cls.__qualname__}"
    for candidate in FAMILIES.values():
        if path == candidate.model:
            return candidate
    raise UnknownFamilyError(f"network {path} belongs to no registered family")
