"""The prequential experiment's replay against the real broker and workers: paced round by
round, every replayed event gets a recommendation of its own, so every one can be judged."""

from __future__ import annotations

import shutil

import pytest

from pipeline.messages import Event
from tests.integration.support import NOW_MS, catalog_items, config_for
from workers.lab.experiment import _arm_config, _run_arm

pytestmark = pytest.mark.integration


def test_round_paced_replay_gives_every_event_its_own_recommendation(
    kafka_config, topic_factory, data_dir, tmp_path
):
    shutil.copytree(data_dir / "models", tmp_path / "models")
    config = _arm_config(
        config_for(kafka_config, topic_factory(partitions=2), tmp_path),
        "frozen",
        tmp_path,
        "t",
        every_events=30,
    )
    items = tuple(catalog_items())
    # Bursty like ML-100K: each user's events back to back, which an unpaced replay would fold
    # into one micro-batch (one recommendation for the whole burst).
    events = [
        Event(
            f"x{u}-{n}",
            f"u{u}",
            f"m{(u * 7 + n * 3) % 40}",
            "click",
            NOW_MS - 50_000 + u * 1_000 + n,
        )
        for u in range(6)
        for n in range(12)
    ]
    head, tail = events[:12], events[12:]
    figures, by_trigger = _run_arm(config, "frozen", items, head, tail, chunk=30)
    assert {e.event_id for e in tail} <= set(by_trigger)
    users_in_tail = len({e.user_id for e in tail})
    # Every tail event whose predecessor is in the tail is judged (at least; a head
    # predecessor may have had its own recommendation too).
    assert figures["judged"] >= len(tail) - users_in_tail
    assert figures["replayed_events"] == len(tail) and figures["promotions"] == 0
