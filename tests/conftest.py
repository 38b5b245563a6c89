"""Shared test settings: one seed, tolerances stated once, an assert_close that shows the worst elements."""

import os
import random

import pytest
import torch

# MILELOSS_TEST_DEVICE=cuda runs the suite on that device: every tensor a test creates without naming a device
# lands there (torch.set_default_device), the oracle's float64 tensors too. CPU by default, and in CI.
TEST_DEVICE = os.environ.get("MILELOSS_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)

# float64 runs the engine in float64, so it must agree with the float64 oracle to rounding
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    random.seed(1234)


def assert_close(actual, expected, dtype=torch.float64, what="value", **override):
    """torch.testing.assert_close at the tolerance of ``dtype``, reporting the worst mismatches."""
    tol = {**TOLERANCES[dtype], **override}
    actual, expected = actual.detach().double(), expected.detach().double()
    try:
        torch.testing.assert_close(actual, expected, **tol)
    except AssertionError as error:
        diff = (actual - expected).abs().reshape(-1)
        worst = diff.topk(min(5, diff.numel())).indices
        rows = [f"  [{int(i)}] got {actual.reshape(-1)[i].item():.10g} want {expected.reshape(-1)[i].item():.10g}"
                for i in worst]
        raise AssertionError(f"{what} mismatch ({dtype}):\n" + "\n".join(rows) + f"\n{error}") from None
