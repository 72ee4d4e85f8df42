"""Every public class in gspo/ says what it is (a newcomer reads the class before its methods)."""

import ast
from pathlib import Path

GSPO = Path(__file__).resolve().parents[1] / "gspo"


def test_every_public_class_has_a_docstring():
    missing = []
    for path in sorted(GSPO.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(GSPO.parent)}: {node.name}")
    assert not missing, "public classes without a docstring:\n" + "\n".join(missing)


def test_no_reference_to_files_outside_the_project():
    for path in sorted(GSPO.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for outside in ("design.md", "../shared", "shared/"):
            assert outside not in text, f"{path.relative_to(GSPO.parent)} cites {outside!r}"
