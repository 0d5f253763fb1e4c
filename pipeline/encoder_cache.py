"""Incremental user-vector refresh: a bounded cache of each active user's attention keys/values.

A user vector is a pure function of (model version, the history window's item vectors and event
types). When a user's new window starts with the window cached for them (the usual case: one
event appended to a history shorter than max_length), only the new positions are encoded,
attending to the cached ones (`SeqRecModel.extend`); anything else (a full window that slid, a
late event placed mid-history, another model version, a changed item text) is re-encoded in
full. Both paths give the vectors of a full re-encode (tested to 1e-5). No I/O here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.registry import LoadedModel, gather_item_vectors, length_buckets

__all__ = ["EncoderCache", "Refresh"]

_ENTRY_OVERHEAD_BYTES = 400  # dict slot, dataclass, two small arrays' headers


@dataclass(slots=True)
class _Entry:
    version: str
    stamp: int  # catalog.version_counter when built
    rows: np.ndarray  # (P,) int64 catalog rows of the cached window, -1 = unknown item
    types: np.ndarray  # (P,) int64 event types
    kv: torch.Tensor  # (2, NL, H, P, dh) attention keys/values of those P positions
    nbytes: int


@dataclass(frozen=True, slots=True)
class Refresh:
    """What one `encode` call did: user vectors (B, D) and how each was computed."""

    vectors: np.ndarray
    incremental: int
    full: int


class EncoderCache:
    """Per-user keys/values of the cached window, least recently used evicted past `max_bytes`.

    Only windows shorter than the model's max_length are kept: a full window slides on the next
    event, which changes every position, so its keys/values could never be extended.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def discard(self, keys: Sequence[str]) -> None:
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry.nbytes

    def encode(self, loaded: LoadedModel, keys: Sequence[str], rows: Sequence[np.ndarray],
               types: Sequence[np.ndarray], item_vectors: np.ndarray, text_stamps: np.ndarray,
               stamp: int) -> Refresh:
        """User vectors for users `keys` whose windows are `rows`/`types` (oldest first, at most
        max_length each, int64 catalog rows with -1 for unknown items); item_vectors (N, D) of
        the catalog under `loaded`, text_stamps (N,) and stamp from the same catalog. An empty
        window gives a zero vector. Raises ValueError on misaligned inputs."""
        if not len(keys) == len(rows) == len(types):
            raise ValueError(f"{len(keys)} keys, {len(rows)} row lists, {len(types)} type lists")
        d, max_length = loaded.seq_config.hidden_size, loaded.seq_config.max_length
        out = np.zeros((len(keys), d), dtype=np.float32)
        extend: list[int] = []
        full: list[int] = []
        past: dict[int, _Entry] = {}
        for b, key in enumerate(keys):
            if len(rows[b]) != len(types[b]) or len(rows[b]) > max_length:
                raise ValueError(f"window {b}: {len(rows[b])} rows, {len(types[b])} types, "
                                 f"max_length {max_length}")
            if len(rows[b]) == 0:
                continue
            entry = self._entries.get(key) if self.max_bytes else None
            if entry is not None and self._extends(entry, loaded.version, rows[b], types[b],
                                                   text_stamps):
                extend.append(b)
                past[b] = entry
            else:
                full.append(b)
        table = np.asarray(item_vectors, dtype=np.float32).reshape(-1, d)  # (N, D)
        if extend:
            self._run(loaded, extend, [past[b] for b in extend], keys, rows, types, table,
                      stamp, out)
        for length, members in length_buckets([len(rows[b]) for b in full], full, max_length):
            self._run(loaded, members, [None] * len(members), keys, rows, types, table, stamp,
                      out, pad_to=length)
        return Refresh(out, incremental=len(extend), full=len(full))

    @staticmethod
    def _extends(entry: _Entry, version: str, rows: np.ndarray, types: np.ndarray,
                 text_stamps: np.ndarray) -> bool:
        p = len(entry.rows)
        if entry.version != version or p >= len(rows):
            return False
        if not (np.array_equal(rows[:p], entry.rows) and np.array_equal(types[:p], entry.types)):
            return False
        known = entry.rows[(entry.rows >= 0) & (entry.rows < len(text_stamps))]
        return not known.size or int(text_stamps[known].max()) <= entry.stamp

    def _run(self, loaded: LoadedModel, members: list[int], entries: list[_Entry | None],
             keys: Sequence[str], rows: Sequence[np.ndarray], types: Sequence[np.ndarray],
             table: np.ndarray, stamp: int, out: np.ndarray, pad_to: int = 0) -> None:
        """One forward pass over `members`: each user's positions after its cached ones."""
        cfg = loaded.seq_config
        heads, dh, layers = cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.num_layers
        device = next(loaded.model.parameters()).device
        past_len = [len(e.rows) if e is not None else 0 for e in entries]
        new_len = [len(rows[b]) - p for b, p in zip(members, past_len)]
        width_p, width_n = max(past_len), max(max(new_len), pad_to)
        new_rows = np.full((len(members), width_n), -1, dtype=np.int64)  # (B, N)
        new_types = np.zeros((len(members), width_n), dtype=np.int64)  # (B, N)
        past = torch.zeros(2, layers, len(members), heads, width_p, dh)  # (2, NL, B, H, P, dh)
        for j, (b, p, e) in enumerate(zip(members, past_len, entries)):
            new_rows[j, : new_len[j]] = rows[b][p:]
            new_types[j, : new_len[j]] = types[b][p:]
            if e is not None:
                past[:, :, j, :, :p] = e.kv
        vecs = gather_item_vectors(table, new_rows, loaded.unknown_item_vector)  # (B, N, D)
        users, new_kv = loaded.model.extend(
            past.to(device), torch.tensor(past_len, device=device),
            torch.from_numpy(vecs).to(device), torch.from_numpy(new_types).to(device),
            torch.tensor(new_len, device=device))  # (B, D), (2, NL, B, H, N, dh)
        out[members] = users.float().cpu().numpy()
        if not self.max_bytes:
            return
        new_kv = new_kv.float().cpu()
        for j, (b, p, n) in enumerate(zip(members, past_len, new_len)):
            if p + n >= cfg.max_length:
                self.discard([keys[b]])  # a full window slides next time: nothing to extend
                continue
            kv = torch.cat([past[:, :, j, :, :p], new_kv[:, :, j, :, :n]], dim=-2)  # (2, NL, H, P+n, dh)
            self._put(keys[b], _Entry(loaded.version, stamp, np.array(rows[b], dtype=np.int64),
                                      np.array(types[b], dtype=np.int64), kv,
                                      kv.numel() * 4 + 16 * (p + n) + _ENTRY_OVERHEAD_BYTES))

    def _put(self, key: str, entry: _Entry) -> None:
        self.discard([key])
        self._entries[key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
