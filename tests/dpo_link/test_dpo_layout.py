"""The layout of dpo_link: only the organism's pair builder knows the synthetic world."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERIC = ("data", "validate", "collate", "rewards", "correspondence", "dleaf_dpo", "suite", "report", "train")


def test_generic_modules_do_not_import_the_organism():
    code = ("import sys\n" + "".join(f"import dpo_link.{m}\n" for m in GENERIC)
            + "print(sorted(m for m in sys.modules if m.startswith('dleaf.organism')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    for name in GENERIC:  # nor later, inside a function
        tree = ast.parse((ROOT / "dpo_link" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any("organism" in n for n in names), f"dpo_link/{name}.py imports {names}"
