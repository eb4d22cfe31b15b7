"""recforge.models.two_tower: one item-table lookup per step, position-aware pooling, L2-normalised
towers, logQ and accidental hits through the shared loss, user id hashing, feature codes traced
from prepared data into the model's KJT, and a tiny model that learns."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import recforge.models.two_tower as tt
from recforge.models.towers import HistoryPooling, TowerConfig, hash_user_ids
from recforge.models.two_tower import EBC_MODULE, EC_MODULE, TwoTower, TwoTowerConfig

N, U, H = 30, 12, 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """These tensors are tiny: intra-op threads only add overhead, and on a loaded 2-core machine
    OpenMP threads contending for the cores made the learning test ~80x slower (42 s vs 0.6 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides: Any) -> TwoTowerConfig:
    kwargs: dict[str, Any] = dict(
        num_items=N,
        num_users=U,
        dim=16,
        out_dim=8,
        feature_dim=4,
        history_len=H,
        item_tower=TowerConfig([16], 0.0),
        user_tower=TowerConfig([16], 0.0),
        temperature=0.1,
        num_negatives=5,
    )
    return TwoTowerConfig(**{**kwargs, **overrides})


def _model(seed: int = 0, **overrides: Any) -> TwoTower:
    torch.manual_seed(seed)
    return TwoTower(_config(**overrides))


def _batch(
    histories: list[list[int]],
    targets: list[int] | None = None,
    users: list[int] | None = None,
    user_features: dict[str, list[list[int]]] | None = None,
) -> KeyedJaggedTensor:
    """A batch KJT laid out like data.loader's two-tower batches."""
    b = len(histories)
    targets = targets if targets is not None else [1] * b
    users = users if users is not None else list(range(1, b + 1))
    keys, values, lengths = ["history", "target", "user_id"], [], []
    values += [i for h in histories for i in h] + list(targets) + list(users)
    lengths += [len(h) for h in histories] + [1] * b + [1] * b
    for name, rows in (user_features or {}).items():
        keys.append(f"user_{name}")
        values += [v for r in rows for v in r]
        lengths += [len(r) for r in rows]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        stride=b,
    )


def _calls(module: torch.nn.Module) -> list[Any]:
    """Inputs of every forward call of ``module`` (a forward hook)."""
    seen: list[Any] = []
    module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    return seen


# --------------------------------------------------------------------------------- config, layout


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_items", -1),
        ("dim", 0),
        ("pooling", "max"),
        ("decay", 0.0),
        ("decay", 1.5),
        ("temperature", 0.0),
        ("num_negatives", -1),
        ("table_name", "items"),
        ("pooling_heads", 0),
        ("user_id_hash_buckets", -1),
        ("history_len", 2.5),
        ("item_feature_cardinalities", {"a.b": 3}),
    ],
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"TwoTowerConfig.{field}"):
        TwoTowerConfig(**{"num_items": 10, field: value})


def test_config_cross_field_rules() -> None:
    with pytest.raises(ValueError, match="num_negatives"):
        TwoTowerConfig(num_items=10, in_batch_negatives=False, num_negatives=0)
    with pytest.raises(ValueError, match="pooling_heads"):
        TwoTowerConfig(num_items=10, pooling="mean", pooling_heads=2)
    with pytest.raises(ValueError, match="num_items=0"):
        TwoTower(TwoTowerConfig(num_items=0))
    with pytest.raises(ValueError, match="num_users=0"):
        TwoTower(TwoTowerConfig(num_items=5, use_user_id=True))
    TwoTower(
        TwoTowerConfig(num_items=5, use_user_id=True, user_id_hash_buckets=7)
    )  # hashing needs no count
    with pytest.raises(ValueError, match="hidden"):
        TowerConfig(hidden=[0])


