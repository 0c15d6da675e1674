"""README commands never modify a tracked file: the fast variant checks where each command writes; the slow
variant runs every README command that writes files (with the smallest limits) in a temporary clone, checks that
`git status` shows nothing changed, and parses every JSON file they wrote with a strict parser."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = re.compile(r"^    (?:bash scripts/setup\.sh && )?(?:HF_HUB_OFFLINE=1 )?(?:CUDA_VISIBLE_DEVICES= )?"
                    r"(?:\.venv/bin/)?(python|accelerate launch)( .*?)?(scripts/\w+\.py)(.*)$")
# the smallest limits per script (appended to the README's command)
SMALL = {
    "study.py": ["--limit", "2", "--n_pairs", "4", "--no_progress"],
    "run_dleaf.py": ["--max_new_tokens", "8"],
    "evaluate.py": ["--limit", "2", "--max_new_tokens", "4", "--no_progress"],
    "premise_check.py": ["--n_bootstrap", "20"],
    "organism_grid.py": ["--limit", "2", "--only", "dleaf", "--no_pope"],
    "organism_demo.py": ["--scan", "2", "--n", "1"],
    "profile_organism.py": ["--limit", "2", "--no_probe"],
    "train_dpo.py": ["--max_steps", "1"],
    "correspondence.py": ["--n_pairs", "4"],
    "fault_benchmark.py": ["--limit", "2", "--max_new_tokens", "4", "--faults", "1", "--splits", "adversarial",
                           "--n_resamples", "100", "--no_progress"],
}
#: the last line of every command: where its outputs are (``outputs: PATH``, ``report: PATH``), or that it wrote none
LAST_LINE = re.compile(r"^([a-z][a-z ]*: \S.*|no files written.*)$")
NEEDS_THE_HUB = ("llava-hf/", "dpo_llava15_rlaifv", "--model llava")


def readme_commands() -> list[tuple[str, str, list[str]]]:
    """(launcher, script, arguments) of every README command line that runs a script."""
    out = []
    for line in (ROOT / "README.md").read_text().splitlines():
        m = SCRIPT.match(line)
        if m:
            launcher, _, script, rest = m.groups()
            args = shlex.split(rest.split("  #")[0].split(" # ")[0])
            out.append((line.strip(), script, args))
    return out


def _value(args, flag):
    for i, a in enumerate(args):
        if a in (flag, flag.replace("_", "-")) and i + 1 < len(args):
            return args[i + 1]
    return None


def test_readme_commands_write_only_under_runs():
    commands = readme_commands()
    assert len(commands) >= 10
    scripts = {Path(s).name for _, s, _ in commands}
    assert {"study.py", "evaluate.py", "run_dleaf.py", "premise_check.py", "organism_grid.py"} <= scripts
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        for line, script, args in commands:
            name = Path(script).name
            if name in ("train_dpo.py", "correspondence.py", "organism_demo.py"):
                continue  # checked by the slow test (their outputs come from recipes or they write nothing)
            out = _value(args, "--output_dir") or _value(args, "--table_out")
            if out is None and name != "premise_check.py":
                module = __import__(name[:-3])
                out = module.build_parser().get_default("output_dir") if hasattr(module, "build_parser") else None
            if name == "premise_check.py":
                out = _value(args, "--run_dir")
            # None: the command writes no file (the script's default is to print only)
            assert out is None or Path(out).parts[0] == "runs", f"{line!r} writes to {out!r}, not under runs/"
    finally:
        sys.path.pop(0)


def test_the_readme_names_every_script():
    text = (ROOT / "README.md").read_text()
    table = next(line for line in text.splitlines() if line.startswith("| `scripts/` |"))
    missing = [p.name for p in sorted((ROOT / "scripts").glob("*.py")) if f"`{p.name}`" not in table]
    assert missing == [], f"the README's scripts table omits {missing}"


def _clone(tmp_path) -> Path:
    """A temporary clone: the checkout's tracked and untracked (not ignored) files, committed in a fresh repo."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            (clone / rel).write_bytes(src.read_bytes())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    subprocess.run([*git, "add", "-A"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-qm", "clone"], cwd=clone, check=True)
    return clone


@pytest.mark.slow
def test_every_readme_command_leaves_the_clone_clean_and_writes_strict_json(tmp_path):
    import os

    from dleaf.io import loads_strict

    clone = _clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(clone), CUDA_VISIBLE_DEVICES="")
    ran = []
    for line, script, args in readme_commands():
        if any(h in line for h in NEEDS_THE_HUB):
            continue
        small = SMALL.get(Path(script).name, [])
        if "--compare" in args:
            small = []
        if line.startswith("accelerate") or " accelerate launch " in f" {line}":
            head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        else:
            head = [sys.executable]
        res = subprocess.run([*head, script, *args, *small], cwd=clone, env=env, capture_output=True, text=True,
                             timeout=1800)
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
        last = res.stdout.strip().splitlines()[-1]
        assert LAST_LINE.match(last), f"{line!r}: the last line does not name the outputs: {last!r}"
        status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
        assert status == "", f"{line!r} changed the clone:\n{status}"
        ran.append(line)
    assert len(ran) >= 10
    written = [p for p in clone.rglob("*.json*") if ".git" not in p.parts and "runs" in p.parts]
    assert written
    for path in written:
        text = path.read_text()
        if path.suffix == ".jsonl":
            for n, row in enumerate(text.splitlines(), 1):
                loads_strict(row)
        else:
            loads_strict(text)
