"""Tests for dleaf.cli: knob parsing, the parser convention (dash aliases, errors, help), fail/done/main."""

import pytest

from dleaf import cli
from dleaf.io import InputError


def test_parse_knobs_reads_yaml_scalars():
    assert cli.parse_knobs(["gamma=0.3", "warmup=4", "liae_normalize=false", "layer_end=none", "threshold=best",
                            "kappa=1e-3", "margin=-2", "seed=~", "name=a=b"]) == {
        "gamma": 0.3, "warmup": 4, "liae_normalize": False, "layer_end": None, "threshold": "best", "kappa": 0.001,
        "margin": -2, "seed": None, "name": "a=b"}
    assert cli.parse_knobs([]) == {} and cli.parse_knobs(None) == {}
    assert isinstance(cli.parse_knobs(["x=1"])["x"], int)
    assert cli.parse_knobs(["x=nan"])["x"] == "nan"  # not a finite number: stays a word, refused by a number knob


@pytest.mark.parametrize("bad, message", [
    (["gamma"], "not of the form name=value"),
    (["=3"], "is not a knob name"),
    (["gamma=0.1", "gamma=0.2"], "given twice"),
    (["gamma=[1, 2]"], "one value"),
    (["gamma={a: 1}"], "one value"),
    (["gamma=.inf"], "finite"),
    (["gamma=: x"], "not a valid value"),
])
def test_parse_knobs_errors(bad, message):
    with pytest.raises(InputError, match=message):
        cli.parse_knobs(bad)


def test_parser_dash_aliases_errors_and_help(capsys):
    ap = cli.ArgumentParser(prog="x", description="Line one.\n\n    example --a 1\n    example --b 2\n")
    cli.add_common_arguments(ap, output_dir="runs/x", method=True, seed=0, progress=True)
    ap.add_argument("--max_new_tokens", type=int, default=5, help="token limit (default: 5)")
    args = ap.parse_args(["--output-dir", "o", "--max-new-tokens", "3", "--knob", "a=1", "--knob", "b=2",
                          "--no-progress"])
    assert (args.output_dir, args.max_new_tokens, args.knob, args.progress) == ("o", 3, ["a=1", "b=2"], False)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--max_new_tokens", "three"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --max_new_tokens") and "usage" not in err
    help_text = ap.format_help()
    assert "    example --a 1\n    example --b 2" in help_text  # examples keep their lines
    assert help_text.count("default: 5") == 1  # a default the help states is not repeated
    assert "(default: runs/x)" in help_text and "--output-dir" in help_text
    assert "random seed (default: 0)" in " ".join(help_text.split())


def test_dataclass_parser_has_the_convention(capsys):
    import dataclasses

    @dataclasses.dataclass
    class A:
        batch_size: int = 4
        progress: bool = dataclasses.field(default=True, metadata={"help": "show a progress bar"})

    parser = cli.dataclass_parser(A, prog="y")
    (a,) = parser.parse_args_into_dataclasses(["--batch-size", "2", "--no_progress"])
    assert a == A(2, False)
    assert "turn off --progress" in parser.format_help()
    with pytest.raises(SystemExit) as e:
        parser.parse_args_into_dataclasses(["--batch_size", "x"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_fail_done_and_main(capsys):
    with pytest.raises(SystemExit) as e:
        cli.fail("no such file: x")
    assert e.value.code == 2 and capsys.readouterr().err == "error: no such file: x\n"
    cli.done("runs/a", "runs/b")
    assert capsys.readouterr().out == "outputs: runs/a, runs/b\n"
    assert cli.last_line("r", what="report") == "report: r"

    def bad(argv):
        raise InputError("--limit must be positive")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.main(bad, []) == 2 and capsys.readouterr().err == "error: --limit must be positive\n"
    assert cli.main(interrupted, []) == 130
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    assert cli.main(interrupted, [], resumable=False) == 130 and "resume" not in capsys.readouterr().err
    assert cli.main(lambda argv: None, []) == 0


def test_threads_and_output_dir(tmp_path):
    with pytest.raises(InputError, match="positive"):
        cli.set_threads(0)
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        cli.check_output_dir(tmp_path / "f")
    assert cli.check_output_dir(tmp_path / "new") == tmp_path / "new"
