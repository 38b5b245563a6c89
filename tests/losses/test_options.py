"""Issue 12's options (softcap, label_smoothing, token_weights, z_loss) against the float64 oracle: values and
gradients, from logits and fused, every weighting, reduction and normalize mode, composed with each other."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mileloss
from mileloss.errors import DTypeError, NotATensorError, ParameterError, ShapeError, TokenWeightError
from mileloss.losses.distributed import WeightNormalizer
from mileloss.losses.functional import make_spec
from tests import reference
from tests.conftest import assert_close
from tests.losses.helpers import grads_of, make_batch

WEIGHTINGS = ["ce", "focal", "mile"]


def make_token_weights(n, zero_every=7):
    t = torch.rand(n, dtype=torch.float64) * 2.0
    if zero_every:
        t[3::zero_every] = 0.0
    return t


def all_options(n):
    return dict(softcap=4.0, label_smoothing=0.1, token_weights=make_token_weights(n), z_loss=1e-2)


ONE_AT_A_TIME = {
    "softcap": lambda n: dict(softcap=2.5),
    "label_smoothing": lambda n: dict(label_smoothing=0.2),
    "token_weights": lambda n: dict(token_weights=make_token_weights(n)),
    "z_loss": lambda n: dict(z_loss=0.05),
    "all": all_options,
}


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", ["weighted", "none"])
@pytest.mark.parametrize("detach_weight", [True, False])
def test_all_options_together_match_reference_from_logits(weighting, reduction, normalize, detach_weight):
    logits, targets = make_batch(47, 123)  # 47 rows, chunk 8: the last chunk is partial
    options = dict(gamma=1.7, sigma=0.5, reduction=reduction, normalize=normalize, detach_weight=detach_weight,
                   **all_options(47))
    go = torch.randn(47, dtype=torch.float64) if reduction == "none" else None
    ours, (our_grad,) = grads_of(
        lambda z: mileloss.token_weighted_loss(z, targets, weighting=weighting, chunk_size=8, **options), logits,
        grad_output=go)
    want, (want_grad,) = grads_of(lambda z: reference.loss(z, targets, weighting, **options), logits, grad_output=go)
    assert_close(ours, want, what="loss")
    assert_close(our_grad, want_grad, what="grad logits")


@pytest.mark.parametrize("option", sorted(ONE_AT_A_TIME))
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("fused", [False, True])
def test_each_option_alone_matches_reference(option, weighting, fused):
    n, d, v = 29, 10, 67
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    targets[2::6] = reference.IGNORE
    options = dict(gamma=2.0, sigma=1.0, **ONE_AT_A_TIME[option](n))
    if fused:
        ours, our_grads = grads_of(lambda h, w: mileloss.linear_token_weighted_loss(
            h, w, targets, weighting=weighting, chunk_size=6, **options), hidden, weight)
    else:
        ours, our_grads = grads_of(lambda h, w: mileloss.token_weighted_loss(
            h @ w.T, targets, weighting=weighting, chunk_size=6, **options), hidden, weight)
    want, want_grads = grads_of(lambda h, w: reference.loss(h @ w.T, targets, weighting, **options), hidden, weight)
    assert_close(ours, want, what="loss")
    for name, got, expected in zip(["hidden", "weight"], our_grads, want_grads, strict=True):
        assert_close(got, expected, what=f"grad {name}")


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("detach_weight", [True, False])
def test_fused_all_options_match_reference_for_hidden_weight_and_bias(weighting, reduction, detach_weight):
    n, d, v = 31, 12, 97
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64) * 0.5
    bias = torch.randn(v, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    targets[3::4] = reference.IGNORE
    go = torch.randn(n, dtype=torch.float64) if reduction == "none" else None
    options = dict(gamma=2.0, reduction=reduction, detach_weight=detach_weight, **all_options(n))
    ours, our_grads = grads_of(lambda h, w, b: mileloss.linear_token_weighted_loss(
        h, w, targets, b, weighting=weighting, chunk_size=5, **options), hidden, weight, bias, grad_output=go)
    want, want_grads = grads_of(lambda h, w, b: reference.loss(h @ w.T + b, targets, weighting, **options),
                                hidden, weight, bias, grad_output=go)
    assert_close(ours, want, what="loss")
    for name, got, expected in zip(["hidden", "weight", "bias"], our_grads, want_grads, strict=True):
        assert_close(got, expected, what=f"grad {name}")


@pytest.mark.parametrize("weighting", ["focal", "mile"])
@pytest.mark.parametrize("fused", [False, True])
def test_paper_mode_with_all_options_matches_the_extended_official_formula(weighting, fused):
    n, d, v = 26, 9, 41
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    targets[1::5] = reference.IGNORE
    options = all_options(n)
    if fused:
        ours, our_grads = grads_of(lambda h, w: mileloss.linear_token_weighted_loss(
            h, w, targets, weighting=weighting, normalize="paper", chunk_size=4, **options), hidden, weight)
    else:
        ours, our_grads = grads_of(lambda h, w: mileloss.token_weighted_loss(
            h @ w.T, targets, weighting=weighting, normalize="paper", chunk_size=4, **options), hidden, weight)
    want, want_grads = grads_of(lambda h, w: reference.official_loss(h @ w.T, targets, weighting, **options),
                                hidden, weight)
    assert_close(ours, want, what="paper loss")
    for name, got, expected in zip(["hidden", "weight"], our_grads, want_grads, strict=True):
        assert_close(got, expected, what=f"grad {name}")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 40), v=st.integers(1, 60), chunk=st.integers(1, 50),
    weighting=st.sampled_from(WEIGHTINGS), reduction=st.sampled_from(["mean", "sum", "none"]),
    normalize=st.sampled_from(["weighted", "none"]), softcap=st.one_of(st.none(), st.floats(0.5, 30.0)),
    label_smoothing=st.floats(0.0, 0.9), z_loss=st.floats(0.0, 1.0), with_weights=st.booleans(),
    detach_weight=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_shapes_and_options_match_reference(n, v, chunk, weighting, reduction, normalize, softcap,
                                                   label_smoothing, z_loss, with_weights, detach_weight, seed):
    torch.manual_seed(seed)
    logits, targets = make_batch(n, v, ignore_every=3)
    options = dict(gamma=1.3, sigma=0.7, reduction=reduction, normalize=normalize, detach_weight=detach_weight,
                   softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss,
                   token_weights=make_token_weights(n, zero_every=4) if with_weights else None)
    ours, (our_grad,) = grads_of(
        lambda z: mileloss.token_weighted_loss(z, targets, weighting=weighting, chunk_size=chunk, **options), logits)
    want, (want_grad,) = grads_of(lambda z: reference.loss(z, targets, weighting, **options), logits)
    assert_close(ours, want, what="loss", atol=1e-10)
    assert_close(our_grad, want_grad, what="grad", atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("fused", [False, True])
def test_low_precision_with_all_options_is_within_its_tolerance(dtype, weighting, fused):
    n, d, v = 64, 32, 300
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64) * 0.3
    targets = torch.randint(0, v, (n,))
    targets[::9] = reference.IGNORE
    options = dict(gamma=1.5, **all_options(n))
    h, w = hidden.to(dtype), weight.to(dtype)
    if fused:
        ours, our_grads = grads_of(lambda a, b: mileloss.linear_token_weighted_loss(
            a, b, targets, weighting=weighting, **options), h, w)
    else:
        ours, our_grads = grads_of(lambda a, b: mileloss.token_weighted_loss(
            (a.double() @ b.double().T).to(dtype), targets, weighting=weighting, **options), h, w)
    # the truth from the same rounded inputs, in float64
    want, want_grads = grads_of(lambda a, b: reference.loss(a @ b.T, targets, weighting, **options),
                                h.double(), w.double())
    assert ours.dtype == dtype
    assert_close(ours, want, dtype, what="loss")
    scale = max(float(g.abs().max()) for g in want_grads)
    for name, got, expected in zip(["hidden", "weight"], our_grads, want_grads, strict=True):
        assert got.dtype == dtype
        assert_close(got, expected, dtype, what=f"grad {name}", atol=TOL_ABS[dtype] * scale)


TOL_ABS = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("option", ["softcap", "label_smoothing", "z_loss", "all"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_gradcheck_in_float64(option, weighting):
    """The full derivative (detach_weight=False: a detached weight is not the derivative of the value)."""
    detach_weight = False
    n, v = 7, 11
    logits, targets = make_batch(n, v, ignore_every=4, scale=1.5)
    options = ONE_AT_A_TIME[option](n)
    assert torch.autograd.gradcheck(
        lambda z: mileloss.token_weighted_loss(z, targets, weighting=weighting, detach_weight=detach_weight,
                                               chunk_size=3, **options),
        (logits.requires_grad_(),))
    hidden = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w: mileloss.linear_token_weighted_loss(h, w, targets, weighting=weighting,
                                                         detach_weight=detach_weight, chunk_size=3, **options),
        (hidden, weight))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5, 0.95])
@pytest.mark.parametrize("fused", [False, True])
def test_label_smoothing_equals_f_cross_entropy_for_weighting_ce(eps, fused):
    n, d, v = 50, 16, 211
    hidden = torch.randn(n, d)
    weight = torch.randn(v, d) * 0.4
    targets = torch.randint(0, v, (n,))
    targets[::6] = -100
    want, want_grads = grads_of(lambda h, w: F.cross_entropy(h @ w.T, targets, label_smoothing=eps), hidden, weight)
    if fused:
        ours, our_grads = grads_of(lambda h, w: mileloss.linear_cross_entropy_loss(
            h, w, targets, label_smoothing=eps, chunk_size=16), hidden, weight)
    else:
        ours, our_grads = grads_of(lambda h, w: mileloss.cross_entropy_loss(
            h @ w.T, targets, label_smoothing=eps, chunk_size=16), hidden, weight)
    assert_close(ours, want, torch.float32, what="loss")
    for got, expected in zip(our_grads, want_grads, strict=True):
        assert_close(got, expected, torch.float32, what="grad", atol=1e-6)
    per_token = mileloss.cross_entropy_loss(hidden @ weight.T, targets, label_smoothing=eps, reduction="none")
    assert_close(per_token, F.cross_entropy(hidden @ weight.T, targets, label_smoothing=eps, reduction="none"),
                 torch.float32, what="per-token loss")


@pytest.mark.parametrize("weighting", ["focal", "mile"])
@pytest.mark.parametrize("fused", [False, True])
def test_gamma_zero_equals_cross_entropy_exactly(weighting, fused):
    n, d, v = 40, 8, 70
    hidden, weight = torch.randn(n, d), torch.randn(v, d)
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100

    def run(which, gamma):
        if fused:
            return grads_of(lambda h, w: mileloss.linear_token_weighted_loss(
                h, w, targets, weighting=which, gamma=gamma, chunk_size=8), hidden, weight)
        return grads_of(lambda h, w: mileloss.token_weighted_loss(
            h @ w.T, targets, weighting=which, gamma=gamma, chunk_size=8), hidden, weight)

    ours, our_grads = run(weighting, 0.0)
    ce, ce_grads = run("ce", 1.0)
    assert torch.equal(ours, ce)
    for got, expected in zip(our_grads, ce_grads, strict=True):
        assert torch.equal(got, expected)
    assert_close(ours, F.cross_entropy(hidden @ weight.T, targets), torch.float32, what="vs F.cross_entropy")


def test_softcap_stats_report_the_capped_logits():
    logits, targets = make_batch(20, 30, scale=10.0)
    _, stats = mileloss.mile_loss(logits, targets, softcap=3.0, return_stats=True)
    capped = 3.0 * torch.tanh(logits / 3.0)
    assert_close(stats.lse, torch.logsumexp(capped, -1), what="lse")
    ce, entropy, _ = reference.per_token_terms(logits, targets, "mile", 1.0, 1.0, softcap=3.0)
    assert_close(stats.ce, ce, what="ce")
    assert_close(stats.entropy, entropy, what="entropy")


def test_softcap_turns_infinite_logits_into_plus_minus_the_cap():
    logits = torch.zeros(3, 5, dtype=torch.float64)
    logits[0, 1] = float("-inf")
    logits[1, 2] = float("inf")
    targets = torch.tensor([1, 0, 3])
    ours = mileloss.mile_loss(logits, targets, softcap=2.0)
    want = reference.loss(torch.where(torch.isinf(logits), logits.sign() * 1e6, logits), targets, softcap=2.0)
    assert torch.isfinite(ours)
    assert_close(ours, want, what="loss")


def test_zero_token_weights_equal_ignoring_those_tokens():
    logits, targets = make_batch(30, 40, ignore_every=0)
    t = torch.ones(30, dtype=torch.float64)
    t[::4] = 0.0
    ignored = targets.clone()
    ignored[::4] = reference.IGNORE
    for normalize in ("weighted", "none"):
        options = dict(z_loss=0.1, normalize=normalize)
        ours, (our_grad,) = grads_of(lambda z, o=options: mileloss.mile_loss(z, targets, token_weights=t, **o),
                                     logits)
        want, (want_grad,) = grads_of(lambda z, o=options: mileloss.mile_loss(z, ignored, **o), logits)
        assert_close(ours, want, what="loss")
        assert_close(our_grad, want_grad, what="grad")


def test_constant_token_weights_leave_a_mean_unchanged_and_scale_a_sum():
    logits, targets = make_batch(25, 33)
    t = torch.full((25,), 3.0, dtype=torch.float64)
    assert_close(mileloss.mile_loss(logits, targets, token_weights=t), mileloss.mile_loss(logits, targets))
    assert_close(mileloss.mile_loss(logits, targets, token_weights=t, reduction="sum"),
                 3.0 * mileloss.mile_loss(logits, targets, reduction="sum"))


def test_token_weights_shaped_like_targets_and_stats():
    logits = torch.randn(2, 6, 9, dtype=torch.float64)
    targets = torch.randint(0, 9, (2, 6))
    targets[0, 0] = -100
    t = torch.rand(2, 6, dtype=torch.float64)
    loss, stats = mileloss.focal_loss(logits, targets, token_weights=t, z_loss=0.5, reduction="sum",
                                      return_stats=True)
    flat = mileloss.focal_loss(logits.view(-1, 9), targets.view(-1), token_weights=t.view(-1), z_loss=0.5,
                               reduction="sum")
    assert_close(loss, flat)
    valid = targets != -100
    assert_close(stats.valid_count, t[valid].sum(), what="valid_count")
    assert_close(stats.z_loss_sum, 0.5 * (t * stats.lse**2)[valid].sum(), what="z_loss_sum")
    assert_close(loss, stats.weighted_ce_sum + stats.z_loss_sum, what="sum = weighted ce + z part")
    _, w = reference.per_token_terms(logits.view(-1, 9), targets.view(-1), "focal", 1.0, 1.0,
                                     token_weights=t)[1:]
    assert_close(stats.weight.view(-1), w, what="weight includes t")


def test_z_loss_alone_adds_the_mean_squared_lse_to_the_loss():
    logits, targets = make_batch(40, 50)
    base = mileloss.mile_loss(logits, targets)
    valid = targets != -100
    lse = torch.logsumexp(logits, -1)[valid]
    assert_close(mileloss.mile_loss(logits, targets, z_loss=0.3), base + 0.3 * (lse**2).mean())


@pytest.mark.parametrize("weighting", ["ce", "mile"])
def test_z_loss_through_weight_normalizer(weighting):
    """Two micro-batches with reduction="sum" + WeightNormalizer: for weighting="ce" exactly one mean call with
    the z-loss; for MiLe the z-loss is normalised by sum w, as documented in losses/distributed.py."""
    logits, targets = make_batch(30, 20)
    ours_grad = torch.zeros_like(logits)
    normalizer = WeightNormalizer()
    leaf = logits.clone().requires_grad_()
    for rows in (slice(0, 12), slice(12, 30)):
        loss_sum, stats = mileloss.token_weighted_loss(leaf[rows], targets[rows], weighting=weighting, z_loss=0.2,
                                                       reduction="sum", return_stats=True)
        (loss_sum / 30).backward()
        normalizer.add(stats, 1 / 30)
    ours = normalizer.rescale_gradients_([leaf])
    ours_grad = leaf.grad
    if weighting == "ce":
        want, (want_grad,) = grads_of(lambda z: mileloss.cross_entropy_loss(z, targets, z_loss=0.2), logits)
    else:
        def documented(z):
            ce, _, w = reference.per_token_terms(z, targets, "mile", 1.0, 1.0)
            return ((w * ce).sum() + reference.z_term(z, targets, "sum", 0.2)) / w.sum()
        want, (want_grad,) = grads_of(documented, logits)
    assert_close(ours, want, what="loss")
    assert_close(ours_grad, want_grad, what="grad")


def test_options_off_keep_the_single_pass_and_z_loss_recomputes():
    assert make_spec().single_pass
    assert make_spec(softcap=5.0, label_smoothing=0.1).single_pass
    assert not make_spec(z_loss=1e-4).single_pass


@pytest.mark.parametrize("fused", [False, True])
def test_modules_take_the_options_and_token_weights(fused):
    n, d, v = 12, 6, 15
    hidden, weight = torch.randn(n, d), torch.randn(v, d)
    targets = torch.randint(0, v, (n,))
    t = torch.rand(n)
    options = dict(gamma=1.5, softcap=3.0, label_smoothing=0.1, z_loss=0.01)
    if fused:
        module = mileloss.LinearMiLeLoss(**options)
        got = module(hidden, weight, targets, token_weights=t)
        want = mileloss.linear_mile_loss(hidden, weight, targets, token_weights=t, **options)
    else:
        module = mileloss.FocalLoss(**options)
        got = module(hidden @ weight.T, targets, token_weights=t)
        want = mileloss.focal_loss(hidden @ weight.T, targets, token_weights=t, **options)
    assert torch.equal(got, want)
    assert "softcap=3.0" in repr(module) and "z_loss=0.01" in repr(module)
    assert "softcap" not in repr(mileloss.MiLeLoss())
    with pytest.raises(ParameterError, match="label_smoothing"):
        mileloss.MiLeLoss(label_smoothing=1.0)


@pytest.mark.parametrize("name, value, match", [
    ("softcap", 0.0, "softcap must be > 0"), ("softcap", -1.0, "softcap must be >= 0"),
    ("softcap", True, "softcap must be a real"), ("softcap", float("inf"), "finite"),
    ("label_smoothing", 1.0, r"\[0, 1\)"), ("label_smoothing", -0.1, ">= 0"),
    ("label_smoothing", "0.1", "real number"), ("z_loss", -1e-4, ">= 0"), ("z_loss", float("nan"), "finite"),
])
def test_bad_option_values_raise_parameter_error(name, value, match):
    logits, targets = make_batch(4, 5)
    with pytest.raises(ParameterError, match=match):
        mileloss.mile_loss(logits, targets, **{name: value})


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_bad_token_weight_values_are_named(value):
    logits, targets = make_batch(6, 5)
    t = torch.ones(6, dtype=torch.float64)
    t[4] = value
    with pytest.raises(TokenWeightError, match="token_weights must be finite and >= 0"):
        mileloss.mile_loss(logits, targets, token_weights=t)


def test_bad_token_weight_tensors_are_named():
    logits, targets = make_batch(6, 5)
    with pytest.raises(ShapeError, match="token_weights shape"):
        mileloss.mile_loss(logits, targets, token_weights=torch.ones(5))
    with pytest.raises(DTypeError, match="token_weights must be a floating-point"):
        mileloss.mile_loss(logits, targets, token_weights=torch.ones(6, dtype=torch.long))
    with pytest.raises(NotATensorError, match="token_weights"):
        mileloss.mile_loss(logits, targets, token_weights=[1.0] * 6)
    hidden, weight = torch.randn(6, 3), torch.randn(5, 3)
    with pytest.raises(ShapeError, match="token_weights shape"):
        mileloss.linear_mile_loss(hidden, weight, targets, token_weights=torch.ones(2, 3))


def test_no_gradient_flows_to_token_weights():
    logits, targets = make_batch(8, 5)
    t = torch.rand(8, dtype=torch.float64, requires_grad=True)
    z = logits.clone().requires_grad_()
    mileloss.mile_loss(z, targets, token_weights=t).backward()
    assert t.grad is None and z.grad is not None
