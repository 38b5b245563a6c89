"""The compiled per-chunk math (``mileloss.losses.compiled``) equals the eager engine and the float64 oracle.

Compiling costs seconds per (options, dtype, chunk shape), so the default tests share a few keys (V = 103,
chunk 16, a ragged last chunk: two compilations each); the sweep over every option is ``slow``.
"""

import warnings

import pytest
import torch

import mileloss
from mileloss.errors import ParameterError
from mileloss.losses import compiled as compiled_module
from tests import reference
from tests.conftest import assert_close
from tests.losses.helpers import grads_of, make_batch

V, CHUNK = 103, 16


@pytest.fixture
def strict_compile(monkeypatch):
    """A compilation failure fails the test instead of falling back to eager with a warning."""
    def fail(error):
        raise error
    monkeypatch.setattr(compiled_module, "give_up", fail)


def test_compiled_from_logits_matches_eager_and_oracle_with_a_ragged_chunk_and_ignored_rows(strict_compile):
    logits, targets = make_batch(37, V, torch.float32)  # chunks 16, 16, 5: the 5 is the dynamic-rows compilation
    results = {}
    for mode in (True, False):
        results[mode] = grads_of(
            lambda z, mode=mode: mileloss.mile_loss(z, targets, chunk_size=CHUNK, compile=mode), logits)
    want = grads_of(lambda z: reference.loss(z, targets, "mile"), logits.double())
    (ours, (grad,)), (eager, (eager_grad,)) = results[True], results[False]
    assert_close(ours, want[0], torch.float32, what="compiled loss vs oracle")
    assert_close(grad, want[1][0], torch.float32, what="compiled grad vs oracle")
    assert_close(ours, eager, torch.float32, what="compiled vs eager loss")
    assert_close(grad, eager_grad, torch.float32, what="compiled vs eager grad")
    # another batch size reuses the compiled functions (a full chunk, then the dynamic ragged one)
    logits2, targets2 = make_batch(21, V, torch.float32)
    got = grads_of(lambda z: mileloss.mile_loss(z, targets2, chunk_size=CHUNK, compile=True), logits2)
    want2 = grads_of(lambda z: reference.loss(z, targets2, "mile"), logits2.double())
    assert_close(got[0], want2[0], torch.float32, what="second batch loss")
    assert_close(got[1][0], want2[1][0], torch.float32, what="second batch grad")


def test_compiled_all_ignored_batch_gives_zero_loss_and_zero_grad(strict_compile):
    logits, _ = make_batch(37, V, torch.float32)
    targets = torch.full((37,), reference.IGNORE)
    loss, (grad,) = grads_of(lambda z: mileloss.mile_loss(z, targets, chunk_size=CHUNK, compile=True), logits)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_compiled_fused_matches_oracle_for_hidden_weight_and_bias(strict_compile):
    n, d = 37, 12
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(V, d, dtype=torch.float64) * 0.5
    bias = torch.randn(V, dtype=torch.float64)
    targets = torch.randint(0, V, (n,))
    targets[3::4] = reference.IGNORE
    f32 = [t.float() for t in (hidden, weight, bias)]
    ours = grads_of(lambda h, w, b: mileloss.linear_mile_loss(h, w, targets, b, chunk_size=CHUNK,
                                                                    compile=True), *f32)
    eager = grads_of(lambda h, w, b: mileloss.linear_mile_loss(h, w, targets, b, chunk_size=CHUNK,
                                                                     compile=False), *f32)
    want = grads_of(lambda h, w, b: reference.loss(h @ w.T + b, targets, "mile"), hidden, weight, bias)
    assert_close(ours[0], want[0], torch.float32, what="loss")
    for name, got, base, truth in zip(("hidden", "weight", "bias"), ours[1], eager[1], want[1], strict=True):
        assert_close(got, truth, torch.float32, what=f"grad {name} vs oracle")
        assert_close(got, base, torch.float32, what=f"grad {name} vs eager")


