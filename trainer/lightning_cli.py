"""`recforge fit | validate | test`: LightningCLI over the recforge modules and DataModule."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch.cli import LightningCLI

from data.datamodule import SequenceDataModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "strategy": {"class_path": "trainer.strategy.TorchRecStrategy"},
    "use_distributed_sampler": False,
}


class RecforgeCLI(LightningCLI):
    """LightningCLI with recforge's defaults: the TorchRec strategy, the SequenceDataModule."""

    pass


def run(argv: list[str]) -> int:
    # Evaluation metrics are all-reduced by the evaluator itself, so every rank logs the same
    # value; Lightning's advice to pass sync_dist=True does not apply.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated.*")
    RecforgeCLI(
        model_class=None,
        datamodule_class=SequenceDataModule,
        subclass_mode_model=True,
        trainer_defaults=TRAINER_DEFAULTS,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "recforge"},
    )
    return 0
