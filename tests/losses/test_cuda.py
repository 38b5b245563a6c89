"""On a CUDA device the engine gives the float64 oracle's loss and gradients, in fp32 and in bf16, and compiles.

Skipped where there is no GPU (CI); run with ``pytest -m gpu tests/losses/test_cuda.py`` on a machine with one.
``MILELOSS_TEST_DEVICE=cuda`` (tests/conftest.py) runs the whole CPU suite on the GPU as well.
"""

import pytest
import torch

import mileloss
from tests import reference
from tests.conftest import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

N, V, D = 700, 5003, 96  # odd sizes: chunks that do not divide the rows


def _inputs(dtype):
    generator = torch.Generator("cpu").manual_seed(7)
    hidden = torch.randn(N, D, generator=generator, dtype=torch.float64, device="cpu")
    weight = torch.randn(V, D, generator=generator, dtype=torch.float64, device="cpu") / D**0.5 * 3
    targets = torch.randint(0, V, (N,), generator=generator, device="cpu")
    targets[::13] = -100
    # round to the working dtype once, so the oracle sees exactly the inputs the engine sees
    return hidden.to(dtype).double(), weight.to(dtype).double(), targets


@pytest.mark.parametrize("weighting", ["ce", "focal", "mile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_cuda_matches_the_float64_oracle(weighting, dtype):
    hidden64, weight64, targets = _inputs(dtype)
    h = hidden64.to("cuda", dtype).requires_grad_()
    w = weight64.to("cuda", dtype).requires_grad_()
    loss = mileloss.linear_token_weighted_loss(h, w, targets.cuda(), weighting=weighting, gamma=2.0, sigma=0.5)
    loss.backward()
    h64, w64 = hidden64.clone().requires_grad_(), weight64.clone().requires_grad_()
    expected = reference.loss(h64 @ w64.T, targets, weighting, gamma=2.0, sigma=0.5)
    expected.backward()
    assert loss.dtype == dtype
    assert_close(loss.cpu(), expected, dtype, what=f"{weighting} loss")
    assert_close(h.grad.cpu(), h64.grad, dtype, what="grad hidden")
    assert_close(w.grad.cpu(), w64.grad, dtype, what="grad weight")


def test_the_model_around_the_loss_compiles_on_cuda():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(V, D, device="cuda")
    head = torch.nn.Linear(D, V, bias=False, device="cuda")

    def step(ids, labels):
        return mileloss.linear_mile_loss(torch.tanh(embed(ids)).reshape(-1, D), head.weight, labels.reshape(-1))

    ids = torch.randint(0, V, (4, 64), device="cuda")
    labels = torch.randint(0, V, (4, 64), device="cuda")
    eager = step(ids, labels)
    compiled = torch.compile(step)(ids, labels)
    compiled.backward()
    assert torch.isfinite(head.weight.grad).all()
    assert_close(compiled, eager, torch.float32, what="compiled vs eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_fused_mile_with_bias_on_cuda_matches_the_float64_oracle(dtype):
    # the Triton path of the compiled per-chunk math: bf16 GEMM output overwritten by the bf16 gradient,
    # the bias added inside the kernel, a ragged last chunk (700 rows in chunks of 256: a dynamic-rows compile)
    hidden64, weight64, targets = _inputs(dtype)
    bias64 = torch.randn(V, dtype=torch.float64).to(dtype).double()
    h = hidden64.to("cuda", dtype).requires_grad_()
    w = weight64.to("cuda", dtype).requires_grad_()
    b = bias64.to("cuda", dtype).requires_grad_()
    loss = mileloss.linear_mile_loss(h, w, targets.cuda(), b, chunk_size=256, compile=True)
    loss.backward()
    h64, w64, b64 = (t.clone().requires_grad_() for t in (hidden64, weight64, bias64))
    expected = reference.loss(h64 @ w64.T + b64, targets, "mile")
    expected.backward()
    from mileloss.losses import compiled
    assert not compiled._FAILED, compiled._FAILED  # it compiled (no fallback to eager)
    assert_close(loss.cpu(), expected, dtype, what="loss")
    for name, got, want in (("hidden", h, h64), ("weight", w, w64), ("bias", b, b64)):
        assert_close(got.grad.cpu(), want.grad, dtype, what=f"grad {name}")
