"""The fused path in low precision and in a training loop."""

import pytest
import torch

import mileloss
from tests import reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_low_precision_grads_are_no_worse_than_naive_same_dtype(dtype):
    n, d, v = 64, 32, 300
    hidden64 = torch.randn(n, d, dtype=torch.float64)
    weight64 = torch.randn(v, d, dtype=torch.float64) / d**0.5
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        return loss.detach().double(), h.grad.double(), w.grad.double()

    truth = run(lambda h, w: reference.loss(h @ w.T, targets, "mile"), hidden64, weight64)
    hidden, weight = hidden64.to(dtype), weight64.to(dtype)
    ours = run(lambda h, w: mileloss.linear_mile_loss(h, w, targets, chunk_size=16), hidden, weight)
    naive = run(lambda h, w: reference.loss((h @ w.T).float(), targets, "mile").to(dtype), hidden, weight)
    for name, got, base, want in zip(["loss", "grad hidden", "grad weight"], ours, naive, truth, strict=True):
        our_error = (got - want).abs().max()
        naive_error = (base - want).abs().max()
        assert our_error <= naive_error + 1e-3 * want.abs().max(), f"{name}: {our_error} vs naive {naive_error}"


def test_training_with_fused_loss_tracks_the_reference_step_by_step():
    # Liger-style convergence check: a tiny LM trained 20 steps with the fused chunked loss and with the
    # naive loss on materialised logits, from the same init and data, agree step for step
    torch.manual_seed(0)
    vocab, dim = 50, 16
    starts = torch.randint(0, vocab, (20, 4, 1))
    data = (starts + torch.arange(9)) % vocab  # learnable: each token is the previous one plus 1

    def make_model():
        torch.manual_seed(1)
        return torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab, bias=True)

    def train(use_fused):
        embed, head = make_model()
        optimizer = torch.optim.AdamW([*embed.parameters(), *head.parameters()], lr=1e-2)
        losses = []
        for batch in data:
            hidden = torch.tanh(embed(batch[:, :-1]))
            labels = batch[:, 1:].clone()
            labels[:, 0] = -100
            if use_fused:
                loss = mileloss.linear_mile_loss(hidden, head.weight, labels, head.bias, chunk_size=5)
            else:
                logits = head(hidden).reshape(-1, vocab).double()
                loss = reference.loss(logits, labels.reshape(-1), "mile").float()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    fused, naive = train(True), train(False)
    assert fused[-1] < fused[0] - 0.1  # it learns
    torch.testing.assert_close(fused, naive, rtol=1e-4, atol=1e-5)
