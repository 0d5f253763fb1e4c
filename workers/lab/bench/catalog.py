"""`--mode catalog`: top-10 over a million items through the scorer's ANN path vs exact search,
on two catalogs: a realistic one (mixtures of real item texts through the trained item tower)
and a worst case of isotropic random vectors."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.registry import ModelRegistry

__all__ = ["catalog_scale", "realistic_items", "isotropic_items"]

NPROBES = (16, 32, 64, 128, 256, 512, 1024)
TARGET = {"recall@10": 0.95, "ann_users_per_s": 1000.0}  # realistic catalog, single thread
K = 10
_MIX = (3, 5)  # each realistic item mixes this many (inclusive) real text vectors
_MIX_ALPHA = 2.0  # Dirichlet concentration of the mixture weights: no component dominates
_CHUNK_ITEMS = 32_768  # items through the tower per chunk (their text: 48 MiB float32)
_CHUNK_CELLS = 16_000_000  # users x items scored exactly per chunk (64 MiB of float32 scores)


def catalog_scale(
    config: Config,
    n_items: int = 1_000_000,
    n_users: int = 2000,
    exact_users: int = 1000,
    nprobes: Sequence[int] = NPROBES,
) -> dict[str, Any]:
    """Top-10 over `n_items` through the scorer's ANN path (pipeline.ann, IVF-flat) vs exact
    search, on two catalogs: "realistic" (`realistic_items`: cold items whose text mixes real
    item texts) and "isotropic" (`isotropic_items`: the worst case for an IVF index, no
    structure at all). Users, the trained encoder over random histories of real items, and
    their exclusions are the same for both. Per catalog: recall@10 against exact top-10 over
    the first `exact_users` users, ANN and exact users/s, index build seconds, nlist, and the
    curve of recall and users/s over `nprobes` (plus config.scorer.ann_nprobe, the default the
    headline figures use) on the one index. faiss runs single-threaded, as in the scorer."""
    import faiss

    from pipeline.ann import Exclusions
    from pipeline.encoder_cache import encode_users, item_vectors

    faiss.omp_set_num_threads(1)
    loaded = ModelRegistry(config.paths.models).load()
    catalog = loaded.catalog()
    rng = np.random.default_rng(0)
    exact_users = min(exact_users, n_users)
    histories = [
        rng.integers(0, len(catalog), rng.integers(1, 50)).tolist() for _ in range(n_users)
    ]
    users = encode_users(
        loaded, histories, [[1] * len(h) for h in histories], item_vectors(loaded, catalog)
    )
    available = np.ones(n_items, dtype=bool)
    available[rng.integers(0, n_items, n_items // 100)] = False
    excluded = [rng.integers(0, n_items, 20) for _ in range(n_users)]
    exclusions = Exclusions(available, excluded)

    def measure(items: np.ndarray) -> dict[str, Any]:
        people = (users, exclusions, excluded, available, exact_users)
        return _measure(items, *people, nprobes, config.scorer.ann_nprobe)

    items, spread = realistic_items(loaded, catalog.text_vectors, n_items, rng)
    realistic = measure(items)
    realistic["spread"] = {**spread, **_item_spread(items, rng)}
    realistic["target"] = {
        **TARGET,
        "met_at_default_nprobe": realistic["recall@10"] >= TARGET["recall@10"]
        and realistic["ann_users_per_s"] >= TARGET["ann_users_per_s"],
        "smallest_nprobe_meeting_it": next(
            (
                p["nprobe"]
                for p in realistic["nprobe_curve"]
                if p["recall@10"] >= TARGET["recall@10"]
                and p["ann_users_per_s"] >= TARGET["ann_users_per_s"]
            ),
            None,
        ),
    }
    mean_norm = float(np.linalg.norm(items, axis=1).mean())
    del items
    items = isotropic_items(n_items, users.shape[1], mean_norm, rng)
    isotropic = measure(items)
    isotropic["spread"] = _item_spread(items, rng)
    return {"realistic": realistic, "isotropic": isotropic}


def realistic_items(
    loaded: Any, origins: np.ndarray, n_items: int, rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, Any]]:
    """(n_items, D) float32 item vectors: each item's text vector a random mixture of 3 to 5
    real text vectors (`origins`, (T_n, T)) with Dirichlet(2) weights, normalised, through the
    item tower with id 0 (a cold item), in chunks. Also how far the mixed texts sit from the
    texts they came from: the cosine of a sample of them to their nearest origin (mean, p95,
    share above 0.95: near-copies), beside the origins' own nearest-neighbour cosine."""
    import torch

    origins = np.asarray(origins, dtype=np.float32)
    n_origins = len(origins)
    width = loaded.seq_config.hidden_size
    out = np.empty((n_items, width), dtype=np.float32)
    sample: np.ndarray | None = None
    for start in range(0, n_items, _CHUNK_ITEMS):
        size = min(_CHUNK_ITEMS, n_items - start)
        parts = rng.integers(_MIX[0], _MIX[1] + 1, size)  # (c,)
        picks = rng.integers(0, n_origins, (size, _MIX[1]))  # (c, M)
        weights = rng.gamma(_MIX_ALPHA, size=(size, _MIX[1])) * (
            np.arange(_MIX[1]) < parts[:, None]
        )  # (c, M): Dirichlet over the first `parts` columns once normalised
        weights /= weights.sum(axis=1, keepdims=True)
        text = np.zeros((size, origins.shape[1]), dtype=np.float32)  # (c, T)
        for j in range(_MIX[1]):
            text += weights[:, j, None].astype(np.float32) * origins[picks[:, j]]
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        if sample is None:
            sample = text[:2000].copy()
        with torch.no_grad():
            out[start : start + size] = (
                loaded.model.item_vectors(
                    torch.zeros(size, dtype=torch.long), torch.from_numpy(text)
                )
                .float()
                .numpy()
            )
    assert sample is not None
    nearest = (sample @ origins.T).max(axis=1)  # (S,)
    among = origins[: min(n_origins, 2000)] @ origins.T  # (S', T_n)
    np.fill_diagonal(among, -np.inf)
    spread = {
        "text_mix": f"{_MIX[0]}-{_MIX[1]} real text vectors, Dirichlet({_MIX_ALPHA}) weights",
        "text_nearest_origin_cosine_mean": round(float(nearest.mean()), 4),
        "text_nearest_origin_cosine_p95": round(float(np.percentile(nearest, 95)), 4),
        "text_share_above_0.95_to_nearest_origin": round(float((nearest > 0.95).mean()), 4),
        "text_origins_nearest_other_origin_cosine_mean": round(
            float(among.max(axis=1).mean()) if n_origins > 1 else 1.0, 4
        ),
    }
    return out, spread


