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