def test_table_layout_and_meta_device() -> None:
    model = TwoTower(
        _config(
            use_user_id=True,
            item_feature_cardinalities={"genre": 5},
            user_feature_cardinalities={"gender": 3},
        ),
        device="meta",
    )
    weight = model.embedding_collection.embeddings["item_table"].weight
    assert weight.device.type == "meta" and weight.shape == (N + 1, 16)
    cfg = model.embedding_collection.embedding_configs()[0]
    assert cfg.feature_names == ["history", "target", "candidates"]
    bags = {
        c.name: (c.num_embeddings, c.feature_names)
        for c in model.feature_collection.embedding_bag_configs()
    }
    assert bags == {
        "user_id": (U + 1, ["user_id"]),
        "item_genre": (5, ["item_genre"]),
        "user_gender": (3, ["user_gender"]),
    }
    assert (
        model.item_tower.mlp[1].weight.device.type == "cpu"
    )  # dense layers follow the ambient device
    assert TwoTower(_config()).feature_collection is None  # ids only: no bag tables at all
    names = dict(model.named_parameters())
    assert f"{EC_MODULE}.embeddings.item_table.weight" in names
    assert f"{EBC_MODULE}.embedding_bags.item_genre.weight" in names


# --------------------------------------------------------------------------------- one lookup


def test_one_item_table_lookup_per_training_step_and_gradients_reach_its_rows() -> None:
    model = _model(
        use_user_id=True,
        item_feature_cardinalities={"genre": 4},
        user_feature_cardinalities={"gender": 3},
    ).train()
    offsets = np.arange(N + 2).clip(1, N + 1) - 1  # item i has one genre code: i % 4
    model.set_item_features({"genre": (offsets, np.arange(N + 1)[1:] % 4)})
    item_calls, bag_calls = _calls(model.embedding_collection), _calls(model.feature_collection)
    model.sample_negatives = lambda device: torch.tensor([20, 21, 3])  # type: ignore[method-assign]
    batch = _batch(
        [[1, 2, 3], [4, 5], [6]], targets=[7, 8, 9], user_features={"gender": [[1], [2], [1]]}
    )
    loss, stats = model(batch, None, torch.ones(3))
    assert len(item_calls) == 1 and len(bag_calls) == 1
    kjt = item_calls[0]
    assert kjt.keys() == ["history", "target", "candidates"] and kjt.stride() == 3
    jt = kjt.to_dict()
    assert jt["history"].values().tolist() == [1, 2, 3, 4, 5, 6] and jt[
        "target"
    ].values().tolist() == [7, 8, 9]
    assert jt["candidates"].lengths().tolist() == [3, 0, 0] and jt[
        "candidates"
    ].values().tolist() == [20, 21, 3]
    assert int(stats["negatives"]) == 3 + 3
    loss.backward()
    grad = model.embedding_collection.embeddings["item_table"].weight.grad
    looked_up = [1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 21]
    assert (grad[looked_up].abs().sum(-1) > 0).all()
    others = [i for i in range(N + 1) if i not in looked_up]
    assert grad[others].abs().sum() == 0  # padding and untouched rows
    dense = [
        (n, p.grad)
        for n, p in model.named_parameters()
        if not n.startswith((EC_MODULE, EBC_MODULE))
    ]
    assert all(g is not None and torch.isfinite(g).all() for _, g in dense), [
        n for n, g in dense if g is None
    ]

    # Scoring: one lookup each too, the whole catalogue as candidates.
    item_calls.clear(), bag_calls.clear()
    scores = model(batch)
    assert len(item_calls) == 1 and len(bag_calls) == 1
    assert item_calls[0].to_dict()["candidates"].values().tolist() == list(range(1, N + 1))
    assert scores.shape == (3, N + 1)


# --------------------------------------------------------------------------------- pooling


