"""User and item vectors from a loaded model version: full encodes, and an incremental refresh
with a bounded cache of each active user's attention keys/values.

A user vector is a pure function of (model version, the history window's item vectors and event
types). When a user's new window starts with the window cached for them (the usual case: an
event appended to a window shorter than max_length), only the new positions are encoded,
attending to the cached ones (`SeqRecModel.extend`); anything else (a full window that slid, a
late event placed mid-history, another model version, a changed item text) is re-encoded in
full. Both paths give the vectors of a full re-encode (tested to 1e-5). The keys/values live in
one preallocated slab with a slot per cached user, so a micro-batch gathers and stores them with
one tensor operation each rather than one per user. No I/O here.

Size: the cache must give exactly the vectors of a full encode, so the full encodes
it falls back on live beside it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.items import Catalog
from pipeline.registry import LoadedModel

__all__ = [
    "EncoderCache",
    "Refresh",
    "item_vectors",
    "encode_users",
    "gather_item_vectors",
    "length_buckets",
]


# Below this many users, a micro-batch's incremental and full encodes share one forward pass.
_ONE_PASS_BELOW = 32


@dataclass(slots=True)
class _Entry:
    slot: int  # row of the slab holding this user's keys/values
    version: str
    stamp: int  # catalog.version_counter when built
    rows: np.ndarray  # (P,) int64 catalog rows of the cached window, -1 = unknown item
    prefix: bytes  # rows and types of the cached window, for a cheap prefix comparison


@dataclass(frozen=True, slots=True)
class Refresh:
    """What one `encode` call did: user vectors (B, D) and how each was computed."""

    vectors: np.ndarray
    incremental: int
    full: int


@dataclass(frozen=True, slots=True)
class _Windows:
    """One `encode` call's users: their keys and history windows, read by every pass."""

    keys: Sequence[str]
    rows: Sequence[np.ndarray]  # per user, (L,) int64 catalog rows, -1 = unknown item
    types: Sequence[np.ndarray]  # per user, (L,) int64 event types


def _prefix(rows: np.ndarray, types: np.ndarray) -> bytes:
    return (
        rows.astype(np.int64, copy=False).tobytes() + types.astype(np.int64, copy=False).tobytes()
    )


