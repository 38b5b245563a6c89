"""Warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mileloss.train.schedule import build_scheduler, cosine_with_warmup


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    kwargs = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert [cosine_with_warmup(s, **kwargs) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine_with_warmup(10, **kwargs) == pytest.approx(1.0)
    assert cosine_with_warmup(60, **kwargs) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine_with_warmup(110, **kwargs) == pytest.approx(0.1)
    assert cosine_with_warmup(500, **kwargs) == pytest.approx(0.1)


def test_schedule_decreases_monotonically_after_warmup():
    values = [cosine_with_warmup(s, warmup_steps=5, total_steps=50, min_lr_ratio=0.0) for s in range(5, 51)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False)) and values[-1] == 0.0


def test_scheduler_drives_the_optimizer_learning_rate():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=8, min_lr_ratio=0.25)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0]) and seen[-1] == pytest.approx(0.5)
