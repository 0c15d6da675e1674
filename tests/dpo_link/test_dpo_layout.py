"""The layout of dpo_link: only the organism's pair builder knows the synthetic world."""

import ast
import re
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


def _mentioned_docs(text: str) -> set[str]:
    return set(re.findall(r"[\w./-]*\w\.md\b", text))


def test_every_document_dpo_link_cites_is_in_the_repository():
    """The project stands alone: every .md file named by dpo_link, its scripts and its docs exists here."""
    sources = [*sorted((ROOT / "dpo_link").glob("*.py")), ROOT / "scripts" / "train_dpo.py",
               ROOT / "scripts" / "correspondence.py", ROOT / "docs" / "correspondence.md", ROOT / "docs" / "dpo.md"]
    for path in sources:
        for name in _mentioned_docs(path.read_text()):
            if name == "README.md":
                continue
            candidates = [ROOT / name, ROOT / "docs" / name, path.parent / name, ROOT / "data" / name]
            assert any(c.is_file() for c in candidates), f"{path.relative_to(ROOT)} cites {name}, not in the repository"


def test_the_correspondence_document_opens_with_a_verdict_and_defines_its_terms():
    text = (ROOT / "docs" / "correspondence.md").read_text()
    first = text.split("\n\n")[1]
    assert first.startswith("**Verdict.**")
    assert "[`results_organism.md`](results_organism.md)" in text
    terms = text[text.index("## Terms used below"):text.index("## Data")]
    for term in ("**Sign-test p**", "**matched noise**", "**shuffled**", "**negative beta_D**", "**chance**",
                 "**Length-partial**", "**random_target**", "**random_layers**", "**top-k overlap**"):
        assert term in terms, term
    theory = text[text.index("## The idea being tested"):text.index("## Terms used below")]
    for idea in ("implicit reward", "r_theta", "r_D", "log 2", "slope at gamma 0", "negative slope"):
        assert idea.lower() in theory.lower(), idea
    assert "--output_dir" in text and "--out " not in text
