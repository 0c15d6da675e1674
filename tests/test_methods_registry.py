"""The method registry (dleaf/methods/base.py, dleaf/config.py, dleaf/__main__.py): every listing derives from it,
and a method is added by one new file."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dleaf import __main__ as cli
from dleaf import bench, config, methods
from dleaf.methods.dleaf import DLeaf, DLeafConfig

ROOT = Path(__file__).resolve().parents[1]


def test_every_listing_comes_from_the_registry():
    names = methods.method_names()
    assert names[:5] == ["dleaf", "dleaf_learned", "no_localization", "random_layers", "random_target"]
    assert {"pai", "spin", "vcd"} <= set(names)
    assert list(config.METHODS) == names and len(config.METHODS) == len(names)
    assert config.METHODS["no_localization"] == (DLeafConfig, {"localization": "everywhere"})
    assert set(names) <= set(bench.config_names())
    assert methods.method_for(DLeafConfig()) is DLeaf
    described = {m["name"]: m for m in config.describe_methods()}
    knobs = {k["name"]: k for k in described["dleaf"]["knobs"]}
    assert set(knobs) == {f.name for f in dataclasses.fields(DLeafConfig)}
    assert knobs["gamma"]["default"] == 0.5 and "fusion strength" in knobs["gamma"]["help"]
    assert "localization" not in {k["name"] for k in described["no_localization"]["knobs"]}  # fixed by the name
    assert all(k["help"] for m in described.values() for k in m["knobs"]), "every knob documents itself"
    with pytest.raises(ValueError, match="unknown method 'opera'; valid methods are dleaf, dleaf_learned, no_localization"):
        config.method_config("opera")
    with pytest.raises(TypeError, match="no method runs"):
        methods.method_for(object())


def test_a_name_sets_defaults_that_knobs_override():
    """``dleaf_learned`` fixes the localization and sets gamma and the detector by default; a knob overrides a
    default but not a fixed field, and the listing shows the name's defaults."""
    cfg = config.method_config("dleaf_learned")
    assert (cfg.localization, cfg.gamma, cfg.detector, cfg.detector_threshold) == ("learned", 1.0, "organism", None)
    assert config.method_config("dleaf").gamma == 0.5  # the paper's reading keeps its own defaults
    assert config.method_config("dleaf_learned", gamma=0.25).gamma == 0.25
    with pytest.raises(ValueError, match="fixes localization='learned'"):
        config.method_config("dleaf_learned", localization="threshold")
    knobs = {k["name"]: k for k in {m["name"]: m for m in config.describe_methods()}["dleaf_learned"]["knobs"]}
    assert knobs["gamma"]["default"] == 1.0 and knobs["detector"]["default"] == "organism"
    assert "localization" not in knobs
    text = config.format_methods()
    assert "    defaults: gamma=1.0, detector='organism'" in text
    with pytest.raises(ValueError, match="detector_threshold must be a probability"):
        config.method_config("dleaf_learned", detector_threshold=1.5)
    with pytest.raises(TypeError, match="both fixes and defaults"):
        methods.register("x", "x", fixed={"gamma": 1.0}, defaults={"gamma": 0.5})(DLeaf)


def test_python_m_dleaf_methods_lists_every_method_with_its_knobs(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in methods.method_names():
        assert f"\n{name}  " in out
    assert "    gamma = 0.5  (float)  fusion strength" in out and "    alpha = 0.2  (float)" in out
    assert cli.main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == methods.method_names()


def test_a_method_is_added_by_one_new_file(tmp_path):
    """Copy the package, add one file with a config class and a method, and nothing else: the new method is listed,
    chosen by name, attached, and measured by the benchmark's configuration lookup."""
    shutil.copytree(ROOT / "dleaf", tmp_path / "dleaf", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "dleaf" / "methods" / "halve.py").write_text('''
import dataclasses

import torch

from .base import Method, MethodConfig, register


@dataclasses.dataclass(frozen=True)
class HalveConfig(MethodConfig):
    """Halve: scale every watched layer's attention output by factor.

    Knobs:
        factor: the scale of the attention outputs
        layer_start: first layer
        layer_end: one past the last layer (None: the last)
    """

    factor: float = 0.5
    layer_start: int = 0
    layer_end: int | None = None


@register("halve", "scale the attention outputs of the watched layers")
class Halve(Method):
    config_class = HalveConfig

    def attend(self, call):
        weights = call.weights()
        return call.finish(torch.matmul(weights, call.values()) * self.config.factor, weights)
''')
    script = '''
import torch
from dleaf import bench, config, engine
from dleaf.organism import build
assert "halve" in config.METHODS and "halve" in bench.config_names()
assert config.method_config("halve", factor=0.25).factor == 0.25
shape = build.OrganismShape(text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64)
model = build.build_model(build.build_processor(shape).tokenizer, shape, seed=0).eval()
model.set_attn_implementation("eager")
ids = torch.tensor([[1, model.config.image_token_id, 5, 6]])
with torch.no_grad():
    plain = model(input_ids=ids).logits
    with engine.attached(model, "halve", factor=1.0):
        assert torch.equal(model(input_ids=ids).logits, plain)
    with engine.attached(model, "halve"):
        assert not torch.equal(model(input_ids=ids).logits, plain)
from dleaf import __main__
__main__.main(["methods"])  # what python -m dleaf methods prints
print("ok")
'''
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    assert "\nhalve  scale the attention outputs" in run.stdout and "factor = 0.5" in run.stdout