def test_compiled_bf16_logits_give_the_oracle_to_bf16_tolerance(strict_compile):
    logits, targets = make_batch(32, V, torch.bfloat16)  # two full chunks: one compilation
    ours = grads_of(lambda z: mileloss.mile_loss(z, targets, chunk_size=CHUNK, compile=True), logits)
    want = grads_of(lambda z: reference.loss(z, targets, "mile"), logits.double())
    assert ours[1][0].dtype == torch.bfloat16
    assert_close(ours[0], want[0], torch.bfloat16, what="loss")
    assert_close(ours[1][0], want[1][0], torch.bfloat16, what="grad")


def test_compiled_inner_loss_under_an_outer_torch_compile_of_the_model(strict_compile):
    embed, head = torch.nn.Embedding(V, 8), torch.nn.Linear(8, V, bias=False)
    inputs, targets = torch.randint(0, V, (2, 8)), torch.randint(0, V, (2, 8))

    def step(mode):
        loss = mileloss.linear_mile_loss(torch.tanh(embed(inputs)), head.weight, targets, chunk_size=CHUNK,
                                         compile=mode)
        loss.backward()
        grad = head.weight.grad.clone()
        head.weight.grad = embed.weight.grad = None
        return loss.detach(), grad

    compiled_loss, compiled_grad = torch.compile(step)(True)
    eager_loss, eager_grad = step(False)
    assert_close(compiled_loss, eager_loss, torch.float32)
    assert_close(compiled_grad, eager_grad, torch.float32)


def test_compiled_nan_and_inf_logits_poison_their_rows_as_eager_does(strict_compile):
    logits, targets = make_batch(37, V, torch.float32)
    logits[2, 5] = float("nan")
    logits[20, 7] = float("inf")
    got = grads_of(lambda z: mileloss.mile_loss(z, targets, chunk_size=CHUNK, compile=True), logits)
    want = grads_of(lambda z: mileloss.mile_loss(z, targets, chunk_size=CHUNK, compile=False), logits)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert torch.equal(torch.isnan(got[1][0]), torch.isnan(want[1][0]))


# --- the switch and the fallback (no compilation needed) -----------------------------------------------------


def _forbid_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compiled() must not be called")
    monkeypatch.setattr(compiled_module, "compiled", refuse)


def test_auto_keeps_small_chunks_eager_and_the_environment_can_switch_it_off(monkeypatch):
    logits, targets = make_batch(37, V, torch.float32)
    _forbid_compile(monkeypatch)
    monkeypatch.delenv(compiled_module.ENV, raising=False)
    mileloss.mile_loss(logits, targets, chunk_size=CHUNK)  # auto: 16 x 103 logits per chunk is far below 2^20
    assert not compiled_module.auto_compile(512, 1000, torch.device("cpu"))
    assert compiled_module.auto_compile(512, 32000, torch.device("cpu"))
    assert not compiled_module.auto_compile(512, 32000, torch.device("meta"))
    assert not compiled_module.auto_compile(512, 32000, torch.device("cuda"))  # not measured there yet
    monkeypatch.setenv(compiled_module.ENV, "0")
    assert not compiled_module.wants_compile("auto", 4096, 32000, torch.device("cpu"))
    assert compiled_module.wants_compile(True, 4096, 32000, torch.device("cpu"))  # an explicit True wins
    monkeypatch.setenv(compiled_module.ENV, "1")
    assert compiled_module.wants_compile("auto", 2, 3, torch.device("cpu"))
    assert not compiled_module.wants_compile(False, 2, 3, torch.device("cpu"))


@pytest.mark.parametrize("value", ["yes", 1, None, "True"])
def test_a_bad_compile_argument_is_a_named_error(value):
    logits, targets = make_batch(4, V, torch.float32)
    with pytest.raises(ParameterError, match="compile must be True, False or 'auto'"):
        mileloss.mile_loss(logits, targets, compile=value)
    with pytest.raises(ParameterError, match="compile"):
        mileloss.MiLeLoss(compile=value)


