"""A small mutation-testing tool (not collected by pytest; slow): does a module's test file notice when the module's
code is wrong?

    python tests/mutation.py dleaf/metrics.py tests/test_metrics.py [more test files] [--out runs/mutation/m.json]

Every mutation site of the module is changed once, in a copy of the repository under a temporary folder, and the
test file is run against it (``pytest -x``). A mutant is *killed* when the tests fail (or time out: counted apart, as
``timeouts``, since a loaded machine can time out a mutant the tests would not have caught), *survives* when they
pass. ``--survivors REPORT`` re-tests only an earlier report's survivors (after tests were added). Mutations:
arithmetic operators (``+ -``, ``* /``, ``// /``, ``** *``, ``% *``, augmented assignments), comparisons
(``< <=``, ``> >=``, ``== !=``, ``in`` / ``not in``, ``is`` / ``is not``), boolean operators (``and or``),
``not x`` -> ``x``, unary minus removed, numbers (``0 -> 1``, ``n -> n + 1``, ``x.y -> 2 x.y + 1``),
``True <-> False``, and ``break``/``continue`` swapped. Docstrings, strings, f-strings and the arguments of ``raise``
are left alone. The report lists every survivor with its line and the mutated source line.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Pow: ast.Mult, ast.Mod: ast.Mult}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes never mutated: docstrings, f-strings, raise statements, annotations, decorators."""
    skip: set[int] = set()

    def mark(node):
        for sub in ast.walk(node):
            skip.add(id(sub))

    for node in ast.walk(tree):
        if isinstance(node, (ast.JoinedStr, ast.Raise)):
            mark(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                mark(d)
            if node.returns is not None:
                mark(node.returns)
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if a.annotation is not None:
                    mark(a.annotation)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant):
            mark(node.body[0])
    return skip


