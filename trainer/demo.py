"""`recforge demo`: the product's path on synthetic data, offline, on CPU.

Today it covers the data layer end to end: synthesise interactions with item/user features,
prepare them, and stream the first training batches for both model families. Training,
MLflow, export and serving join this path as they land.
"""

from __future__ import annotations

import json
from pathlib import Path


def run_demo(workdir: str) -> int:
    from data.datamodule import SequenceDataModule
    from data.prepare import PrepareConfig, prepare
    from data.synth import SynthConfig, generate

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    synth_dir, prepared_dir = root / "synth", root / "prepared"

    print(f"[1/3] synthesising interactions -> {synth_dir}")
    summary = generate(SynthConfig(out=str(synth_dir), users=2000, items=800, mean_length=40, seed=0), overwrite=True)
    print(f"      {summary['interactions']} interactions, {summary['users']} users, {summary['items']} items")

    print(f"[2/3] preparing -> {prepared_dir}")
    manifest = prepare(PrepareConfig(
        input=[str(synth_dir / "interactions.parquet")], out=str(prepared_dir), format="parquet",
        item_features=str(synth_dir / "item_features.parquet"), user_features=str(synth_dir / "user_features.parquet"),
        min_user=5, min_item=5, overwrite=True))
    print(f"      {manifest['users']} users, {manifest['items']} items, {manifest['interactions']} interactions; "
          f"removed {json.dumps(manifest['rows_removed'])}")

    print("[3/3] streaming the first training batch of each model family")
    for model in ("sasrec", "two_tower"):
        dm = SequenceDataModule(str(prepared_dir), model_family=model, batch_size=4, max_len=8, history_len=8)
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        print(f"      {model}:")
        for key, value in batch.items():
            if hasattr(value, "keys") and callable(value.keys) and not isinstance(value, dict):
                print(f"        {key}: KeyedJaggedTensor keys={value.keys()} lengths={value.lengths().tolist()}")
            elif hasattr(value, "shape"):
                print(f"        {key}: {tuple(value.shape)} {value.dtype}")
        if model == "sasrec":
            print(f"        first row input_ids: {batch['input_ids'][0].tolist()}")
            print(f"        first row target_ids: {batch['target_ids'][0].tolist()}")
    print(f"done: prepared data in {prepared_dir} (see manifest.json for every count)")
    return 0
