"""Synthetic generator (deterministic, drifting, typed) and the MovieLens-100K loader."""

from __future__ import annotations

import hashlib
import io
import subprocess
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from pipeline.datasets import load_movielens_100k, split_by_time, synthetic
from pipeline.errors import DatasetError
from pipeline.messages import EVENT_TYPES


def test_synthetic_is_deterministic_and_ordered() -> None:
    a = synthetic(50, 100, 3000, seed=3)
    assert a == synthetic(50, 100, 3000, seed=3)
    assert a.events != synthetic(50, 100, 3000, seed=4).events
    assert len(a.events) == 3000 and len(a.items) == 100
    ts = [e.ts for e in a.events]
    assert ts == sorted(ts)
    assert len({e.event_id for e in a.events}) == 3000
    assert {e.type for e in a.events} <= set(EVENT_TYPES) - {"rating"}
    assert len({e.type for e in a.events}) == 4
    items = {it.item_id for it in a.items}
    assert all(e.item_id in items for e in a.events)
    assert all(it.categories[0] in it.text() for it in a.items)  # text names the topic


def _topic_share(dataset, events) -> dict[str, Counter]:  # type: ignore[no-untyped-def]
    topic = {it.item_id: it.categories[0] for it in dataset.items}
    per_user: dict[str, Counter] = {}
    for e in events:
        per_user.setdefault(e.user_id, Counter())[topic[e.item_id]] += 1
    return per_user


def test_synthetic_drifts() -> None:
    ds = synthetic(30, 300, 12000, seed=0, drift_at=0.5)
    before = _topic_share(ds, ds.events[:6000])
    after = _topic_share(ds, ds.events[6000:])
    changed = sum(
        1
        for u in before
        if u in after and before[u].most_common(1)[0][0] != after[u].most_common(1)[0][0]
    )
    assert changed >= 0.6 * len(before)
    still = synthetic(30, 300, 12000, seed=0, drift_at=None)
    b2, a2 = _topic_share(still, still.events[:6000]), _topic_share(still, still.events[6000:])
    same = sum(
        1 for u in b2 if u in a2 and b2[u].most_common(1)[0][0] == a2[u].most_common(1)[0][0]
    )
    assert same >= 0.6 * len(b2)


def test_split_by_time() -> None:
    ds = synthetic(10, 20, 100, seed=0)
    head, tail = split_by_time(ds, 0.8)
    assert len(head.events) == 80 and len(tail.events) == 20
    assert head.events + tail.events == ds.events
    assert head.items == tail.items == ds.items


def test_movielens_100k(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path_factory.mktemp("cache")
    ds = load_movielens_100k(cache)
    assert len(ds.events) == 100_000
    assert len({e.user_id for e in ds.events}) == 943
    assert len(ds.items) == 1682
    assert ds.items[0].title == "Toy Story (1995)"
    assert ds.items[0].categories == ("Animation", "Children's", "Comedy")
    assert all(e.type == "rating" and e.value is not None for e in ds.events[:100])
    assert [e.ts for e in ds.events] == sorted(e.ts for e in ds.events)
    assert ds.events[0].ts % 1000 == 0 and ds.events[0].event_id.startswith("ml100k-")
    # DESIGN.md's leave-one-out check (per-user stable sort by timestamp of file order).
    by_line = sorted(ds.events, key=lambda e: int(e.event_id.split("-")[1]))
    per_user: dict[str, list] = {}
    for e in by_line:
        per_user.setdefault(e.user_id, []).append(e)
    lines = []
    for user in sorted(per_user, key=int):
        seq = sorted(per_user[user], key=lambda e: e.ts)
        lines.append(f"{user}\t{seq[-2].item_id}\t{seq[-1].item_id}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    assert digest == "c6a90f98baeeac14f5274db8818f6c0858f97816d7b8bc20002f695b837c47e9"

    # Second call is served from the cache: pip must not run again.
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran although the dataset was cached")

    monkeypatch.setattr("pipeline.datasets.subprocess.run", no_pip)
    assert len(load_movielens_100k(cache).events) == 100_000
    assert (Path(cache) / "ml-100k" / "ml-100k.inter").is_file()


def _fake_pip(wheel_bytes: bytes):  # type: ignore[no-untyped-def]
    """A `subprocess.run` stand-in that "downloads" `wheel_bytes` as the recbole wheel."""

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        target = Path(cmd[cmd.index("-d") + 1])
        (target / "recbole-1.2.1-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_a_tampered_wheel_is_refused_with_both_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A well-formed wheel holding other data, as a hostile mirror would serve it.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(
            "recbole/dataset_example/ml-100k/ml-100k.inter",
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t1\n",
        )
        wheel.writestr(
            "recbole/dataset_example/ml-100k/ml-100k.item",
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
            "1\tEvil\t1999\tDrama\n",
        )
    tampered = buffer.getvalue()
    monkeypatch.setattr("pipeline.datasets.subprocess.run", _fake_pip(tampered))
    with pytest.raises(DatasetError) as caught:
        load_movielens_100k(tmp_path)
    message = str(caught.value)
    assert hashlib.sha256(tampered).hexdigest() in message
    assert "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407" in message
    assert not (tmp_path / "ml-100k" / "ml-100k.inter").exists()  # nothing of it was cached


def test_a_tampered_cached_file_is_refused_with_both_digests(tmp_path: Path) -> None:
    cached = tmp_path / "ml-100k"
    cached.mkdir()
    (cached / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t1\n"
    )
    (cached / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tA\t1999\tB\n"
    )
    actual = hashlib.sha256((cached / "ml-100k.inter").read_bytes()).hexdigest()
    with pytest.raises(
        DatasetError,
        match=f"ml-100k.inter has SHA-256 {actual}, expected "
        "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    ):
        load_movielens_100k(tmp_path)
