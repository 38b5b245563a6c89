"""One error hierarchy: every exception class of the package is defined once, in mileloss/errors.py, under one root."""

import ast
import inspect
from pathlib import Path

import mileloss.errors as errors
from mileloss.errors import MileLossError

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mileloss"


def _exception_classes_defined_in_src() -> dict[str, list[str]]:
    """class name -> the modules that define it, for every class whose name ends in Error or Exception."""
    found: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Exception")):
                found.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    return found


def test_every_exception_class_is_defined_once_in_errors_py():
    found = _exception_classes_defined_in_src()
    assert found, "no exception classes found: the scan is broken"
    elsewhere = {name: homes for name, homes in found.items() if homes != ["errors.py"]}
    assert not elsewhere, f"exception classes defined outside mileloss/errors.py or twice: {elsewhere}"


def test_every_error_derives_from_the_one_root_which_is_a_value_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 30
    assert issubclass(MileLossError, ValueError)
    assert all(issubclass(c, MileLossError) for c in classes), [c.__name__ for c in classes
                                                                 if not issubclass(c, MileLossError)]


def test_the_errors_module_is_the_one_the_package_raises_from():
    from mileloss.data.shards import ManifestError
    from mileloss.losses.functional import ShapeError
    from mileloss.train.checkpoint import CheckpointError

    assert ShapeError is errors.ShapeError
    assert ManifestError is errors.ManifestError
    assert CheckpointError is errors.CheckpointError