def test_pooling_weights_ignore_padding_and_follow_recency() -> None:
    pool = HistoryPooling("exp_decay", history_len=5, decay=0.5)
    w = pool.weights(torch.tensor([3, 0, 5]), 5)[..., 0]  # (B, H)
    assert (w[0, 3:] == 0).all() and (w[1] == 0).all()
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    # Position j of a length-3 row has age 2 - j: weights ∝ 0.5 ** age, the most recent largest.
    torch.testing.assert_close(w[0, :3], torch.tensor([0.25, 0.5, 1.0]) / 1.75)
    mean = HistoryPooling("mean", 5, 0.5).weights(torch.tensor([4]), 5)[0, :, 0]
    torch.testing.assert_close(mean, torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    learned = HistoryPooling("learned", 5, 0.5, heads=2)
    assert isinstance(
        learned.position_logits, torch.nn.Parameter
    ) and learned.position_logits.shape == (5, 2)
    lw = learned.weights(torch.tensor([3]), 5)[0]
    torch.testing.assert_close(lw[:, 0], w[0])  # head 0 starts as exp_decay
    assert lw[2, 1] < lw[2, 0]  # head 1 looks further back (flatter)


@pytest.mark.parametrize("mode", ["mean", "exp_decay", "learned"])
def test_pooling_ignores_what_sits_at_padding(mode: str) -> None:
    pool = HistoryPooling(mode, history_len=4, decay=0.7, heads=2 if mode == "learned" else 1)
    emb = torch.randn(3, 4, 5)
    lengths = torch.tensor([2, 4, 0])
    garbage = emb.clone()
    garbage[0, 2:] = 1e6
    garbage[2] = float("nan")
    out, out_garbage = pool(emb, lengths), pool(garbage.nan_to_num(1e6), lengths)
    torch.testing.assert_close(out, out_garbage)
    assert (out[2] == 0).all()  # an empty history pools to zero, without NaN


def test_user_vector_does_not_depend_on_other_rows_or_old_history() -> None:
    model = _model(use_user_id=True).eval()
    alone = model.user_vectors(_batch([[4, 5, 6]], users=[3]))
    batched = model.user_vectors(_batch([[1], [4, 5, 6], list(range(1, H + 1))], users=[1, 3, 2]))
    torch.testing.assert_close(batched[1:2], alone)
    # The loader keeps the last H items; the model refuses longer rows rather than truncating.
    with pytest.raises(ValueError, match="history_len"):
        model.user_vectors(_batch([list(range(1, H + 2))]))


# --------------------------------------------------------------------------------- outputs, scoring


def test_towers_are_l2_normalised_and_scores_are_cosines() -> None:
    model = _model(use_user_id=True, pooling_heads=2).eval()
    batch = _batch([[1, 2], [3], []], users=[1, 2, 3])
    users = model.user_vectors(batch)
    items = model.item_vectors(torch.arange(1, N + 1))
    torch.testing.assert_close(users.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(N))
    scores = model.score_all(batch)
    assert torch.isneginf(scores[:, 0]).all()
    torch.testing.assert_close(scores[:, 1:], users @ items.T)
    torch.testing.assert_close(
        model.score_all(batch, catalog=items), scores
    )  # precomputed catalogue
    assert torch.equal(model(batch), scores)  # forward without weight scores
    assert scores[:, 1:].abs().max() <= 1 + 1e-5


def _manual_loss(
    model: TwoTower, batch: KeyedJaggedTensor, targets: list[int], negatives: list[int], logq: bool
) -> torch.Tensor:
    """The sampled softmax written out: each row's candidates are its positive, the *other* items
    among the batch's targets and the negatives (accidental hits left out), logits
    cos / tau - log Q."""
    c = model.config
    users = model.user_vectors(batch)
    b, m = len(targets), len(negatives)
    p = model.log_item_prob.exp()
    losses = []
    for t in range(b):
        cands = (
            [targets[t]]
            + [targets[j] for j in range(b) if targets[j] != targets[t]]
            + [k for k in negatives if k != targets[t]]
        )
        logits = users[t] @ model.item_vectors(torch.tensor(cands)).T / c.temperature
        if logq:
            logits = logits - torch.log(b * p[cands] + m / c.num_items)
        losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("logq", [True, False])
def test_loss_masks_accidental_hits_and_applies_logq(logq: bool) -> None:
    model = _model(logq_correction=logq, num_negatives=4).eval()
    counts = torch.zeros(N + 1)
    counts[1:] = torch.arange(1, N + 1).float() ** 2  # skewed popularity
    model.set_item_frequencies(counts)
    targets, negatives = (
        [5, 5, 9, 12],
        [5, 30, 9, 2],
    )  # duplicate targets; negatives that hit targets
    model.sample_negatives = lambda device: torch.tensor(negatives)  # type: ignore[method-assign]
    batch = _batch([[1, 2], [3], [4, 6, 7], [8]], targets=targets)
    loss, _ = model.training_loss(batch, None, torch.ones(4))
    torch.testing.assert_close(
        loss, _manual_loss(model, batch, targets, negatives, logq), rtol=1e-5, atol=1e-5
    )


def test_logq_correction_is_passed_to_the_shared_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = tt.sampled_softmax
    monkeypatch.setattr(tt, "sampled_softmax", lambda *a, **k: seen.append(k) or real(*a, **k))
    counts = torch.arange(N + 1).float()
    batch = _batch([[1], [2], [3]], targets=[4, 10, 4])
    values = {}
    for logq in (True, False):
        model = _model(logq_correction=logq, num_negatives=2).eval()
        model.set_item_frequencies(counts)
        model.sample_negatives = lambda device: torch.tensor([7, 4])  # type: ignore[method-assign]
        values[logq], _ = model.training_loss(batch, None, torch.ones(3))
    on, off = seen
    p = counts[1:] / counts[1:].sum()
    torch.testing.assert_close(on["log_q_target"], torch.log(3 * p[[3, 9, 3]] + 2 / N))
    torch.testing.assert_close(on["log_q_negative"], torch.log(3 * p[[6, 3]] + 2 / N))
    assert off["log_q_target"] is None and off["log_q_negative"] is None
    assert on["in_batch"] and on["temperature"] == 0.1
    assert not torch.isclose(values[True], values[False])


def test_weight_zero_rows_contribute_only_as_negatives() -> None:
    model = _model(num_negatives=0).eval()
    batch = _batch([[1, 2], [3]], targets=[4, 5])
    zero, _ = model.training_loss(batch, None, torch.zeros(2))
    assert zero.item() == 0.0
    changed = _batch([[1, 2], [20, 21, 22]], targets=[4, 5])  # row 1's history changes, weight 0
    a, _ = model.training_loss(batch, None, torch.tensor([1.0, 0.0]))
    b, _ = model.training_loss(changed, None, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- user id hashing


def test_user_id_hashing_is_deterministic_in_range_and_spread() -> None:
    ids = torch.arange(1, 100_001)
    rows = hash_user_ids(ids, 1000)
    assert rows.min() >= 0 and rows.max() < 1000 and torch.equal(rows, hash_user_ids(ids, 1000))
    load = torch.bincount(rows, minlength=1000)
    assert (load > 0).all() and load.max() < 3 * 100
    huge = torch.tensor([2**62, -5, 0, 10**15])
    assert ((hash_user_ids(huge, 7) >= 0) & (hash_user_ids(huge, 7) < 7)).all()
    with pytest.raises(ValueError):
        hash_user_ids(ids, 0)


def test_hashed_user_ids_reach_the_table_in_range() -> None:
    model = _model(use_user_id=True, user_id_hash_buckets=11, num_users=0).eval()
    assert model.feature_collection.embedding_bag_configs()[0].num_embeddings == 11
    bags = _calls(model.feature_collection)
    users = [10**12, 3, 2**40]  # far beyond any table
    vectors = model.user_vectors(_batch([[1], [2], [3]], users=users))
    sent = bags[0].to_dict()["user_id"]
    assert sent.values().tolist() == hash_user_ids(torch.tensor(users), 11).tolist()
    assert torch.isfinite(vectors).all()


# --------------------------------------------------------------------------------- feature encoding


def _write_raw(tmp: Path) -> dict[str, Path]:
    """Raw interactions plus item and user features, as a user would bring them."""
    rng = np.random.default_rng(0)
    users, items = [f"u{u}" for u in range(1, 9)], list(range(101, 113))
    rows = [(u, int(rng.choice(items)), t) for u in users for t in range(6)]
    pq.write_table(
        pa.table(
            {
                "user_id": [r[0] for r in rows],
                "item_id": [r[1] for r in rows],
                "timestamp": [r[2] for r in rows],
            }
        ),
        tmp / "inter.parquet",
    )
    genres = [["Drama"], ["Comedy", "Romance"], [], ["Action", "Drama", "Thriller"]]
    pq.write_table(
        pa.table(
            {
                "item_id": items,
                "genres": pa.array(
                    [genres[i % 4] for i in range(len(items))], pa.list_(pa.string())
                ),
                "decade": [f"{1950 + 10 * (i % 5)}s" for i in range(len(items))],
                "title": [f"Title {i}" for i in items],
                "price": pa.array([1.0 + i for i in range(len(items))], pa.float32()),
            }
        ),
        tmp / "items.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "user_id": users,
                "gender": ["F", "M"] * 4,
                "occupation": [
                    "artist",
                    "doctor",
                    "engineer",
                    "artist",
                    "writer",
                    "doctor",
                    "none",
                    "artist",
                ],
                "age": pa.array([20.0 + 5 * i for i in range(len(users))], pa.float32()),
            }
        ),
        tmp / "users.parquet",
    )
    return {
        "inter": tmp / "inter.parquet",
        "items": tmp / "items.parquet",
        "users": tmp / "users.parquet",
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recforge.data.prepare import PrepareConfig, prepare

    tmp = tmp_path_factory.mktemp("tt_features")
    raw = _write_raw(tmp)
    prepare(
        PrepareConfig(
            input=[str(raw["inter"])],
            out=str(tmp / "prepared"),
            item_features=str(raw["items"]),
            user_features=str(raw["users"]),
        )
    )
    return tmp


def test_feature_codes_of_known_rows_reach_the_models_kjt(prepared: Path) -> None:
    from recforge.data.datamodule import SequenceDataModule
    from recforge.trainer.two_tower_module import TwoTowerModule

    out = prepared / "prepared"
    dm = SequenceDataModule(str(out), batch_format="history", batch_size=16, history_len=H)
    dm.setup()
    module = TwoTowerModule(
        _config(num_items=0, num_users=0, use_user_id=True, num_negatives=3),
        item_features=["genres", "decade", "price"],
        user_features=None,
    )
    config = module.resolve_config(dm)
    assert config.item_feature_cardinalities == {
        "genres": dm.item_feature_cardinalities["genres"],
        "decade": dm.item_feature_cardinalities["decade"],
    }
    assert config.item_numeric_features == ["price"] and config.user_numeric_features == ["age"]
    assert set(config.user_feature_cardinalities) == {
        "gender",
        "occupation",
    }  # "title" left out above
    model = TwoTower(config).eval()
    TwoTowerModule.set_data_state(model, dm)

    vocabs = json.loads((out / "feature_vocabs.json").read_text())
    item_ids = (
        pq.read_table(out / "items.parquet").column("item_id").to_pylist()
    )  # row i <-> idx i + 1
    user_ids = pq.read_table(out / "users.parquet").column("user_id").to_pylist()
    raw_items = pq.read_table(prepared / "items.parquet").to_pylist()
    raw_items = {r["item_id"]: r for r in raw_items}
    raw_users = {r["user_id"]: r for r in pq.read_table(prepared / "users.parquet").to_pylist()}

    def decode(side: str, name: str, codes: list[int]) -> list[str]:
        return [vocabs[side][name][c - 1] for c in codes]  # code k (>= 1) is vocab entry k - 1

    batch = next(iter(dm.train_dataloader()))
    negatives = [3, 7, 12]
    model.sample_negatives = lambda device: torch.tensor(negatives)  # type: ignore[method-assign]
    bags = _calls(model.feature_collection)
    module._user_dense_columns = [0]
    model.training_loss(batch["features"], module._user_dense(batch), batch["weight"])
    assert len(bags) == 1
    sent = bags[0].to_dict()
    targets = batch["target"].tolist()
    b = len(targets)
    embedded = targets + negatives  # rows 0..B-1 targets, then the negatives
    for key in ("item_genres", "item_decade"):
        assert sent[key].lengths()[len(embedded) :].sum() == 0  # rows past the items are empty
    genres = sent["item_genres"].to_dense()
    decades = sent["item_decade"].to_dense()
    for row, idx in enumerate(embedded):
        raw = raw_items[item_ids[idx - 1]]
        assert decode("item", "genres", genres[row].tolist()) == raw["genres"]
        assert decode("item", "decade", decades[row].tolist()) == [raw["decade"]]
    # The model's per-item codes agree with the loader's own item keys for the targets.
    loader = batch["features"].to_dict()
    assert [t.tolist() for t in loader["item_genres"].to_dense()] == [
        g.tolist() for g in genres[:b]
    ]
    # User rows 0..B-1: the batch's users' codes and (unhashed) ids.
    assert sent["user_id"].values().tolist() == batch["user_idx"].tolist()
    for row, idx in enumerate(batch["user_idx"].tolist()):
        raw = raw_users[user_ids[idx - 1]]
        assert decode("user", "gender", sent["user_gender"].to_dense()[row].tolist()) == [
            raw["gender"]
        ]
        assert decode("user", "occupation", sent["user_occupation"].to_dense()[row].tolist()) == [
            raw["occupation"]
        ]
    # Numeric item features: standardised signed log1p of the raw price, any item id.
    x = torch.log1p(torch.tensor([raw_items[i]["price"] for i in item_ids]))
    expected = (x - x.mean()) / x.std(unbiased=False)
    torch.testing.assert_close(model.item_dense[1:, 0], expected)

    with pytest.raises(ValueError, match="not in the data's item features"):
        TwoTowerModule(_config(num_items=0, num_users=0), item_features=["nope"]).resolve_config(dm)


# --------------------------------------------------------------------------------- learning


def _successor_batch(
    perm: torch.Tensor, g: torch.Generator, b: int
) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """Random histories; the target is the successor ``perm[.]`` of the *last* item only, so a
    model must learn to weight the most recent position."""
    lengths = torch.randint(1, H + 1, (b,), generator=g)
    histories = [torch.randint(1, N + 1, (int(n),), generator=g).tolist() for n in lengths]
    targets = perm[torch.tensor([h[-1] for h in histories])]
    return _batch(histories, targets.tolist()), targets


def test_tiny_model_learns_successors_of_the_last_item() -> None:
    torch.manual_seed(0)
    perm = torch.zeros(N + 1, dtype=torch.long)
    perm[1:] = torch.randperm(N) + 1
    model = _model(
        pooling="learned",
        decay=1.0,
        dim=32,
        out_dim=16,
        num_negatives=8,
        item_tower=TowerConfig([32], 0.0),
        user_tower=TowerConfig([32], 0.0),
    ).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        batch, _ = _successor_batch(perm, g, 64)
        value, _ = model(batch, None, torch.ones(64))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isfinite(last) and last < 0.3 * first, (first, last)
    model.eval()
    batch, targets = _successor_batch(perm, g, 256)
    with torch.no_grad():
        accuracy = (model.score_all(batch).argmax(-1) == targets).float().mean().item()
    assert accuracy > 0.9, accuracy
    # It learned recency: (starting from uniform weights) the last position outweighs the others.
    logits = model.user_tower.pooling.position_logits[:, 0]
    assert logits[0] > logits[1:].max() + 1.0
