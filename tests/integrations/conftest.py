"""Fixtures shared by the Hugging Face integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def engine_dtypes(monkeypatch):
    """A list that records ``(hidden.dtype, weight.dtype)`` of every call the patched models make to the fused
    engine (``mileloss.integrations.hf.linear_token_weighted_loss``), which still computes the loss."""
    import mileloss.integrations.hf as hf

    seen = []
    engine = hf.linear_token_weighted_loss

    def recording(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return engine(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(hf, "linear_token_weighted_loss", recording)
    return seen