def test_a_bad_environment_value_is_a_named_error(monkeypatch):
    logits, targets = make_batch(4, V, torch.float32)
    monkeypatch.setenv(compiled_module.ENV, "sometimes")
    with pytest.raises(ParameterError, match="MILELOSS_COMPILE must be 0, 1 or auto"):
        mileloss.mile_loss(logits, targets)


def test_a_failing_compilation_warns_once_and_falls_back_to_the_same_numbers(monkeypatch):
    monkeypatch.setattr(compiled_module, "_FAILED", [])

    def broken(*args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found\nsecond line")
        return run
    monkeypatch.setattr(compiled_module, "compiled", broken)
    h = torch.randn(37, 12)
    w = torch.randn(V, 12) * 0.5
    targets = torch.randint(0, V, (37,))
    want = grads_of(lambda a, b: mileloss.linear_mile_loss(a, b, targets, chunk_size=CHUNK, compile=False),
                          h, w)
    with pytest.warns(RuntimeWarning, match="no working C\\+\\+ compiler found\\); using the eager path") as record:
        got = grads_of(lambda a, b: mileloss.linear_mile_loss(a, b, targets, chunk_size=CHUNK, compile=True),
                             h, w)
    assert len(record) == 1
    assert_close(got[0], want[0], torch.float32)
    for a, b in zip(got[1], want[1], strict=True):
        assert_close(a, b, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given up: no second warning, no second attempt
        again = mileloss.linear_mile_loss(h, w, targets, chunk_size=CHUNK, compile=True)
    assert_close(again, want[0], torch.float32)


# --- the sweep over every option (slow: one compilation per option set) ---------------------------------------

SWEEP = [
    dict(weighting="ce"),
    dict(weighting="focal", gamma=2.0),
    dict(weighting="mile", gamma=1.7, sigma=0.5),  # sigma < 1: the exact-tail pass
    dict(weighting="mile", softcap=4.0),
    dict(weighting="mile", label_smoothing=0.1),
    dict(weighting="mile", z_loss=1e-3),
    dict(weighting="mile", detach_weight=False),
    dict(weighting="focal", detach_weight=False, gamma=2.0),
    dict(weighting="mile", reduction="none"),
    dict(weighting="mile", reduction="sum", normalize="none"),
    dict(weighting="mile", token_weights=True),
]


@pytest.mark.slow
@pytest.mark.parametrize("options", SWEEP, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_compiled_sweep_matches_oracle(strict_compile, options, fused):
    options = dict(options)
    n, d = 37, 12
    targets = torch.randint(0, V, (n,))
    targets[::5] = reference.IGNORE
    if options.pop("token_weights", False):
        t = torch.rand(n, dtype=torch.float64) * 2.0
        t[3::7] = 0.0
        options["token_weights"] = t
    go = torch.randn(n, dtype=torch.float64) if options.get("reduction") == "none" else None
    ours_options = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    if fused:
        hidden = torch.randn(n, d, dtype=torch.float64)
        weight = torch.randn(V, d, dtype=torch.float64)
        ours = grads_of(lambda h, w: mileloss.linear_token_weighted_loss(
            h, w, targets, chunk_size=CHUNK, compile=True, **ours_options), hidden.float(), weight.float(),
            grad_output=None if go is None else go.float())
        want = grads_of(lambda h, w: reference.token_weighted_loss_reference(h @ w.T, targets, **options),
                              hidden, weight, grad_output=go)
    else:
        logits = torch.randn(n, V, dtype=torch.float64) * 3
        ours = grads_of(lambda z: mileloss.token_weighted_loss(
            z, targets, chunk_size=CHUNK, compile=True, **ours_options), logits.float(),
            grad_output=None if go is None else go.float())
        want = grads_of(lambda z: reference.token_weighted_loss_reference(z, targets, **options), logits,
                              grad_output=go)
    assert_close(ours[0], want[0], torch.float32, what="loss")
    for got, truth in zip(ours[1], want[1], strict=True):
        assert_close(got, truth, torch.float32, what="grad")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_compiled_fused_in_other_dtypes(strict_compile, dtype):
    n, d = 37, 12
    hidden = torch.randn(n, d, dtype=torch.float64)
    weight = torch.randn(V, d, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (n,))
    targets[::6] = reference.IGNORE
    ours = grads_of(lambda h, w: mileloss.linear_mile_loss(h, w, targets, chunk_size=CHUNK, compile=True),
                          hidden.to(dtype), weight.to(dtype))
    want = grads_of(lambda h, w: reference.loss(h @ w.T, targets, "mile"), hidden, weight)
    assert_close(ours[0], want[0], dtype, what="loss")
    for got, truth in zip(ours[1], want[1], strict=True):
        assert_close(got, truth, dtype, what="grad")


@pytest.mark.slow
def test_compiled_paper_mode_and_masked_logits_match_oracle(strict_compile):
    logits, targets = make_batch(37, V, torch.float64)
    logits[:, 40:60] = -float("inf")  # masked vocabulary: p = 0 adds nothing to H
    targets[targets >= 40] = 3
    want = grads_of(lambda z: reference.loss(z, targets, "mile"), logits)
    ours = grads_of(lambda z: mileloss.mile_loss(z, targets, chunk_size=CHUNK, compile=True), logits.float())
    assert_close(ours[0], want[0], torch.float32, what="masked loss")
    assert_close(ours[1][0], want[1][0], torch.float32, what="masked grad")
    logits, targets = make_batch(37, V, torch.float64)
    want = reference.official_loss(logits, targets, "mile")
    got = mileloss.mile_loss(logits.float(), targets, chunk_size=CHUNK, normalize="paper", compile=True)
    assert_close(got, want, torch.float32, what="paper loss")


@pytest.mark.slow
def test_compiled_no_grad_forward_and_stats_equal_eager(strict_compile):
    logits, targets = make_batch(37, V, torch.float32)
    with torch.no_grad():  # the eval path: statistics only, no gradient written
        got, got_stats = mileloss.mile_loss(logits, targets, chunk_size=CHUNK, compile=True, return_stats=True)
        want, want_stats = mileloss.mile_loss(logits, targets, chunk_size=CHUNK, compile=False, return_stats=True)
    assert_close(got, want, torch.float32, what="loss")
    for name in ("ce", "entropy", "lse", "log_weight"):
        a, b = getattr(got_stats, name), getattr(want_stats, name)
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), name
        assert_close(a[finite], b[finite], torch.float32, what=name)
    assert_close(got_stats.lse, torch.logsumexp(logits.double(), dim=-1), torch.float32, what="lse vs logsumexp")


# the body of both subprocess scripts below: compile one loss, which must not fall back, and equal the eager one
_COMPILED_EQUALS_EAGER = """
z = torch.randn(37, 103) * 3
y = torch.randint(0, 103, (37,))
a = mileloss.mile_loss(z, y, chunk_size=16, compile=True)
b = mileloss.mile_loss(z, y, chunk_size=16, compile=False)
from mileloss.losses import compiled
assert not compiled._FAILED, compiled._FAILED
torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
print("ok", a.item())
"""

_TWO_PROCESSES = """
import sys, torch, mileloss
torch.manual_seed(int(sys.argv[1]))
""" + _COMPILED_EQUALS_EAGER


@pytest.mark.slow
def test_two_processes_compiling_into_one_fresh_inductor_cache_at_once_both_succeed(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(seed)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert out.startswith("ok")


_KILLED_THEN_AGAIN = """
import os, signal, sys, threading, torch, mileloss
if sys.argv[1] == "kill":  # die by SIGKILL one second into the compilation
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
""" + _COMPILED_EQUALS_EAGER


@pytest.mark.slow
def test_a_compilation_killed_mid_way_leaves_a_cache_the_next_process_can_use(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_THEN_AGAIN, "kill"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9
    again = subprocess.run([sys.executable, "-c", _KILLED_THEN_AGAIN, "run"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith("ok")
