"""`recforge demo`: the product's path on synthetic data, offline, on CPU.

Synthesise interactions with item/user features and prepare them; stream a first batch of each
model family; train SASRec and the two-tower model (each a real `recforge fit` process, tracked in
an MLflow store inside the work dir); export each best checkpoint to ONNX (parity-checked) and
register it; serve each over HTTP from the registry (`models:/demo-sasrec@champion`,
`models:/demo-two-tower@champion`) and print recommendations for a sample user.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_demo(workdir: str) -> int:
    from recforge.data.datamodule import SequenceDataModule
    from recforge.data.prepare import PrepareConfig, prepare
    from recforge.data.synth import SynthConfig, generate
    from recforge.families import FAMILIES

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    synth_dir, prepared_dir = root / "synth", root / "prepared"

    print(f"[1/6] synthesising interactions -> {synth_dir}")
    summary = generate(
        SynthConfig(out=str(synth_dir), users=2000, items=800, mean_length=40, seed=0),
        overwrite=True,
    )
    print(
        f"      {summary['interactions']} interactions, {summary['users']} users, "
        f"{summary['items']} items"
    )

    print(f"[2/6] preparing -> {prepared_dir}")
    manifest = prepare(
        PrepareConfig(
            input=[str(synth_dir / "interactions.parquet")],
            out=str(prepared_dir),
            format="parquet",
            item_features=str(synth_dir / "item_features.parquet"),
            user_features=str(synth_dir / "user_features.parquet"),
            min_user=5,
            min_item=5,
            overwrite=True,
        )
    )
    print(
        f"      {manifest['users']} users, {manifest['items']} items, "
        f"{manifest['interactions']} interactions; "
        f"removed {json.dumps(manifest['rows_removed'])}"
    )

    print("[3/6] streaming the first training batch of each model family")
    for family in FAMILIES.values():
        dm = SequenceDataModule(
            str(prepared_dir),
            batch_format=family.batch_format,
            batch_size=4,
            max_len=8,
            history_len=8,
        )
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        print(f"      {family.name} ({family.batch_format} batches):")
        for key, value in batch.items():
            if hasattr(value, "keys") and callable(value.keys) and not isinstance(value, dict):
                print(
                    f"        {key}: KeyedJaggedTensor keys={value.keys()} "
                    f"lengths={value.lengths().tolist()}"
                )
            elif hasattr(value, "shape"):
                print(f"        {key}: {tuple(value.shape)} {value.dtype}")
        if "target_ids" in batch:
            print(f"        first row input_ids: {batch['input_ids'][0].tolist()}")
            print(f"        first row target_ids: {batch['target_ids'][0].tolist()}")
    tracking = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    recforge = [sys.executable, "-m", "recforge"]
    print(f"[4/6] training every model family (tracked in {tracking})")
    registered = []
    for family in FAMILIES.values():
        name = family.name
        # Sequence models train on the data prepared above; feature models on their tiny config's
        # own synthetic set (its item/user features), generated into the work dir, for 2 epochs.
        slug = name.replace("_", "-")
        data = prepared_dir if family.batch_format == "sequence" else root / f"data-{slug}"
        extra = [] if family.batch_format == "sequence" else ["--trainer.max_epochs", "2"]
        model_name = f"demo-{slug}"
        registered.append(model_name)
        start = time.perf_counter()
        args = [
            *recforge,
            "fit",
            "--config",
            str(REPO / "configs" / name / "tiny.yaml"),
            "--data.data_dir",
            str(data),
            "--trainer.default_root_dir",
            str(root / "runs"),
            "--trainer.logger.init_args.save_dir",
            str(root / "runs"),
            "--mlflow.tracking_uri",
            tracking,
            "--mlflow.experiment_name",
            f"demo-{name}",
            "--trainer.enable_progress_bar",
            "false",
            "--mlflow.registered_model_name",
            model_name,
            *extra,
        ]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"demo: training {name} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        metrics = _test_metrics(root / "runs")
        print(
            f"      {name}: {time.perf_counter() - start:.0f} s, test ndcg@10 (filtered) "
            f"{metrics.get('ndcg@10_filtered', float('nan')):.3f}, "
            f"hr@10 {metrics.get('hr@10_filtered', float('nan')):.3f}"
        )

    print(
        "[5/6] each exported to ONNX (parity-checked) and registered as "
        + " and ".join(f"models:/{name}@champion" for name in registered)
    )
    print("[6/6] serving each over HTTP from the registry")
    for name in registered:
        _serve_and_ask(f"models:/{name}@champion", tracking)
    print(f"done. Review the runs: mlflow ui --backend-store-uri {tracking}")
    return 0


def _test_metrics(runs: Path) -> dict[str, float]:
    newest = max(runs.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(newest.read_text())["metrics"]


def _serve_and_ask(source: str, tracking: str) -> None:
    import requests
    import uvicorn

    from recforge.serve.http import create_app
    from recforge.serve.local import free_port, wait_healthy

    app = create_app(source, tracking_uri=tracking)
    rec = app.state.holder.current
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url + "/healthz", timeout_s=30)
    # The export keeps salted-hash user keys by default (--user-store hashed), not ids: the
    # demo asks with a stored history, as a client of a user it knows would.
    user = next(iter(rec.histories))
    history = [rec.item_ids[i - 1] for i in rec.histories[user]]
    answer = requests.post(
        url + "/v1/recommend", json={"history": history, "k": 5}, timeout=10
    ).json()
    print(f'      {source} ({rec.kind}): POST {url}/v1/recommend {{"history": [...], "k": 5}}')
    print(f"      history (last items {history[-5:]}) ->")
    for item in answer["items"]:
        print(f"        item {item['item_id']!r}  score {item['score']:.3f}")
    cold = requests.post(
        url + "/v1/recommend", json={"history": ["never-seen"], "k": 3}, timeout=10
    ).json()
    print(
        f"      unknown history -> most-popular fallback {[i['item_id'] for i in cold['items']]}, "
        f"fallback={cold['fallback']}, unknown={cold['unknown_history_items']}"
    )
    server.should_exit = True
    thread.join(timeout=10)
