"""A handler with every loop hook a no-op, for loop tests that only care about `handle`."""

from __future__ import annotations

from pipeline.loop import TP, Handler, Output


class NoopHandler(Handler):
    worker = "updater"

    def kind_of(self, topic: str) -> str:
        return "event"

    def handle(self, batch, now_ms) -> list[Output]:  # type: ignore[no-untyped-def]
        return []

    def apply_table(self, batch, now_ms) -> list[Output]:  # type: ignore[no-untyped-def]
        return []

    def on_assign(self, partitions: list[TP]) -> dict[TP, int]:
        return {}

    def on_revoke(self, partitions: list[TP]) -> None:
        return None

    def checkpoint(self, offsets: dict[TP, int]) -> set[TP]:
        return set(offsets)

    def on_reset(self, tp: TP) -> None:
        return None
