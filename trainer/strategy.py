"""A Lightning strategy for models whose embedding tables TorchRec shards (docs/architecture.md §5).

It is Lightning's DDP strategy (same launchers: Lightning's own, ``torchrun``, multi-node), except
that it never wraps the model in DDP: the LightningModule wraps its network in TorchRec's
``DistributedModelParallel`` in ``configure_model``, and DMP data-parallelises the dense part
itself. Checkpoints are sharded directories (:mod:`recforge.trainer.checkpoint`), local or on
``s3://`` object storage.

The LightningModule must provide ``sharded_state_dict()``, ``load_sharded_state_dict(state)``,
``fused_optimizer`` and ``sharding_plan()`` (see
:class:`recforge.trainer.sasrec_module.SASRecModule`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from recforge.trainer import checkpoint as ckpt

log = logging.getLogger(__name__)


class TorchRecStrategy(DDPStrategy):
    """DDP launch and process groups, TorchRec DMP for the model, sharded checkpoints."""

    strategy_name = "torchrec"

    def __init__(
        self,
        process_group_backend: str | None = None,
        timeout_minutes: float = 30.0,
        start_method: str = "popen",
        reset_embedding_optimizer: bool = False,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            process_group_backend: ``gloo`` or ``nccl``; default: nccl on CUDA, gloo on CPU.
            timeout_minutes: collective timeout.
            start_method: Lightning's launcher start method (``popen`` re-runs the command per
                rank).
            reset_embedding_optimizer: when resuming ``fit``, load the weights only and start
                the fused embedding optimizer afresh (for a plan whose optimizer state cannot be
                carried over; ``recforge fit --reset_embedding_optimizer true``).
        """
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timedelta(minutes=timeout_minutes),
            start_method=start_method,
            **kwargs,
        )
        self.reset_embedding_optimizer = reset_embedding_optimizer

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or (
            "nccl" if self.root_device.type == "cuda" else "gloo"
        )

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.root_device.type == "cuda":
            # TF32 matmuls: ~free speed on Ampere+ for the dense part; embeddings are unaffected.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        # DMP has placed the shards and DDP-wrapped the dense part; no DDP wrapper here, and no
        # broadcast of "module states" from rank 0, which would overwrite other ranks' shards.
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def configure_ddp(self) -> None:  # never wrap: DMP already data-parallelises the dense part
        pass

    # --- checkpoints ---

    def _info(self, message: str) -> None:
        # recforge's own logger: the CLI shows its INFO lines and quiets Lightning's.
        if self.is_global_zero:
            log.info(message)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.lightning_module.sharded_state_dict()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        module = self.lightning_module
        sharded = {"model": checkpoint["state_dict"]}
        if module.fused_optimizer is not None:
            sharded["fused_optimizer"] = module.fused_optimizer.state_dict()
        plan, plan_text = module.sharding_plan()
        ckpt.save(filepath, checkpoint, sharded, plan, plan_text, self.world_size)

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        module = self.lightning_module
        state = ckpt.read_trainer_state(checkpoint_path)
        meta = state["recforge"]
        resuming = module.trainer.state.fn == TrainerFn.FITTING
        plan, _ = module.sharding_plan()
        reset = self.reset_embedding_optimizer
        if resuming:
            # Refuses what cannot be carried over; a world-size change alone reshards (DCP).
            changes = ckpt.check_plan(
                checkpoint_path,
                meta["plan"],
                plan,
                meta["world_size"],
                self.world_size,
                reset_embedding_optimizer=reset,
            )
            if changes:
                self._info(
                    f"resuming under another plan ({'; '.join(changes)}): the model is "
                    "resharded"
                    + ("" if reset else ", and the fused embedding optimizer state with it")
                )
            if reset and module.fused_optimizer is not None:
                self._info(
                    "reset_embedding_optimizer: loading the weights only; the fused embedding "
                    "optimizer starts with fresh state"
                )
        skeleton: dict[str, Any] = {"model": module.sharded_state_dict()}
        if resuming and not reset and module.fused_optimizer is not None:
            skeleton["fused_optimizer"] = module.fused_optimizer.state_dict()
        ckpt.load_sharded(checkpoint_path, skeleton, state)
        state["state_dict"] = skeleton["model"]
        if "fused_optimizer" in skeleton:
            state["fused_optimizer"] = skeleton["fused_optimizer"]
        self._info(
            f"loaded sharded checkpoint {checkpoint_path} (written by {meta['world_size']} rank(s))"
        )
        return state

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        self.lightning_module.load_sharded_state_dict(checkpoint["state_dict"])

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        fused = self.lightning_module.fused_optimizer
        if fused is not None and "fused_optimizer" in checkpoint:
            fused.load_state_dict(checkpoint["fused_optimizer"])

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            ckpt.remove(filepath)
