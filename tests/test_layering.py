"""Imports point one way: the loss engine never imports the trainer, eval, report or CLI; errors are the floor."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mileloss"
LAYERS = ["errors", "run_folder", "losses", "integrations", "data", "models", "train", "eval", "dependencies",
          "report", "reproduce", "cli"]
# a module may import its own layer and the layers listed before it (integrations uses losses only)
ALLOWED = {
    "errors": set(),
    "losses": {"errors", "losses"},
    "integrations": {"errors", "losses", "integrations"},
}


def imported_mileloss_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mileloss" and len(parts) > 1:
                layers.add(parts[1])
    return layers


def test_losses_and_integrations_import_only_lower_layers():
    for layer, allowed in ALLOWED.items():
        root = PACKAGE / layer
        paths = root.rglob("*.py") if root.is_dir() else [root.with_suffix(".py")]
        for path in paths:
            bad = imported_mileloss_layers(path) - allowed
            assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}; allowed: {sorted(allowed)}"


def test_higher_layers_are_not_imported_by_lower_ones():
    order = {name: index for index, name in enumerate(LAYERS)}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        own = relative.parts[0].removesuffix(".py")
        if own not in order or own == "cli":
            continue
        for imported in imported_mileloss_layers(path):
            if imported in order and imported != "integrations":
                assert order[imported] <= order[own], f"{relative} imports the higher layer {imported!r}"
