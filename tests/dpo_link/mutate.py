"""Mutation testing of dpo_link modules in one process (not collected by pytest; slow, not part of CI).

    python tests/dpo_link/mutate.py dpo_link/correspondence.py tests/dpo_link/test_dpo_correspondence.py \\
        --out runs/mutation/correspondence.json
    python tests/dpo_link/mutate.py dpo_link/rewards.py tests/dpo_link/test_dpo_rewards.py \\
        tests/dpo_link/test_dpo_dleaf_dpo.py --reload dpo_link/dleaf_dpo.py dpo_link/suite.py

The mutation sites and operators are those of ``tests/mutation.py`` (arithmetic and comparison operators, boolean
operators, ``not`` and unary minus dropped, numbers and booleans changed, ``break``/``continue`` swapped). Instead of
copying the repository and starting Python (torch, transformers, TRL) once per mutant, the mutant's source is
executed into the already imported module, the modules named by ``--reload`` (those that bound names from it with
``from ... import``) are executed again so they pick the mutant up, and the test files run in-process with
``pytest -x``. A mutant is killed when a test fails or errors (or runs past the time limit), survives when all pass.
The report lists every survivor with its line.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mutation  # noqa: E402  (tests/mutation.py: the sites and operators)


class _Timeout(Exception):
    pass


def _module_name(path: str) -> str:
    return ".".join(Path(path).with_suffix("").parts)


def _load_into(module, source: str) -> None:
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own source, mutated


def _run(tests: list[str], select: str | None, timeout: float) -> str:
    import pytest

    def alarm(*_):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    args = ["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *tests]
    if select:
        args += ["-k", select]
    try:
        code = pytest.main(args)
    except _Timeout:
        return "timeout"
    finally:
        signal.alarm(0)
    return "survived" if code == 0 else "killed"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", help="the module to mutate (e.g. dpo_link/correspondence.py)")
    ap.add_argument("tests", nargs="+", help="the test files that must notice")
    ap.add_argument("--reload", nargs="*", default=[], help="modules that import names from the mutated one")
    ap.add_argument("-k", dest="select", default=None, help="pytest -k selection")
    ap.add_argument("--out", default=None, help="write the report (JSON) here")
    ap.add_argument("--limit", type=int, default=None, help="only the first N mutants")
    args = ap.parse_args(argv)
    source = (ROOT / args.module).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    module = importlib.import_module(_module_name(args.module))
    dependents = [(importlib.import_module(_module_name(p)), (ROOT / p).read_text()) for p in args.reload]
    todo = mutation.sites(tree)[: args.limit]

    def install(text):
        _load_into(module, text)
        for dep, dep_source in dependents:
            _load_into(dep, dep_source)

    install(ast.unparse(tree))
    t0 = time.time()
    if _run(args.tests, args.select, 3600) != "survived":
        raise SystemExit("the tests fail on the unmutated (re-printed) module; fix that first")
    timeout = max(60.0, 3 * (time.time() - t0))
    results = []
    for n, (k, desc) in enumerate(todo, start=1):
        text, line = mutation.mutant_source(tree, k, desc)
        try:
            install(text)
            status = _run(args.tests, args.select, timeout)
        except Exception:  # the mutant does not even load
            status = "killed"
        results.append({"line": line, "mutation": desc, "status": status,
                        "source": lines[line - 1].strip() if 0 < line <= len(lines) else ""})
        print(f"[{n}/{len(todo)}] line {line}: {desc}: {status}", file=sys.stderr, flush=True)
    install(source)
    survivors = [r for r in results if r["status"] == "survived"]
    report = {"module": args.module, "tests": args.tests, "select": args.select, "mutants": len(results),
              "survived": len(survivors), "killed": len(results) - len(survivors), "survivors": survivors,
              "seconds": round(time.time() - t0)}
    mutation.finish(report, args.out)


if __name__ == "__main__":
    main()