def sites(tree: ast.AST) -> list[tuple[int, str]]:
    """(index of the node in ast.walk order, description) of every mutation site."""
    skip = _skipped_nodes(tree)
    out = []
    for k, node in enumerate(ast.walk(tree)):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOPS:
            out.append((k, f"{type(node.op).__name__} -> {BINOPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare):
            for j, op in enumerate(node.ops):
                if type(op) in CMPOPS:
                    out.append((k, f"compare {j}: {type(op).__name__} -> {CMPOPS[type(op)].__name__}"))
        elif isinstance(node, ast.BoolOp):
            out.append((k, f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append((k, f"drop {type(node.op).__name__}"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            out.append((k, f"constant {node.value!r}"))
        elif isinstance(node, (ast.Break, ast.Continue)):
            out.append((k, f"{type(node).__name__.lower()} swapped"))
    return out


class _Mutate(ast.NodeTransformer):
    def __init__(self, target: int, desc: str, order: dict[int, int]):
        self.target, self.desc, self.order = target, desc, order

    def generic_visit(self, node):
        node = super().generic_visit(node)
        return node

    def visit(self, node):
        if self.order.get(id(node)) != self.target:
            return self.generic_visit(node)
        if isinstance(node, (ast.BinOp, ast.AugAssign)):
            node.op = BINOPS[type(node.op)]()
        elif isinstance(node, ast.Compare):
            j = int(self.desc.split(":")[0].split()[1])
            node.ops[j] = CMPOPS[type(node.ops[j])]()
        elif isinstance(node, ast.BoolOp):
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif isinstance(node, ast.UnaryOp):
            return node.operand
        elif isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                node.value = not v
            elif isinstance(v, int):
                node.value = 1 if v == 0 else v + 1
            else:
                node.value = 2 * v + 1
        elif isinstance(node, ast.Break):
            return ast.copy_location(ast.Continue(), node)
        elif isinstance(node, ast.Continue):
            return ast.copy_location(ast.Break(), node)
        return node


def mutant_source(tree: ast.AST, target: int, desc: str) -> tuple[str, int]:
    tree = copy.deepcopy(tree)
    order = {id(n): k for k, n in enumerate(ast.walk(tree))}
    line = next(getattr(n, "lineno", 0) for k, n in enumerate(ast.walk(tree)) if k == target)
    new = _Mutate(target, desc, order).visit(tree)
    ast.fix_missing_locations(new)
    return ast.unparse(new), line


def run_tests(copy_root: Path, test_files: list[str], timeout: float) -> str:
    """Run the test files against the copy in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(copy_root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *test_files],
                             cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if res.returncode == 0 else "killed"


def run_tests_forked(copy_root: Path, test_files: list[str], timeout: float) -> str:
    """Run the test files against the copy in a child forked from this process, which has already imported the
    heavy libraries (numpy, scipy, matplotlib, pytest, torch, transformers): much faster than a fresh interpreter
    per mutant. The child imports the project from the copy (nothing of it is imported in the parent)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.chdir(copy_root)
            sys.path.insert(0, str(copy_root))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest

            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *test_files]))
        finally:
            os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def _warm_imports() -> None:
    for name in ("numpy", "scipy.stats", "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg",
                 "pytest", "yaml", "PIL.Image", "torch", "transformers", "transformers.models.llava.modeling_llava",
                 "transformers.models.gemma2.modeling_gemma2", "transformers.models.gpt_oss.modeling_gpt_oss"):
        try:
            __import__(name)
        except ImportError:
            pass


def finish(report: dict, out: str | None) -> None:
    """Print a report's counts and every survivor (with its site, when the report numbers them); write the report
    as JSON to ``out`` when given."""
    print(json.dumps({k: v for k, v in report.items() if k != "survivors"}))
    for r in report["survivors"]:
        site = f"site {r['site']}: " if "site" in r else ""
        print(f"  survived: {site}line {r['line']}: {r['mutation']}: {r['source']}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", help="the module to mutate, relative to the repository (e.g. dleaf/metrics.py)")
    ap.add_argument("tests", nargs="+", help="the test files that must notice (e.g. tests/test_metrics.py)")
    ap.add_argument("--out", default=None, help="write the report (JSON) here")
    ap.add_argument("--limit", type=int, default=None, help="only the first N mutants (a quick look)")
    ap.add_argument("--survivors", default=None,
                    help="a previous report: re-test only the mutants that survived it (same source line and "
                         "mutation); tests only ever added cannot revive a killed mutant")
    ap.add_argument("--no_fork", action="store_true", help="a fresh interpreter per mutant (slower; no os.fork)")
    args = ap.parse_args(argv)
    runner = run_tests if args.no_fork or not hasattr(os, "fork") else run_tests_forked
    if runner is run_tests_forked:
        _warm_imports()
    source = (ROOT / args.module).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    numbered = list(enumerate(sites(tree), start=1))
    if args.survivors:
        before = json.loads(Path(args.survivors).read_text())["survivors"]
        wanted = {(r["source"], r["mutation"]) for r in before}
        numbered = [(n, (k, d)) for n, (k, d) in numbered
                    if (lines[mutant_source(tree, k, d)[1] - 1].strip(), d) in wanted]
    todo = numbered[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        copy_root = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy_root, ignore=shutil.ignore_patterns(".git", "runs", ".venv", "__pycache__",
                                                                          "build", "*.egg-info"))
        target = copy_root / args.module
        target.write_text(ast.unparse(tree))
        t0 = time.time()
        if runner(copy_root, args.tests, 600) != "survived":
            raise SystemExit("the tests fail on the unmutated (re-printed) module; fix that first")
        timeout = max(60.0, 5 * (time.time() - t0))
        results = []
        total = len(sites(tree))
        for n, (k, desc) in todo:
            text, line = mutant_source(tree, k, desc)
            target.write_text(text)
            status = runner(copy_root, args.tests, timeout)
            results.append({"site": n, "line": line, "mutation": desc, "status": status,
                            "source": lines[line - 1].strip() if 0 < line <= len(lines) else ""})
            print(f"[{n}/{total}] line {line}: {desc}: {status}", flush=True)
        target.write_text(source)
    survivors = [r for r in results if r["status"] == "survived"]
    timeouts = sum(r["status"] == "timeout" for r in results)
    report = {"module": args.module, "tests": args.tests, "mutants": len(results), "survived": len(survivors),
              "killed": len(results) - len(survivors), "timeouts": timeouts, "survivors": survivors}
    finish(report, args.out)


if __name__ == "__main__":
    main()