class EncoderCache:
    """Per-user keys/values of the cached window, least recently used evicted when the slab is
    full. The slab holds max_bytes // (bytes of one max_length window) slots and is allocated
    (lazily touched by the OS) on first use for the model's shape.

    Only windows shorter than the model's max_length are kept: a full window slides on the next
    event, which changes every position, so its keys/values could never be extended.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self._slab: torch.Tensor | None = None  # (S, 2, NL, H, L, dh)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._free: list[int] = []
        self._zeroed: set[int] = set()  # slots written at least once (finite values only)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use (the slab itself is reserved up to max_bytes)."""
        if self._slab is None:
            return 0
        return len(self._entries) * self._slab[0].numel() * self._slab.element_size()

    def discard(self, keys: Sequence[str]) -> None:
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._free.append(entry.slot)

    def encode(
        self,
        loaded: LoadedModel,
        keys: Sequence[str],
        rows: Sequence[np.ndarray],
        types: Sequence[np.ndarray],
        item_vectors: np.ndarray,
        text_stamps: np.ndarray,
        stamp: int,
    ) -> Refresh:
        """User vectors for users `keys` whose windows are `rows`/`types` (oldest first, at most
        max_length each, int64 catalog rows with -1 for unknown items); item_vectors (N, D) of
        the catalog under `loaded`, text_stamps (N,) and stamp from the same catalog. An empty
        window gives a zero vector. Raises ValueError on misaligned inputs."""
        if not len(keys) == len(rows) == len(types):
            raise ValueError(f"{len(keys)} keys, {len(rows)} row lists, {len(types)} type lists")
        d, max_length = loaded.seq_config.hidden_size, loaded.seq_config.max_length
        out = np.zeros((len(keys), d), dtype=np.float32)
        self._ensure_slab(loaded)
        extend: list[int] = []
        full: list[int] = []
        for b, key in enumerate(keys):
            if len(rows[b]) != len(types[b]) or len(rows[b]) > max_length:
                raise ValueError(
                    f"window {b}: {len(rows[b])} rows, {len(types[b])} types, "
                    f"max_length {max_length}"
                )
            if len(rows[b]) == 0:
                continue
            entry = self._entries.get(key)
            if entry is not None and self._extends(
                entry, loaded.version, rows[b], types[b], text_stamps, stamp
            ):
                extend.append(b)
            else:
                full.append(b)
        table = np.asarray(item_vectors, dtype=np.float32).reshape(-1, d)  # (N, D)
        windows = _Windows(keys, rows, types)
        if extend and full and len(extend) + len(full) < _ONE_PASS_BELOW:
            # A small micro-batch (the low-rate case, where latency matters most) is one forward
            # pass: each pass costs ~1 ms of module overhead, more than the padding it saves.
            members = extend + full
            past = [len(self._entries[keys[b]].rows) for b in extend] + [0] * len(full)
            self._run(loaded, members, past, windows, table, stamp, out)
            return Refresh(out, incremental=len(extend), full=len(full))
        if extend:
            self._run(
                loaded,
                extend,
                [len(self._entries[keys[b]].rows) for b in extend],
                windows,
                table,
                stamp,
                out,
            )
        for length, members in length_buckets([len(rows[b]) for b in full], full, max_length):
            self._run(
                loaded,
                members,
                [0] * len(members),
                windows,
                table,
                stamp,
                out,
                pad_to=length,
            )
        return Refresh(out, incremental=len(extend), full=len(full))

    def _ensure_slab(self, loaded: LoadedModel) -> None:
        cfg = loaded.seq_config
        shape = (2, cfg.num_layers, cfg.num_heads, cfg.max_length, cfg.hidden_size // cfg.num_heads)
        if self._slab is not None and tuple(self._slab.shape[1:]) == shape:
            return
        slots = self.max_bytes // (int(np.prod(shape)) * 4)
        # Not zeroed here (that would commit every page at once): a slot is zeroed when first
        # handed out, so masked positions never hold NaN, which a zero attention weight would
        # still turn into NaN.
        self._slab = torch.empty((slots, *shape), dtype=torch.float32)
        self._entries.clear()
        self._free = list(range(slots - 1, -1, -1))
        self._zeroed = set()

    @staticmethod
    def _extends(
        entry: _Entry,
        version: str,
        rows: np.ndarray,
        types: np.ndarray,
        text_stamps: np.ndarray,
        stamp: int,
    ) -> bool:
        p = len(entry.rows)
        if (
            entry.version != version
            or p >= len(rows)
            or _prefix(rows[:p], types[:p]) != entry.prefix
        ):
            return False
        if entry.stamp == stamp:
            return True  # the catalog has not changed since the entry was built
        known = entry.rows[(entry.rows >= 0) & (entry.rows < len(text_stamps))]
        return not known.size or int(text_stamps[known].max()) <= entry.stamp

    def _run(
        self,
        loaded: LoadedModel,
        members: list[int],
        past_len: list[int],
        windows: _Windows,
        table: np.ndarray,
        stamp: int,
        out: np.ndarray,
        pad_to: int = 0,
    ) -> None:
        """One forward pass over `members`: each user's positions after its cached ones."""
        assert self._slab is not None
        keys, rows, types = windows.keys, windows.rows, windows.types
        cfg = loaded.seq_config
        device = next(loaded.model.parameters()).device
        new_len = [len(rows[b]) - p for b, p in zip(members, past_len)]
        width_p, width_n = max(past_len), max(max(new_len), pad_to)
        new_rows = np.full((len(members), width_n), -1, dtype=np.int64)  # (B, N)
        new_types = np.zeros((len(members), width_n), dtype=np.int64)  # (B, N)
        for j, (b, p) in enumerate(zip(members, past_len)):
            new_rows[j, : new_len[j]] = rows[b][p:]
            new_types[j, : new_len[j]] = types[b][p:]
        past_lengths = torch.tensor(past_len)  # (B,)
        if width_p:
            # a member encoded in full (no past) reads slot 0, masked out like any padding
            slots = torch.tensor(
                [self._entries[keys[b]].slot if p else 0 for b, p in zip(members, past_len)]
            )  # (B,)
            # Positions past a user's own length hold zeros or an earlier user's finite values;
            # extend masks them out, so they are never read.
            past = self._slab[slots, :, :, :, :width_p].permute(
                1, 2, 0, 3, 4, 5
            )  # (2, NL, B, H, P, dh)
        else:
            past = torch.zeros(
                2, cfg.num_layers, len(members), cfg.num_heads, 0, cfg.hidden_size // cfg.num_heads
            )
        vecs = gather_item_vectors(table, new_rows, loaded.unknown_item_vector)  # (B, N, D)
        users, new_kv = loaded.model.extend(
            past.to(device),
            past_lengths.to(device),
            torch.from_numpy(vecs).to(device),
            torch.from_numpy(new_types).to(device),
            torch.tensor(new_len, device=device),
        )
        out[members] = users.float().cpu().numpy()  # (B, D)
        if len(self._slab):
            self._store(
                loaded.version,
                stamp,
                members,
                past_len,
                new_len,
                windows,
                new_kv.float().cpu(),
                cfg.max_length,
            )

    def _store(
        self,
        version: str,
        stamp: int,
        members: list[int],
        past_len: list[int],
        new_len: list[int],
        windows: _Windows,
        new_kv: torch.Tensor,
        max_length: int,
    ) -> None:
        """Write the new positions' keys/values (2, NL, B, H, N, dh) into the users' slots."""
        assert self._slab is not None
        keys, rows, types = windows.keys, windows.rows, windows.types
        which: list[int] = []  # member index j of every stored position
        slot_of: list[int] = []
        taken: set[int] = set()
        stored: list[tuple[str, _Entry]] = []
        position: list[int] = []
        step: list[int] = []
        for j, (b, p, n) in enumerate(zip(members, past_len, new_len)):
            key = keys[b]
            if p + n >= max_length:
                self.discard([key])  # a full window slides next time: nothing to extend
                continue
            entry = self._entries.pop(key, None)
            slot = entry.slot if entry is not None else self._take_slot(taken)
            if slot is None:
                continue  # more users in this batch than slots: the rest go uncached
            taken.add(slot)
            stored.append(
                (
                    key,
                    _Entry(
                        slot,
                        version,
                        stamp,
                        np.array(rows[b], dtype=np.int64),
                        _prefix(rows[b], types[b]),
                    ),
                )
            )
            which += [j] * n
            slot_of += [slot] * n
            position += range(p, p + n)
            step += range(n)
        if which:
            values = new_kv.permute(2, 4, 0, 1, 3, 5)[which, step]  # (K, 2, NL, H, dh)
            self._slab[slot_of, :, :, :, position] = values
        # Registered only once their slots hold the values (a failed write leaves them uncached).
        self._entries.update(stored)

    def _take_slot(self, taken_now: set[int]) -> int | None:
        """A free slot, else the least recently used user's; never one written in this batch."""
        assert self._slab is not None
        if self._free:
            slot = self._free.pop()
            if slot not in self._zeroed:
                self._slab[slot].zero_()
                self._zeroed.add(slot)
            return slot
        if not self._entries:
            return None
        key, old = next(iter(self._entries.items()))
        if old.slot in taken_now:
            return None
        del self._entries[key]
        return old.slot


# -- full encodes: what the cache falls back on, and what serving workers call for a catalog ----


@torch.no_grad()
def item_vectors(loaded: LoadedModel, catalog: Catalog, batch_size: int = 8192) -> np.ndarray:
    """Representations of every catalog row under `loaded` → (N, D) float32; rows whose id the
    model never trained on use id row 0 plus their text (cold start)."""
    device = next(loaded.model.parameters()).device
    ids = torch.tensor([loaded.item_index.get(i, 0) for i in catalog.ids], dtype=torch.long)
    text = torch.from_numpy(np.ascontiguousarray(catalog.text_vectors))  # (N, T)
    out = np.zeros((len(catalog), loaded.seq_config.hidden_size), dtype=np.float32)
    for start in range(0, len(catalog), batch_size):
        stop = start + batch_size
        vecs = loaded.model.item_vectors(
            ids[start:stop].to(device), text[start:stop].to(device)
        )  # (b, D)
        out[start:stop] = vecs.float().cpu().numpy()
    return out


@torch.no_grad()
def encode_users(
    loaded: LoadedModel,
    item_rows: Sequence[Sequence[int]],
    types: Sequence[Sequence[int]],
    catalog_item_vectors: np.ndarray,
) -> np.ndarray:
    """User vectors for a micro-batch under `loaded` → (B, D) float32.

    item_rows: per user, catalog rows oldest first (-1 = not in the catalog); types: event
    type indices (EVENT_TYPES order) aligned with them; catalog_item_vectors (N, D) from
    `item_vectors`. Only the most recent max_length events count; an empty history gives 0s.
    """
    if len(item_rows) != len(types):
        raise ValueError(f"{len(item_rows)} histories but {len(types)} type lists")
    d, max_length = loaded.seq_config.hidden_size, loaded.seq_config.max_length
    out = np.zeros((len(item_rows), d), dtype=np.float32)
    keep = [b for b, rows in enumerate(item_rows) if len(rows) > 0]
    if not keep:
        return out
    table = np.asarray(catalog_item_vectors, dtype=np.float32).reshape(-1, d)  # (N, D)
    device = next(loaded.model.parameters()).device
    # Bucket users by history length (powers of two) so a few long histories do not pad
    # every short one to max_length: compute follows the sum of lengths, not B x max.
    for length, members in length_buckets(
        [min(max_length, len(item_rows[b])) for b in keep], keep, max_length
    ):
        rows = np.full((len(members), length), -1, dtype=np.int64)  # (b, L)
        kinds = np.zeros((len(members), length), dtype=np.int64)  # (b, L)
        lengths = np.zeros(len(members), dtype=np.int64)  # (b,)
        for j, b in enumerate(members):
            r = np.asarray(item_rows[b], dtype=np.int64)[-max_length:]
            t = np.asarray(types[b], dtype=np.int64)[-max_length:]
            if len(r) != len(t):
                raise ValueError(f"history {b}: {len(r)} items but {len(t)} types")
            rows[j, : len(r)], kinds[j, : len(t)], lengths[j] = r, t, len(r)
        vecs = gather_item_vectors(table, rows, loaded.unknown_item_vector)  # (b, L, D)
        users = loaded.model.encode(
            torch.from_numpy(vecs).to(device),
            torch.from_numpy(kinds).to(device),
            torch.from_numpy(lengths).to(device),
        )  # (b, D)
        out[members] = users.float().cpu().numpy()
    return out


def gather_item_vectors(table: np.ndarray, rows: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """Input vectors of padded histories: table (N, D), rows (B, L) int64 → (B, L, D) float32.

    Rows outside the table (-1 = not in the catalog, and padding) get the unknown-item vector;
    causal attention never lets a real position read the padding after it.
    """
    known = (rows >= 0) & (rows < len(table))  # (B, L)
    if len(table):
        vecs = table[np.where(known, rows, 0)]  # (B, L, D)
    else:
        vecs = np.zeros(rows.shape + (unknown.shape[-1],), dtype=np.float32)  # (B, L, D)
    vecs[~known] = unknown
    return vecs


def length_buckets(
    lengths: Sequence[int], members: Sequence[int], max_length: int, min_bucket: int = 32
) -> list[tuple[int, list[int]]]:
    """Group users into (padded length, members): power-of-two lengths, but a bucket smaller
    than `min_bucket` users joins the next longer one, because every forward pass has a fixed
    cost (~1-2 ms of module overhead) that small micro-batches would pay per bucket."""
    by_power: dict[int, list[int]] = {}
    for n, b in zip(lengths, members):
        by_power.setdefault(min(max_length, 1 << (n - 1).bit_length()), []).append(b)
    out: list[tuple[int, list[int]]] = []
    pending: list[int] = []
    for length in sorted(by_power):
        pending += by_power[length]
        if len(pending) >= min_bucket:
            out.append((length, pending))
            pending = []
    if pending:
        out.append((max(by_power), pending))
    return out