def isotropic_items(n_items: int, width: int, norm: float, rng: np.random.Generator) -> np.ndarray:
    """(n_items, width) float32 Gaussian directions, each of length `norm` (the realistic
    catalog's mean norm, so scores sit on the same scale)."""
    out = np.empty((n_items, width), dtype=np.float32)
    for start in range(0, n_items, _CHUNK_ITEMS * 4):
        chunk = rng.standard_normal((min(_CHUNK_ITEMS * 4, n_items - start), width))
        chunk *= norm / np.linalg.norm(chunk, axis=1, keepdims=True)
        out[start : start + len(chunk)] = chunk
    return out


def _item_spread(items: np.ndarray, rng: np.random.Generator, n: int = 500) -> dict[str, Any]:
    """Mean cosine of `n` random items to their nearest other item in the whole catalog: near
    1 for a catalog of near-duplicate clusters."""
    queries = rng.choice(len(items), size=min(n, len(items)), replace=False)  # (Q,)
    q = items[queries] / np.linalg.norm(items[queries], axis=1, keepdims=True)  # (Q, D)
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    step = max(1, _CHUNK_CELLS // (4 * len(queries)))
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        cos = q @ (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)).T  # (Q, c)
        own = (queries >= start) & (queries < start + len(chunk))
        cos[np.flatnonzero(own), queries[own] - start] = -np.inf
        np.maximum(best, cos.max(axis=1), out=best)
    return {"item_nearest_neighbour_cosine_mean": round(float(best.mean()), 4)}


def _measure(
    items: np.ndarray,
    users: np.ndarray,
    exclusions: Any,
    excluded: list[np.ndarray],
    available: np.ndarray,
    exact_users: int,
    probes: Sequence[int],
    default_nprobe: int,
) -> dict[str, Any]:
    """One catalog: the index built once, exact top-10 for the first `exact_users` users in
    chunks of bounded memory, then the ANN path at each nprobe (and the default one, which
    gives the headline figures), each clipped to nlist."""
    from pipeline.ann import AnnIndex, ann_top_k
    from pipeline.scoring import exclusion_mask, top_k

    n_items, n_users = len(items), len(users)
    started = time.perf_counter()
    index = AnnIndex(items, nprobe=default_nprobe)
    build_s = time.perf_counter() - started
    nlist = int(index._index.nlist)
    chunk = max(1, _CHUNK_CELLS // n_items)
    started = time.perf_counter()
    exact = np.concatenate(
        [np.empty((0, K), dtype=np.int64)]
        + [
            top_k(
                users[i : i + chunk],
                items,
                exclusion_mask(
                    len(users[i : i + chunk]), n_items, excluded[i : i + chunk], available
                ),
                K,
            )[0]
            for i in range(0, exact_users, chunk)
        ]
    )[:exact_users]
    exact_s = time.perf_counter() - started
    curve = []
    for nprobe in sorted({min(p, nlist) for p in (*probes, default_nprobe)}):
        index._index.nprobe = nprobe
        started = time.perf_counter()
        rows, _, _ = ann_top_k(index, users, items, exclusions, K)
        took = time.perf_counter() - started
        curve.append(
            {
                "nprobe": int(index._index.nprobe),
                "recall@10": round(_recall(rows[:exact_users], exact), 4),
                "ann_users_per_s": round(n_users / took, 1),
            }
        )
    index._index.nprobe = min(default_nprobe, nlist)
    headline = next(p for p in curve if p["nprobe"] == min(default_nprobe, nlist))
    return {
        "items": n_items,
        "users": n_users,
        "exact_users": exact_users,
        "index": "faiss IVF-flat (pipeline.ann.AnnIndex), single thread",
        "nlist": nlist,
        "nprobe": headline["nprobe"],
        "build_seconds": round(build_s, 1),
        "recall@10": headline["recall@10"],
        "ann_users_per_s": headline["ann_users_per_s"],
        "exact_users_per_s": round(exact_users / exact_s, 1) if exact_s > 0 else None,
        "nprobe_curve": curve,
        "item_vectors_bytes_per_item": int(items.nbytes / n_items),
    }


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over users of |approx ∩ exact| / |exact|, invalid (-1) rows left out."""
    shares = []
    for a, b in zip(approx.tolist(), exact.tolist(), strict=True):
        truth = {r for r in b if r >= 0}
        shares.append(len(truth & set(a)) / len(truth) if truth else 1.0)
    return float(np.mean(shares)) if shares else 0.0
