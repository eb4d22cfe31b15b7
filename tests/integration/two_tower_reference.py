"""The two-tower user tower written out in numpy from a checkpoint's weights, for an unknown user
(id 0, no numeric features): the independent hand computation the served explanations are
checked against (models/towers.py is the definition this follows)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class NumpyUserTower:
    def __init__(self, network: Any, missing_codes: dict[str, list[int]]) -> None:
        import torch

        c = network.config
        assert not c.user_numeric_features, "the reference covers models without numeric inputs"
        self.items = network.embedding_collection.embeddings[c.table_name].weight.detach().numpy()
        tower = network.user_tower
        self.logits = tower.pooling.position_logits.detach().numpy()  # (H, heads)
        self.linears = [
            (m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy())
            for m in tower.mlp
            if isinstance(m, torch.nn.Linear)
        ]
        bags = network.feature_collection.embedding_bags
        parts = []
        if c.use_user_id:  # user index 0 (unknown): its id embedding is zeroed
            parts.append(np.zeros(bags["user_id"].weight.shape[1]))
        for key in c.user_feature_keys:  # mean of the "missing" codes' rows (zero if none)
            table = bags[key].weight.detach().numpy()
            codes = missing_codes[key]
            parts.append(table[codes].mean(0) if codes else np.zeros(table.shape[1]))
        self.rest = np.concatenate(parts) if parts else np.zeros(0)

    def __call__(self, history: list[int]) -> np.ndarray:
        """Unit user vector of a history of item indexes (oldest first)."""
        n = len(history)
        heads = self.logits.shape[1]
        pooled = np.zeros((heads, self.items.shape[1]))
        if n:
            ages = np.arange(n)[::-1]  # position j has age n - 1 - j
            logits = self.logits[np.minimum(ages, len(self.logits) - 1)]  # (n, heads)
            w = np.exp(logits - logits.max(0))
            w /= w.sum(0)
            pooled = w.T @ self.items[history].astype(np.float64)  # (heads, D)
        x = np.concatenate([pooled.reshape(-1), self.rest])
        for i, (weight, bias) in enumerate(self.linears):
            x = weight @ x + bias
            if i < len(self.linears) - 1:  # exact (erf) GELU, torch's default
                x = 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
        return x / np.linalg.norm(x)
