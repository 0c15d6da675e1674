"""Every script of the harness follows one command-line convention (checked on the parsers themselves): a
description with its examples on their own lines, underscore flags with dash aliases, --model (never --checkpoint),
--output_dir under runs/ when it has a default, --threads, --seed where results depend on randomness, every method
in the --method help, one stated default per flag, and a --no_X flag that says it turns X off."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("evaluate.py", "premise_check.py", "organism_grid.py", "organism_demo.py", "profile_organism.py",
           "run_dleaf.py", "study.py", "fault_benchmark.py")
#: scripts whose results depend on a random draw (sampling, bootstrap intervals, probe splits)
SEEDED = ("evaluate.py", "premise_check.py", "organism_grid.py", "profile_organism.py", "fault_benchmark.py",
          "study.py")


def parser_of(name):
    return runpy.run_path(str(ROOT / "scripts" / name), run_name="script")["build_parser"]()


def _options(parser):
    return [a for a in parser._actions if any(o.startswith("--") for o in a.option_strings)]


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_convention(name):
    from dleaf.settings import method_names

    parser = parser_of(name)
    flags = {o for a in parser._actions for o in a.option_strings}
    for action in _options(parser):
        for opt in action.option_strings:
            if "_" in opt:
                assert opt.replace("_", "-") in action.option_strings, f"{name}: {opt} has no dash alias"
    assert "--checkpoint" not in flags and "--threads" in flags
    assert ("--model" in flags) or name == "profile_organism.py"  # the profile compares two named models
    if name in SEEDED:
        assert "--seed" in flags, name
    out = parser.get_default("output_dir")
    assert out is None or Path(out).parts[0] == "runs", f"{name} writes to {out} by default"
    lines = (parser.description or "").strip().splitlines()
    assert lines and lines[0][0].isupper(), f"{name} has no description"
    help_text = parser.format_help()
    examples = [ln for ln in (parser.description or "").splitlines() if ln.startswith("    python ")]
    for ex in examples:  # examples keep their own lines in --help
        assert ex in help_text.splitlines(), ex
    blocks = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    for block in blocks:
        assert block.count("default:") <= 1, f"{name}: a default stated twice:\n{block}"
    for action in _options(parser):
        if action.option_strings[0].startswith("--no_") and action.help:
            assert not action.help.lower().startswith("show"), f"{name}: {action.option_strings[0]}: {action.help}"
    if "--method" in flags:
        method_help = " ".join(next(a.help for a in parser._actions if "--method" in a.option_strings).split())
        missing = [m for m in method_names() if m not in method_help and "python -m dleaf methods" not in method_help]
        assert not missing, f"{name}: --method help omits {missing}"


def test_dash_aliases_parse_like_the_underscore_flags():
    parser = parser_of("premise_check.py")
    a = parser.parse_args(["--run-dir", "r", "--n-bootstrap", "5", "--output-dir", "o", "--batch-size", "2"])
    b = parser.parse_args(["--run_dir", "r", "--n_bootstrap", "5", "--output_dir", "o", "--batch_size", "2"])
    assert a == b and a.n_bootstrap == 5
    (ev,) = parser_of("evaluate.py").parse_args_into_dataclasses(["--max-new-tokens", "3", "--knob", "gamma=0.3",
                                                                   "--knob", "kappa=1", "--no-progress"])
    assert ev.max_new_tokens == 3 and not ev.progress and ev.knob_values() == {"gamma": 0.3, "kappa": 1}


def _help_of(name, capsys):
    main = runpy.run_path(str(ROOT / "scripts" / name), run_name="script")["main"]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_accepts_dash_aliases(name, capsys):
    help_text = _help_of(name, capsys)
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", help_text.split("\noptions:", 1)[1]))  # not the examples
    missing = sorted(f for f in flags if "_" in f and f.replace("_", "-") not in flags)
    assert missing == [], f"{name}: no dash alias for {missing}"
    assert "--checkpoint" not in flags
