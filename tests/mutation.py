"""Mutation testing of chosen functions, for a 2-core machine (not part of the test suite; slow).

Each mutant changes one thing in one function (an arithmetic or comparison operator, ``and``/``or``, a ``not``, a
number, ``True``/``False``, ``min``/``max``-style names, ``dim`` arguments), is written over the module in a scratch
copy of the repository, and the chosen tests run against it in one long-lived process (torch and transformers stay
imported; every ``dleaf`` module and test module is imported afresh per mutant). A mutant the tests still pass is a
survivor: a change of the code that no test notices.

    python tests/mutation.py --repo . --module dleaf/attention_stats.py --tests tests/test_attention_stats.py \\
        --functions image_mass,image_profile,entropy,layer_entropy,head_focus --out runs/mutation/stats.json

Options: ``--functions`` (names, ``Class.method`` for methods), ``--limit`` (at most so many mutants, spread evenly),
``--timeout`` (seconds per mutant; a mutant that runs past it counts as killed), ``-k`` (a pytest ``-k`` filter).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

SWAP_OPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
            ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
            ast.And: ast.Or, ast.Or: ast.And, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
SWAP_NAMES = {"min": "max", "max": "min", "argmax": "argmin", "argmin": "argmax", "minimum": "maximum",
              "maximum": "minimum", "sum": "mean", "mean": "sum", "cummin": "cummax", "clamp": "clamp_max",
              "log": "log1p", "sqrt": "abs", "exp": "expm1"}


def _in_raise_or_string(node, parents) -> bool:
    return any(isinstance(p, (ast.Raise, ast.JoinedStr)) for p in parents)


def _sites(tree, functions: set[str]) -> list[tuple[int, str]]:
    """``(index of the node in ast.walk order, kind)`` of every mutable node inside the chosen functions."""
    inside: set[int] = set()
    skip: set[int] = set()

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and prefix + child.name in functions:
                for n in ast.walk(child):
                    inside.add(id(n))
                for n in ast.walk(child):
                    if isinstance(n, (ast.Raise, ast.JoinedStr)) or (
                            isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)):
                        skip.update(id(m) for m in ast.walk(n))
                    if isinstance(n, ast.Subscript):  # index constants are shapes, not formulas
                        skip.update(id(m) for m in ast.walk(n.slice) if isinstance(m, ast.Constant))
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(tree)
    sites = []
    for i, node in enumerate(ast.walk(tree)):
        if id(node) not in inside or id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAP_OPS:
            sites.append((i, "op"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in SWAP_OPS:
            sites.append((i, "cmp"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            sites.append((i, "unary"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            sites.append((i, "const"))
        elif isinstance(node, ast.Attribute) and node.attr in SWAP_NAMES:
            sites.append((i, "attr"))
        elif isinstance(node, ast.Name) and node.id in ("min", "max"):
            sites.append((i, "name"))
    return sites


def mutants(source: str, functions: set[str]):
    """Yield ``(description, mutated source)`` for every single-point mutation inside the chosen functions."""
    tree = ast.parse(source)
    for index, kind in _sites(tree, functions):
        t = copy.deepcopy(tree)
        nodes = list(ast.walk(t))
        node = nodes[index]
        line = node.lineno
        if kind == "op":
            new = SWAP_OPS[type(node.op)]
            desc = f"line {line}: {type(node.op).__name__} -> {new.__name__}"
            node.op = new()
        elif kind == "cmp":
            new = SWAP_OPS[type(node.ops[0])]
            desc = f"line {line}: {type(node.ops[0]).__name__} -> {new.__name__}"
            node.ops = [new()] + node.ops[1:]
        elif kind == "unary":
            desc = f"line {line}: drop {type(node.op).__name__}"
            for parent in nodes:
                for field, value in ast.iter_fields(parent):
                    if value is node:
                        setattr(parent, field, node.operand)
                    elif isinstance(value, list):
                        value[:] = [node.operand if v is node else v for v in value]
        elif kind == "const":
            v = node.value
            node.value = (not v) if isinstance(v, bool) else (v + 1 if isinstance(v, int) else (v * 2 if v else 1.0))
            desc = f"line {line}: {v!r} -> {node.value!r}"
        elif kind == "attr":
            desc = f"line {line}: .{node.attr} -> .{SWAP_NAMES[node.attr]}"
            node.attr = SWAP_NAMES[node.attr]
        else:
            desc = f"line {line}: {node.id} -> {SWAP_NAMES[node.id]}"
            node.id = SWAP_NAMES[node.id]
        yield desc, ast.unparse(t)


class _Timeout(Exception):
    pass


def run_tests(repo: Path, tests: list[str], keyword: str | None, timeout: float) -> str:
    """Run the tests in this process against ``repo``; ``"passed"``, ``"failed"`` or ``"timeout"``."""
    import pytest

    for name in list(sys.modules):
        if name == "dleaf" or name.startswith("dleaf.") or name.startswith("test_") or name in (
                "conftest", "model_families"):
            del sys.modules[name]
    args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir", str(repo), *tests]
    if keyword:
        args += ["-k", keyword]

    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = pytest.main(args)
    except _Timeout:
        return "timeout"
    finally:
        signal.alarm(0)
    return "passed" if code == 0 else "failed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--module", required=True, help="path of the module to mutate, relative to the repository")
    ap.add_argument("--tests", required=True, help="comma-separated test files or node ids")
    ap.add_argument("--functions", required=True, help="comma-separated function names (Class.method for methods)")
    ap.add_argument("-k", dest="keyword", default=None)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    source_repo = Path(args.repo).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="mutation_"))
    repo = scratch / "repo"
    shutil.copytree(source_repo, repo, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "data"))
    os.symlink(source_repo / "data", repo / "data")
    os.chdir(repo)
    sys.path[:0] = [str(repo), str(repo / "tests")]
    target = repo / args.module
    original = target.read_text()
    tests = [str(repo / t) if not t.startswith("-") else t for t in args.tests.split(",")]
    all_mutants = list(mutants(original, set(args.functions.split(","))))
    if args.limit and len(all_mutants) > args.limit:
        step = len(all_mutants) / args.limit
        all_mutants = [all_mutants[int(i * step)] for i in range(args.limit)]
    t0 = time.time()
    baseline = run_tests(repo, tests, args.keyword, args.timeout * 3)
    if baseline != "passed":
        print(f"error: the tests fail on the unmutated code ({baseline})", file=sys.stderr)
        return 2
    results = []
    for i, (desc, text) in enumerate(all_mutants):
        target.write_text(text)
        status = run_tests(repo, tests, args.keyword, args.timeout)
        target.write_text(original)
        results.append({"mutant": desc, "status": status})
        print(f"[{i + 1}/{len(all_mutants)}] {status:8s} {desc}", flush=True)
    survived = [r for r in results if r["status"] == "passed"]
    summary = {"module": args.module, "functions": args.functions.split(","), "tests": args.tests,
               "keyword": args.keyword, "mutants": len(results), "killed": len(results) - len(survived),
               "survived": len(survived), "survivors": [r["mutant"] for r in survived], "results": results,
               "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(survived)} of {len(results)} mutants survived; {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
