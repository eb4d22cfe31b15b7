"""Two "nodes" on one machine: two torchrun agents (``--nnodes 2``, one process each) meet
through torchrun's c10d rendezvous on loopback and train the tiny configs with the item table
sharded across both, exactly as the same command would on two hosts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("config", "name"),
    [
        ("configs/sasrec/tiny.yaml", "sasrec-tiny"),
        ("configs/two_tower/tiny.yaml", "two-tower-tiny"),
    ],
)
def test_two_nodes_on_loopback_shard_the_item_table(config: str, name: str, tmp_path: Path) -> None:
    data, root = tmp_path / "data", tmp_path / "run"
    fit = [
        "fit",
        "--config",
        str(REPO / config),
        "--data.data_dir",
        str(data),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
        "--trainer.max_epochs",
        "1",
        "--mlflow.enabled",
        "false",
    ]
    port = _free_port()
    agents = [
        subprocess.Popen(
            [
                TORCHRUN,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "recforge-two-nodes",
                "-m",
                "recforge",
                *fit,
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    for agent in agents:
        try:
            outputs.append(agent.communicate(timeout=400)[0])
        finally:
            if agent.poll() is None:
                agent.kill()
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out[-4000:]
    runs = sorted((root / name).glob("version_*"))
    run = runs[-1]
    plan = json.loads((run / "sharding_plan.json").read_text())
    assert plan["item_table"]["ranks"] == [0, 1]
    assert {p.name for p in run.iterdir()} >= {"local_shards_rank0.json", "local_shards_rank1.json"}
    assert (run / "checkpoints" / "last.ckpt" / "trainer_state.pt").is_file()
