"""Two gloo processes give exactly the loss and gradients of one process on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mileloss
from mileloss.losses.distributed import WeightNormalizer
from tests import reference
from tests.conftest import assert_close

WORLD = 2
N, D, V = 24, 8, 37


def full_batch(gamma=1.0):
    generator = torch.Generator(torch.get_default_device()).manual_seed(7)
    hidden = torch.randn(N, D, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, D, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=generator)
    targets[:9] = -100  # rank 0 gets far more ignored tokens than rank 1: normalisers must be global
    if gamma != 1.0:  # rank 0's rows peaked: its weights ~1e-20 of rank 1's, the global max is on rank 1
        hidden[: N // 2] *= 4.0
    return hidden, weight, targets


OPTIONS = dict(softcap=3.0, label_smoothing=0.1, z_loss=0.02)


def option_weights():  # noqa: N802  (a constant, built on the default device when called)
    t = torch.linspace(0.0, 2.0, N, dtype=torch.float64)
    t[N // 2 + 1] = 0.0
    return t


GAMMAS = {"weighted": 1.0, "accumulated": 1.0, "weighted_gamma40": 40.0, "accumulated_gamma40": 40.0}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        group = dist.group.WORLD
        results = {}

        for suffix, gamma in (("", 1.0), ("_gamma40", 40.0)):
            hidden, weight, targets = full_batch(gamma)
            # 1. weighted mean, normaliser all-reduced (max log-weight, then the shifted sums); DDP averages grads
            h = hidden[rows].clone().requires_grad_()
            w = weight.clone().requires_grad_()
            loss = mileloss.linear_mile_loss(h, w, targets[rows], gamma=gamma, process_group=group)
            loss.backward()
            losses = loss.detach().clone()
            dist.all_reduce(losses)
            dist.all_reduce(w.grad)
            # every gradient is world x the true one until DDP averages it (the hidden states' too, through the
            # parameters they came from), so each is compared after dividing by the world size
            results["weighted" + suffix] = (losses / WORLD, h.grad / WORLD, w.grad / WORLD)

            # 2. two micro-batches per rank with WeightNormalizer (sum losses, rescale once)
            w2 = weight.clone().requires_grad_()
            normalizer = WeightNormalizer(process_group=group)
            hidden_grads = []
            for micro in (slice(rows.start, rows.start + 5), slice(rows.start + 5, rows.stop)):
                hm = hidden[micro].clone().requires_grad_()
                loss_sum, stats = mileloss.linear_mile_loss(hm, w2, targets[micro], gamma=gamma, reduction="sum",
                                                            return_stats=True)
                (loss_sum * 0.1).backward()
                normalizer.add(stats, 0.1)
                hidden_grads.append(hm)
            global_loss = normalizer.rescale_gradients_([w2] + hidden_grads)
            dist.all_reduce(w2.grad)
            results["accumulated" + suffix] = (global_loss, torch.cat([hm.grad for hm in hidden_grads]) / WORLD,
                                               w2.grad / WORLD)

        hidden, weight, targets = full_batch()
        # 4. issue 12's options under a process group: softcap, smoothing, token weights, z-loss (global mean)
        for normalize in ("weighted", "none"):
            h = hidden[rows].clone().requires_grad_()
            w = weight.clone().requires_grad_()
            loss = mileloss.linear_mile_loss(h, w, targets[rows], process_group=group, normalize=normalize,
                                             token_weights=option_weights()[rows], **OPTIONS)
            loss.backward()
            losses = loss.detach().clone()
            dist.all_reduce(losses)
            dist.all_reduce(w.grad)
            results["options_" + normalize] = (losses / WORLD, h.grad / WORLD, w.grad / WORLD)

        # 3. paper mode: per-rank alphas averaged across ranks, as the official code does
        logits = (hidden[rows] @ weight.T).requires_grad_()
        paper = mileloss.mile_loss(logits, targets[rows], normalize="paper", process_group=group)
        results["paper"] = (paper.detach(),)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def single_process_reference(gamma=1.0):
    hidden, weight, targets = full_batch(gamma)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = reference.loss(h @ w.T, targets, "mile", gamma=gamma)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(GAMMAS))
def test_two_ranks_equal_one_process_on_the_concatenated_batch(rank_results, case):
    loss, hidden_grad, weight_grad = single_process_reference(GAMMAS[case])
    assert_close(rank_results[0][case][0], loss, what="loss")
    assert_close(torch.cat([r[case][1] for r in rank_results]), hidden_grad, what="grad hidden")
    for r in rank_results:
        assert_close(r[case][2], weight_grad, what="grad weight")


@pytest.mark.distributed
def test_paper_mode_averages_the_ranks_alphas(rank_results):
    hidden, weight, targets = full_batch()
    logits = hidden @ weight.T
    halves = [slice(0, N // 2), slice(N // 2, N)]
    rank_alphas = []  # each rank's alpha = 1 / mean(1 + clamped entropy) over all its positions
    for s in halves:
        z = logits[s]
        probs = torch.softmax(z, -1).clamp(1e-8, 1.0)
        rank_alphas.append(1.0 / (1.0 + -(probs * probs.log()).sum(-1)).mean())
    alpha = sum(rank_alphas) / WORLD
    for rank, s in enumerate(halves):
        expected = reference.official(logits[s], targets[s], alpha_override=alpha).mean()
        assert_close(rank_results[rank]["paper"][0], expected, what=f"paper loss rank {rank}", rtol=1e-9)


@pytest.mark.distributed
@pytest.mark.parametrize("normalize", ["weighted", "none"])
def test_two_ranks_with_all_options_equal_one_process(rank_results, normalize):
    hidden, weight, targets = full_batch()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = reference.loss(h @ w.T, targets, "mile", normalize=normalize, token_weights=option_weights(), **OPTIONS)
    loss.backward()
    case = "options_" + normalize
    assert_close(rank_results[0][case][0], loss, what="loss")
    assert_close(torch.cat([r[case][1] for r in rank_results]), h.grad, what="grad hidden")
    for r in rank_results:
        assert_close(r[case][2], w.grad, what="grad weight")
