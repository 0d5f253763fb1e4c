"""The fine-tune on CUDA with mixed precision (bf16, or fp16 with a GradScaler): marked `gpu`
and skipped where torch sees no CUDA device, so the default suite runs on CPU machines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import TrainingConfig
from pipeline.continual import fine_tune
from pipeline.messages import Event
from pipeline.model import SeqRecConfig, SeqRecModel
from pipeline.training import evaluate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fine_tune_on_cuda_trains_with_autocast_and_returns_a_cpu_model():
    torch.manual_seed(0)
    ids = [f"i{i}" for i in range(30)]
    model = SeqRecModel(
        SeqRecConfig(num_items=30, hidden_size=32, num_layers=2, num_heads=2, max_length=20)
    ).eval()
    rng = np.random.default_rng(0)
    events = [
        Event(f"e{n}", f"u{n % 40}", f"i{(n % 40 + int(rng.integers(3))) % 34}", "click", 1_000 + n)
        for n in range(2_000)
    ]
    text = np.random.default_rng(1).standard_normal((34, 384)).astype(np.float32)
    cand = fine_tune(
        model,
        ids,
        events,
        new_from=1_000,
        text_of=lambda got: text[[int(i[1:]) for i in got]],
        training=TrainingConfig(device="cuda", epochs=2, batch_size=64),
        replay_ratio=1.0,
        holdout_users=40,
        holdout_events_per_user=3,
    )
    assert math.isfinite(cand.loss)
    assert next(cand.model.parameters()).device.type == "cpu"
    assert cand.model.config.num_items == 34  # the 4 new items were grown in
    # The promoted weights score the same on CPU as the gate measured on the GPU.
    item_text = torch.from_numpy(text)
    on_cpu = evaluate(cand.model, cand.data.holdout, item_text)
    assert on_cpu["users"] == cand.candidate_metrics["users"]
    assert abs(on_cpu["ndcg@10"] - cand.candidate_metrics["ndcg@10"]) < 0.02
