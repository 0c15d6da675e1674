"""Tests for dleaf.settings.Setting: validation against the method registry, typed knobs, records."""

import dataclasses

import pytest

from dleaf import config
from dleaf.cli import parse_knobs
from dleaf.io import InputError
from dleaf.settings import Setting, method_names, setting


def test_every_method_accepts_its_own_defaults_and_records_round_trip():
    assert set(method_names()) == set(config.METHODS)
    for name in method_names():
        cfg = config.method_config(name)
        knobs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                 if f.name not in config.METHODS[name][1]}
        s = Setting(name, knobs)
        assert s.config() == cfg
        assert Setting.from_record(s.record()) == s
        assert Setting(name, parse_knobs(s.knob_args())) == s  # as --knob arguments, read back


def test_knob_args_spell_none_booleans_and_numbers_for_the_knob_parser():
    s = Setting("dleaf", {"gamma": 0.25, "liae_normalize": False, "layer_end": None, "warmup": 3,
                          "threshold": "best"})
    args = s.knob_args()
    assert "gamma=0.25" in args and "liae_normalize=false" in args and "layer_end=none" in args
    assert "warmup=3" in args and "threshold=best" in args
    assert Setting("dleaf", parse_knobs(args)) == s


@pytest.mark.parametrize("method, knobs, message", [
    ("dleaf", {"gama": 0.3}, "no knob.*gama"),
    ("dleaf", {"gamma": "abc"}, "gamma='abc' must be a number"),
    ("dleaf", {"gamma": 1.5}, "gamma must lie in"),
    ("dleaf", {"warmup": 2.5}, "must be an integer"),
    ("dleaf", {"warmup": True}, "must be an integer"),
    ("dleaf", {"liae_normalize": 1}, "true or false"),
    ("dleaf", {"threshold": 3}, "must be a word"),
    ("dleaf", {"threshold": "worst"}, "threshold must be one of"),
    ("dleaf", {"gamma": None}, "cannot be none"),
    ("random_layers", {"localization": "threshold"}, "fixes localization"),
    ("greedy", {"gamma": 0.3}, "method is greedy"),
    ("dleef", {}, "unknown method 'dleef'"),
])
def test_bad_methods_and_knobs_are_input_errors(method, knobs, message):
    with pytest.raises(InputError, match=message):
        Setting(method, knobs)


def test_knob_types_follow_the_configuration():
    s = Setting("dleaf", {"gamma": 1, "layer_end": None, "layer_start": 2})
    assert s.knob_dict == {"gamma": 1.0, "layer_end": None, "layer_start": 2}
    assert isinstance(s.knob_dict["gamma"], float)
    assert s == Setting("dleaf", {"layer_start": 2, "layer_end": None, "gamma": 1.0})  # order and int/float
    assert hash(s) == hash(Setting("dleaf", (("gamma", 1.0), ("layer_start", 2), ("layer_end", None))))
    assert s.config().gamma == 1.0 and s.config().layer_start == 2
    assert Setting().config() is None and not Setting().attaches


def test_decoding_strategies():
    assert Setting().generate_kwargs() == {"do_sample": False, "num_beams": 1}
    assert Setting().decoding() == {"strategy": "greedy"}
    beam = Setting(strategy="beam")
    assert beam.num_beams == 5 and beam.generate_kwargs() == {"do_sample": False, "num_beams": 5}
    assert beam.decoding() == {"strategy": "beam", "num_beams": 5}
    sample = Setting("pai", strategy="sample", temperature=0.7, top_p=0.9, seed=3)
    assert sample.generate_kwargs() == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    assert sample.decoding() == {"strategy": "sample", "temperature": 0.7, "top_p": 0.9, "seed": 3}
    assert sample.describe() == "pai, sample T=0.7 top_p=0.9" and sample.label == sample.describe()
    assert Setting.from_record({"method": "pai", "knobs": {}, "decoding": sample.decoding()}) == sample
    for kw, message in (({"strategy": "nucleus"}, "unknown decoding strategy"), ({"strategy": "beam", "num_beams": 1},
                        "num_beams >= 2"), ({"num_beams": 3}, "only applies"), ({"temperature": 0}, "temperature"),
                        ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed")):
        with pytest.raises(InputError, match=message):
            Setting(**kw)


def test_labels():
    assert setting("dleaf gamma=1", "dleaf", gamma=1.0).label == "dleaf gamma=1"
    assert Setting("dleaf", {"gamma": 0.3}).label == "dleaf (gamma=0.3)"
    assert Setting("dleaf", {"gamma": 0.3}, strategy="beam", num_beams=3).describe() == "dleaf (gamma=0.3), beam 3"
