"""`--mode catalog`: top-10 over a million items through the scorer's ANN path vs exact search."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.registry import ModelRegistry

__all__ = ["catalog_scale"]


def catalog_scale(
    config: Config, n_items: int = 1_000_000, n_users: int = 2000, exact_users: int = 200
) -> dict[str, Any]:
    """Top-10 over `n_items` through the scorer's ANN path vs exact search: recall@10, users/s,
    build time. Items: the trained item tower applied to perturbed real text vectors (no id,
    i.e. cold items); users: the trained encoder over random histories of real items."""
    import faiss
    import torch

    from pipeline.ann import AnnIndex, Exclusions, ann_top_k
    from pipeline.encoder_cache import encode_users, item_vectors
    from pipeline.scoring import exclusion_mask, top_k

    faiss.omp_set_num_threads(1)
    loaded = ModelRegistry(config.paths.models).load()
    catalog = loaded.catalog()
    rng = np.random.default_rng(0)
    text = catalog.text_vectors[rng.integers(0, len(catalog), n_items)]
    text = text + 0.3 * rng.standard_normal(text.shape).astype(np.float32) / np.sqrt(text.shape[1])
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    with torch.no_grad():
        items = np.concatenate(
            [
                loaded.model.item_vectors(
                    torch.zeros(len(chunk), dtype=torch.long), torch.from_numpy(chunk)
                ).numpy()
                for chunk in np.array_split(text, max(1, n_items // 65_536))
            ]
        )
    histories = [
        rng.integers(0, len(catalog), rng.integers(1, 50)).tolist() for _ in range(n_users)
    ]
    users = encode_users(
        loaded, histories, [[1] * len(h) for h in histories], item_vectors(loaded, catalog)
    )
    available = np.ones(n_items, dtype=bool)
    available[rng.integers(0, n_items, n_items // 100)] = False
    excluded = [rng.integers(0, n_items, 20) for _ in range(n_users)]
    started = time.perf_counter()
    index = AnnIndex(items, nprobe=config.scorer.ann_nprobe)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    rows, _, _ = ann_top_k(index, users, items, Exclusions(available, excluded), 10)
    ann_users_per_s = n_users / (time.perf_counter() - started)
    started = time.perf_counter()
    exact = np.concatenate(
        [
            top_k(
                users[i : i + 20],
                items,
                exclusion_mask(20, n_items, excluded[i : i + 20], available),
                10,
            )[0]
            for i in range(0, exact_users, 20)
        ]
    )
    exact_users_per_s = exact_users / (time.perf_counter() - started)
    recall = float(
        np.mean(
            [len(set(a) & set(b)) / 10 for a, b in zip(rows[:exact_users].tolist(), exact.tolist())]
        )
    )
    return {
        "items": n_items,
        "users": n_users,
        "index": f"faiss IVF-flat, nprobe {config.scorer.ann_nprobe}",
        "build_seconds": round(build_s, 1),
        "ann_users_per_s": round(ann_users_per_s, 1),
        "exact_users_per_s": round(exact_users_per_s, 1),
        "recall@10": round(recall, 4),
        "item_vectors_bytes_per_item": int(items.nbytes / n_items),
    }
