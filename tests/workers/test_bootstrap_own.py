"""`streamrec bootstrap --items --events` in process: the user's files (one gzip) with a few bad
lines train and publish a model whose item index holds their items, with masked and unmasked
offline figures; an events file with nothing valid stops with an error naming it."""

from __future__ import annotations

import gzip
import time

import orjson
import pytest

from pipeline.datasets import synthetic
from pipeline.registry import ModelRegistry
from workers.cli import main

# Seconds, not minutes: a tiny model, two epochs.
TINY = [
    "--training-epochs",
    "2",
    "--model-hidden-size",
    "16",
    "--model-num-layers",
    "1",
    "--model-num-heads",
    "1",
    "--model-max-length",
    "20",
    "--training-device",
    "cpu",
]


def write_own_files(directory, *, n_users=30, n_items=40, n_events=900, seed=5, gz_events=True):
    """A synthetic catalog and events as the user's JSON Lines files, dated up to now."""
    data = synthetic(
        n_users=n_users,
        n_items=n_items,
        n_events=n_events,
        seed=seed,
        start_ts_ms=int(time.time() * 1000) - 30 * 86_400_000,
    )
    items = directory / "items.jsonl"
    items.write_bytes(b"".join(orjson.dumps(i.to_dict()) + b"\n" for i in data.items))
    events = directory / ("events.jsonl.gz" if gz_events else "events.jsonl")
    lines = [orjson.dumps(e.to_dict()) for e in reversed(data.events)]  # unsorted on purpose
    body = b"\n".join(lines + [b"this is not json", b'{"event_id": "x"}']) + b"\n"
    events.write_bytes(gzip.compress(body) if gz_events else body)
    return data, items, events


def test_bootstrap_from_files_publishes_a_model_of_their_items(tmp_path, capsys):
    data, items, events = write_own_files(tmp_path)
    code = main(
        [
            "bootstrap",
            "--items",
            str(items),
            "--events",
            str(events),
            "--paths-data-dir",
            str(tmp_path / "data"),
            *TINY,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"{len(data.items)} valid items of {len(data.items)} lines" in out
    assert (
        f"{len(data.events)} valid events of {len(data.events) + 2} lines; 2 invalid: "
        f"not_json 1 (lines {len(data.events) + 1}); missing_field 1 "
        f"(lines {len(data.events) + 2})"
    ) in out
    assert "(masked" in out and "(unmasked)" in out and "published v000001" in out
    registry = ModelRegistry(tmp_path / "data" / "models")
    loaded = registry.load()
    assert set(loaded.item_ids) <= {i.item_id for i in data.items}
    assert len(loaded.item_ids) >= 0.9 * len(data.items)
    assert set(loaded.catalog_meta["ids"]) == {i.item_id for i in data.items}
    metrics = loaded.manifest["metrics"]
    for key in ("hr@10", "ndcg@10", "unmasked_hr@10", "unmasked_ndcg@10"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["users"] > 0
    assert loaded.manifest["trained_on_events"] == len(data.events)  # all of it, not 80%


def test_bootstrap_with_no_valid_event_names_the_file(tmp_path, capsys):
    _, items, _ = write_own_files(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    assert (
        main(
            [
                "bootstrap",
                "--items",
                str(items),
                "--events",
                str(empty),
                "--paths-data-dir",
                str(tmp_path / "data"),
                *TINY,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{empty} holds no valid event" in err
    assert ModelRegistry(tmp_path / "data" / "models").current_version() is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--items", "a.jsonl"],
        ["--events", "b.jsonl"],
        ["--items", "a", "--events", "b", "--from-topics"],
    ],
)
def test_bootstrap_refuses_half_or_mixed_sources(tmp_path, capsys, argv):
    assert main(["bootstrap", *argv, "--paths-data-dir", str(tmp_path)]) == 2
    assert "streamrec bootstrap:" in capsys.readouterr().err
