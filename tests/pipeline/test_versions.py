"""The token bucket that throttles background work on the serving path."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.versions import RateBudget, RescoreQueue


def test_starts_full_then_refills_at_the_rate_up_to_the_burst():
    budget = RateBudget(per_s=10.0, burst=5)
    assert budget.take(100.0, 3) == 3
    assert budget.take(100.0, 9) == 2
    assert budget.take(100.0, 9) == 0
    assert budget.take(100.25, 9) == 2  # 2.5 tokens: whole units only, the half is kept
    assert budget.take(100.5, 9) == 3  # the kept half, and 2.5 more
    assert budget.take(1000.0, 9) == 5  # idle for long: never more than the burst


def test_a_clock_stepped_back_neither_refills_nor_starves():
    budget = RateBudget(per_s=10.0, burst=5)
    assert budget.take(100.0, 5) == 5
    assert budget.take(50.0, 5) == 0  # stepped back 50 s: no refill ...
    assert budget.take(50.5, 9) == 5  # ... and no 50 s of debt either


@given(
    st.floats(0.1, 1000.0),
    st.integers(1, 500),
    st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 1000)), max_size=50),
)
def test_never_grants_more_than_the_burst_plus_the_rate(per_s, burst, steps):
    budget, now, granted = RateBudget(per_s, burst), 0.0, 0
    for gap, wanted in steps:
        now += gap
        got = budget.take(now, wanted)
        assert 0 <= got <= min(wanted, burst)
        granted += got
    assert granted <= burst + per_s * now + 1e-6


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "take", "discard", "drop"]),
            st.integers(0, 12),
            st.integers(0, 2),
        ),
        max_size=60,
    )
)
def test_the_rescore_queue_counts_each_partitions_users_exactly(operations):
    """`left(p)` is what tells a partition it holds only new-version vectors: it must equal the
    queued users of p after any mix of operations, and the order stays oldest first."""
    queue, model = RescoreQueue(), {}  # model: user -> partition, in insertion order
    for op, n, partition in operations:
        user = f"u{n}"
        if op == "add":
            if model.get(user) != partition:
                model.pop(user, None)
                model[user] = partition
            queue.add([(user, partition)])
        elif op == "take":
            taken = queue.take(n % 4)
            assert taken == list(model.items())[: len(taken)] and len(taken) == min(
                n % 4, len(model)
            )
            for u, _ in taken:
                del model[u]
        elif op == "discard":
            queue.discard(user)
            model.pop(user, None)
        else:
            queue.drop(partition)
            model = {u: p for u, p in model.items() if p != partition}
        assert queue.users() == list(model) and len(queue) == len(model)
        for p in range(3):
            assert queue.left(p) == sum(1 for q in model.values() if q == p)
