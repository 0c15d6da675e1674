"""What a new user meets first, each as a tester reproduced it: a resume whose input files changed under the same
name (refused, not silently resumed), an output folder that cannot be written (refused before any work, in every
script), a model that is not there (one error line, nothing written, and the corrected command into the same
folder then works). Every script is run in-process through its ``main`` (as ``python scripts/X.py`` runs it)."""

import hashlib
import json
import runpy
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dleaf import cli

ROOT = Path(__file__).resolve().parents[1]
MISSING_MODEL = "llava-hf/nonexistent-model-7b"


def call(name, *args):
    """Run ``scripts/<name>`` in-process as its ``__main__`` block does; returns the exit status."""
    main = runpy.run_path(str(ROOT / "scripts" / name), run_name="script")["main"]
    argv = [str(a) for a in args]
    try:
        if name == "bench.py":  # bench.py calls main() directly (argparse errors exit)
            main(argv)
            return 0
        return cli.main(main, argv)
    except SystemExit as e:
        return e.code


def refused(capsys, code, *words):
    """The run ended with status 2 and one ``error:`` line holding ``words``, without a traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture()
def no_loading(monkeypatch):
    """Any model load fails the test: the input was not checked first."""
    from dleaf import models

    def load(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load", load)


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """The hub offline, with an empty cache."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def _pope(folder: Path, flip: bool = False) -> Path:
    """A POPE question file named A.jsonl in ``folder`` (``flip``: other questions, the labels reversed)."""
    folder.mkdir(parents=True, exist_ok=True)
    qs = [(1, "a.png", "Is there a dog in the image?", "yes"), (2, "a.png", "Is there a cat in the image?", "no"),
          (3, "b.png", "Is there a car in the image?", "yes"), (4, "b.png", "Is there a bus in the image?", "no")]
    path = folder / "A.jsonl"
    path.write_text("".join(json.dumps({"question_id": q, "image": i, "text": t.replace("image", "picture") if flip
                                        else t, "label": {"yes": "no", "no": "yes"}[lab] if flip else lab}) + "\n"
                            for q, i, t, lab in qs))
    return path


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(("a.png", "b.png", "unused.png")):
        Image.new("RGB", (16, 16), (10 + 60 * k, 120, 200)).save(folder / name)
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# 1. A resume whose inputs changed is refused; what a run depends on is recorded
# ---------------------------------------------------------------------------------------------------------------


def test_a_resume_with_a_changed_question_file_or_image_is_refused(tmp_path, capsys):
    images = _images(tmp_path / "images")
    first = _pope(tmp_path / "v1")
    run = tmp_path / "R"
    common = ["--benchmark", "pope_file", "--pope_images", images, "--max_new_tokens", "1", "--no_progress",
              "--output_dir", run]
    assert call("evaluate.py", *common, "--pope_files", first) == 0
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    inputs = config["inputs"]
    assert [f["sha256"] for f in inputs["pope_files"]] == [_sha(first)]
    assert inputs["pope_images"]["files"] == 2  # the images the questions use, not the whole folder
    before = {p: (run / p).read_bytes() for p in ("config.json", "generations.jsonl", "metrics.json")}

    # another file of the same name, other questions and labels: refused, nothing lost
    other = _pope(tmp_path / "v2", flip=True)
    refused(capsys, call("evaluate.py", *common, "--pope_files", other), "--pope_files", str(other), "differ")
    assert {p: (run / p).read_bytes() for p in before} == before

    # a used image changed: refused, naming the image folder
    Image.new("RGB", (16, 16), (0, 0, 0)).save(images / "a.png")
    refused(capsys, call("evaluate.py", *common, "--pope_files", first), "--pope_images", "differ")
    assert {p: (run / p).read_bytes() for p in before} == before
    _images(images)  # restored

    # an image no question uses may change, and the same file at another path resumes: the hashes decide
    Image.new("RGB", (16, 16), (0, 0, 0)).save(images / "unused.png")
    copy = tmp_path / "elsewhere" / "A.jsonl"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    assert call("evaluate.py", *common, "--pope_files", copy) == 0
    assert "resuming" in capsys.readouterr().err
    assert (run / "generations.jsonl").read_bytes() == before["generations.jsonl"]


def test_a_resume_with_a_changed_coco_annotation_file_is_refused(tmp_path, capsys, write_coco):
    import os

    from dleaf.resources import data_root

    img_dir, inst, caps = write_coco(tmp_path)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("3\n1\n")
    protocol = tmp_path / "coco_fixture.yaml"
    protocol.write_text((ROOT / "data/protocols/coco_chair.yaml").read_text().replace(
        "file: coco/chair_val2014_ids.txt", f"file: {os.path.relpath(ids_file, data_root())}"))
    run = tmp_path / "R"
    common = ["--benchmark", "coco_chair", "--protocol", protocol, "--coco_images", img_dir, "--coco_instances", inst,
              "--coco_captions", caps, "--max_new_tokens", "1", "--no_progress", "--output_dir", run]
    assert call("evaluate.py", *common) == 0
    capsys.readouterr()
    inputs = json.loads((run / "config.json").read_text())["inputs"]
    assert inputs["coco_instances"]["sha256"] == _sha(inst) and inputs["coco_captions"]["sha256"] == _sha(caps)
    assert inputs["coco_images"]["files"] == 2  # images 3 and 1 of the id list, not image 2
    data = json.loads(caps.read_text())
    data["annotations"][0]["caption"] = "A cat sitting under a table."
    caps.write_text(json.dumps(data))
    refused(capsys, call("evaluate.py", *common), "--coco_captions", "differ")


