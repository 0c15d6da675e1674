"""The end of ``scripts/gpu_check.sh``: from whatever a benchmark's ``bench.json`` holds (a finished run, or one a
time limit cut short after some phase), write ``bench.md`` (the tables) and ``checks.md`` (the checks and what the
run reached), print the checks, and exit 0 only when the run finished and every check passed.

    python -m dleaf.bench.summary OUTPUT_DIR [--bench_status N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..io import write_text_atomic
from .report import markdown_tables

#: The phases of one model's entry, in the order :func:`dleaf.bench.run_benchmark` writes them.
PHASES = ("checks", "ops_per_step", "paired", "memory", "decoding", "scoring")


def check_rows(result: dict) -> list[tuple[str, str, bool, str]]:
    """``(model, check, passed, detail)`` for every check of every model, the loop-equals-generate check first."""
    rows = []
    for name, entry in result.get("models", {}).items():
        if "loop_equals_generate" in entry:
            lvg = entry.get("loop_vs_generate", {})
            detail = "the benchmark's greedy loop against model.generate"
            if lvg.get("first_difference") is not None:
                tie = "a tie within rounding" if lvg["tie"] else "no tie"
                detail += (f": they part at step {lvg['first_difference']}, where the loop's two best logits lie "
                           f"{lvg['gap_at_difference']:.3g} apart ({tie})")
            rows.append((name, "loop_equals_generate", bool(entry["loop_equals_generate"]) or bool(lvg.get("tie")),
                         detail))
        for check, row in entry.get("checks", {}).items():
            if check == "all_passed":
                continue
            detail = (f"max abs logit diff {row['max_abs_logit_diff']:.3g} (tolerance {row['tolerance']:.3g}), "
                      f"bit exact {row['bit_exact']}, argmax agreement {row['argmax_agreement']:.3f} over "
                      f"{row['steps']} steps")
            if "corrections_made" in row:
                detail += f", D-LEAF changed the logits: {row['corrections_made']}"
            rows.append((name, check, bool(row["passed"]), detail))
    return rows


def summarise(result: dict, bench_status: int = 0) -> tuple[str, bool]:
    """``(checks.md text, ok)``: ok when the run finished (``bench_status`` 0, every phase of every model there)
    and every check passed."""
    rows = check_rows(result)
    cfg = result.get("bench_config", {})
    lines = ["# GPU check", ""]
    env = result.get("environment", {})
    lines.append(f"Device: {env.get('cuda_device', 'cpu')}; torch {env.get('torch', '?')}; dtype "
                 f"{cfg.get('dtype', '?')}; benchmark exit status {bench_status}.")
    lines.append("")
    lines.append("| model | check | passed | detail |")
    lines.append("|---|---|---|---|")
    for name, check, passed, detail in rows:
        lines.append(f"| {name} | {check} | {'yes' if passed else '**no**'} | {detail} |")
    lines.append("")
    complete = True
    for name in cfg.get("models", ()):
        entry = result.get("models", {}).get(name, {})
        wanted = [p for p in PHASES if p != "checks" or cfg.get("checks", True)]
        wanted = [p for p in wanted if p != "paired" or cfg.get("paired_steps", 1)]
        wanted = [p for p in wanted if p != "memory" or (cfg.get("memory") and name in cfg.get("memory_models", ()))]
        wanted = [p for p in wanted if p != "scoring" or name in cfg.get("score_models", ())]
        missing = [p for p in wanted if p not in entry]
        complete &= not missing
        lines.append(f"{name}: phases reached {', '.join(p for p in wanted if p in entry) or 'none'}"
                     + (f"; missing {', '.join(missing)}" if missing else ""))
    ok = bench_status == 0 and complete and bool(rows) and all(passed for _, _, passed, _ in rows)
    lines.append("")
    lines.append(f"Overall: {'passed' if ok else 'NOT passed'}.")
    return "\n".join(lines) + "\n", ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir")
    ap.add_argument("--bench_status", type=int, default=0, help="the benchmark's exit status")
    args = ap.parse_args(argv)
    out = Path(args.output_dir)
    path = out / "bench.json"
    if not path.is_file():
        print(f"gpu_check: no {path}: the benchmark wrote nothing (exit status {args.bench_status})", file=sys.stderr)
        return 1
    result = json.loads(path.read_text())
    write_text_atomic(markdown_tables(result), out / "bench.md")
    text, ok = summarise(result, args.bench_status)
    write_text_atomic(text, out / "checks.md")
    print(text)
    print(f"gpu_check: wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'checks.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
