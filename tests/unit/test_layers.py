"""The package's layers import only what the README's layer table allows (Development section)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "esm_ray"


def layer_table() -> dict[str, set[str]]:
    """{layer: the layers it may import}, parsed from the README's table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Development"):]
    allowed: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        layers = re.findall(r"`(\w+)`", cells[0])
        may = cells[2]
        deps = {"*"} if may == "everything" else set(re.findall(r"\b(\w+)\b", may)) - {"torch", "only"}
        for layer in layers:
            allowed[layer] = deps
    return allowed


def _layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "esm_ray"


def _imported_layers(path: Path) -> set[tuple[str, int]]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "esm_ray":
                continue
            if len(parts) > 1:
                out.add((parts[1], node.lineno))
            else:  # from esm_ray import errors, __version__
                out.update((a.name, node.lineno) for a in node.names if (PACKAGE / a.name).exists()
                           or (PACKAGE / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "esm_ray":
                    out.add((parts[1] if len(parts) > 1 else "esm_ray", node.lineno))
    return out


def test_readme_table_names_every_layer():
    table = layer_table()
    layers = {_layer_of(p) for p in PACKAGE.rglob("*.py")} - {"esm_ray", "__main__"}
    assert layers <= set(table), f"layers missing from the README's table: {sorted(layers - set(table))}"


def test_no_import_runs_against_the_layer_table():
    table = layer_table()
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _layer_of(path)
        if src in ("esm_ray", "__main__"):
            continue
        may = table.get(src, {"errors"})
        for dst, line in sorted(_imported_layers(path)):
            if dst != src and "*" not in may and dst not in may:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({src} imports {dst})")
    assert not wrong, "imports against the README's layer table:\n" + "\n".join(wrong)


def test_core_is_pure_torch():
    """core imports no other esm_ray layer and nothing of Ray, HTTP or S3."""
    banned = ("ray", "boto3", "botocore", "fastapi", "starlette", "requests", "transformers")
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for n in names:
                assert n.split(".")[0] not in banned, f"{path.relative_to(ROOT)} imports {n}"