def test_a_resume_with_another_adapter_under_the_same_path_is_refused(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(ROOT / "data" / "organism_dpo", adapter)
    run = tmp_path / "R"
    common = ["--benchmark", "organism_caption", "--splits", "adversarial", "--limit", "1", "--max_new_tokens", "1",
              "--no_progress", "--adapter", adapter, "--output_dir", run]
    assert call("evaluate.py", *common) == 0
    capsys.readouterr()
    assert json.loads((run / "config.json").read_text())["inputs"]["adapter"]["sha256"]
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    refused(capsys, call("evaluate.py", *common), "--adapter", "differ")


def test_a_study_rerun_with_a_changed_question_file_is_refused(tmp_path, monkeypatch):
    from dleaf import eval as harness
    from dleaf import study

    monkeypatch.setattr(study, "CHECKPOINT_BENCHMARKS", ("pope_file",))  # one benchmark, one setting: fast
    monkeypatch.setattr(study, "SETTINGS", study.SETTINGS[:1])
    questions = _pope(tmp_path / "pope")
    cfg = study.StudyConfig(model=str(ROOT / "data" / "organism"), coco_images=str(tmp_path), coco_instances="i.json",
                            pope_files=(str(questions),), pope_images=str(_images(tmp_path / "images")), n_images=1,
                            correspondence=False)
    study.run_evaluations(tmp_path / "study", cfg, progress=False, say=lambda m: None)
    _pope(tmp_path / "pope", flip=True)  # the same file name, other questions: the finished setting is not reused
    with pytest.raises(cli.InputError, match=r"other inputs \(--pope_files .*A.jsonl: its content differs"):
        study.run_evaluations(tmp_path / "study", cfg, progress=False, say=lambda m: None)
    _pope(tmp_path / "pope")
    monkeypatch.setattr(harness, "load_model", lambda *a, **k: pytest.fail("a finished setting was run again"))
    assert list(study.run_evaluations(tmp_path / "study", cfg, progress=False, say=lambda m: None)) == [
        ("pope_file", "greedy")]


# ---------------------------------------------------------------------------------------------------------------
# 2. An output folder that cannot be written is refused with the other inputs, in every script
# ---------------------------------------------------------------------------------------------------------------


def _script_cases(tmp: Path):
    out = tmp / "a_file" / "sub"  # under a file: it can never be created
    recipe = ROOT / "scripts" / "recipes" / "dpo_organism.yaml"
    return {
        "evaluate": ("evaluate.py", "--benchmark", "organism_caption", "--limit", "1", "--max_new_tokens", "1",
                     "--output_dir", out),
        "evaluate_table": ("evaluate.py", "--compare", ROOT / "runs" / "none", "--table_out", out / "t.md"),
        "evaluate_ids": ("evaluate.py", "--write_coco_ids", out / "ids.txt", "--coco_instances", tmp / "inst.json"),
        "run_dleaf": ("run_dleaf.py", "--max_new_tokens", "2", "--output_dir", out),
        "correspondence": ("correspondence.py", "--n_pairs", "3", "--output_dir", out),
        "premise_check": ("premise_check.py", "--run_dir", tmp / "run", "--output_dir", out),
        "study": ("study.py", "--limit", "1", "--no_correspondence", "--output_dir", out),
        "fault_benchmark": ("fault_benchmark.py", "--limit", "1", "--output_dir", out),
        "organism_grid": ("organism_grid.py", "--limit", "1", "--output_dir", out),
        "profile_organism": ("profile_organism.py", "--limit", "1", "--output_dir", out),
        "train_organism": ("train_organism.py", "--output_dir", out),
        "train_dpo": ("train_dpo.py", "--config", recipe, "--output_dir", out),
        "bench_out": ("bench.py", "--output_dir", out),
        "bench_markdown": ("bench.py", "--markdown", out / "bench.md"),
    }


CASES = tuple(_script_cases(Path("/x")))


@pytest.mark.parametrize("case", CASES)
def test_an_output_folder_under_a_file_is_refused_before_any_work(case, tmp_path, capsys, monkeypatch, no_loading,
                                                                   write_coco):
    from dleaf import bench
    from dleaf.organism import train

    def no_work(*a, **k):
        raise AssertionError("the work started before the output folder was checked")

    for module, name in ((bench, "run_benchmark"), (bench, "run_memory_only"), (train, "train")):
        monkeypatch.setattr(module, name, no_work)
    (tmp_path / "a_file").write_text("not a folder")
    _, inst, _ = write_coco(tmp_path, with_images=False)
    inst.rename(tmp_path / "inst.json")
    if case == "premise_check":  # a finished greedy caption run to check
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text("{}")
    name, *args = _script_cases(tmp_path)[case]
    refused(capsys, call(name, *args), str(tmp_path / "a_file"), "is a file")
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_the_output_folder_check(tmp_path, monkeypatch):
    new = tmp_path / "new" / "deeper"
    assert cli.check_output_dir(new) == new and not (tmp_path / "new").exists()  # checked, not created
    (tmp_path / "f").write_text("x")
    with pytest.raises(cli.InputError, match=r"--output_dir .*f is a file, not a folder"):
        cli.check_output_dir(tmp_path / "f")
    with pytest.raises(cli.InputError, match=r"cannot be created: .*f is a file, not a folder"):
        cli.check_output_dir(tmp_path / "f" / "g" / "h")
    with pytest.raises(cli.InputError, match=r"--out .*f/x.json cannot be written: .*f is a file"):
        cli.check_output_file(tmp_path / "f" / "x.json", "--out")
    with pytest.raises(cli.InputError, match=r"--out .* is a folder"):
        cli.check_output_file(tmp_path, "--out")
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # tmp_path read-only
    with pytest.raises(cli.InputError, match=r"cannot be created: .* is not writable"):
        cli.check_output_dir(new)
    with pytest.raises(cli.InputError, match=r"is not writable"):
        cli.check_output_dir(tmp_path)


def test_the_corrected_output_folder_works(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    args = ["--benchmark", "organism_caption", "--splits", "adversarial", "--limit", "1", "--max_new_tokens", "1",
            "--no_progress"]
    refused(capsys, call("evaluate.py", *args, "--output_dir", tmp_path / "a_file" / "run"), "is a file")
    assert call("evaluate.py", *args, "--output_dir", tmp_path / "run") == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"outputs: {tmp_path / 'run'}"
    # the organism's benchmarks read no file: their record stays what it was, machine-independent
    assert json.loads((tmp_path / "run" / "config.json").read_text())["inputs"] == {}


# ---------------------------------------------------------------------------------------------------------------
# 3. A model that is not there: one error line, nothing written, the corrected command then works
# ---------------------------------------------------------------------------------------------------------------


def test_a_hub_model_missing_offline_is_one_error_line_and_writes_nothing(tmp_path, capsys, offline, write_pope):
    questions, images = write_pope(tmp_path)
    run = tmp_path / "R"
    args = ["--benchmark", "pope_file", "--pope_files", questions, "--pope_images", images, "--limit", "2",
            "--max_new_tokens", "1", "--no_progress", "--output_dir", run]
    refused(capsys, call("evaluate.py", *args, "--model", MISSING_MODEL), MISSING_MODEL, "offline")
    assert files_in(run) == []
    assert call("evaluate.py", *args, "--model", "organism") == 0  # the corrected command, into the same folder
    capsys.readouterr()

    image = images / "a.jpg"
    one = tmp_path / "one"
    refused(capsys, call("run_dleaf.py", "--model", MISSING_MODEL, "--image", image, "--output_dir", one),
            MISSING_MODEL, "offline")
    assert files_in(one) == []
    study = tmp_path / "study"
    refused(capsys, call("study.py", "--model", MISSING_MODEL, "--coco_images", images, "--coco_instances",
                         tmp_path / "i.json", "--pope_files", questions, "--pope_images", images,
                         "--no_correspondence", "--output_dir", study), MISSING_MODEL, "offline")
    assert files_in(study) == []
    dpo = tmp_path / "dpo"
    refused(capsys, call("train_dpo.py", "--config", ROOT / "scripts" / "recipes" / "dpo_organism.yaml",
                         "--model_name_or_path", MISSING_MODEL, "--output_dir", dpo), MISSING_MODEL, "offline")
    assert files_in(dpo) == []


def test_a_model_folder_that_does_not_load_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no model type, no processor files
    run = tmp_path / "R"
    args = ["--benchmark", "organism_caption", "--splits", "adversarial", "--limit", "1", "--max_new_tokens", "1",
            "--no_progress", "--output_dir", run]
    line = refused(capsys, call("evaluate.py", *args, "--model", broken), str(broken), "could not be loaded")
    assert len(line) < 600
    assert files_in(run) == []
    assert call("evaluate.py", *args) == 0  # the corrected command (the organism), into the same folder


def test_the_model_check(monkeypatch, offline, tmp_path):
    import huggingface_hub.constants as constants

    from dleaf import models

    with pytest.raises(cli.InputError, match=f"--model {MISSING_MODEL}: not in the Hugging Face cache.*offline"):
        models.check_model(MISSING_MODEL)
    with pytest.raises(cli.InputError, match="model folder not found"):
        models.check_model(tmp_path / "no" / "such" / "model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert models.check_model(MISSING_MODEL) == MISSING_MODEL  # online: the loader finds out (and says so)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cached = Path(constants.HF_HUB_CACHE) / "models--owner--cached"  # a cached hub model passes offline
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("abc")
    (cached / "snapshots" / "abc").mkdir(parents=True)
    (cached / "snapshots" / "abc" / "config.json").write_text("{}")
    assert models.check_model("owner/cached") == "owner/cached"
