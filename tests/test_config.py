"""The method configurations by name (dleaf/config.py): validation, names that fix fields."""

import pytest

from dleaf.config import DLeafConfig, PAIConfig, SPINConfig, method_config


def test_configs_validate_their_knobs():
    with pytest.raises(ValueError, match="gamma"):
        DLeafConfig(gamma=1.5)
    with pytest.raises(ValueError, match="threshold"):
        DLeafConfig(threshold="cross_layer")
    with pytest.raises(ValueError, match="layer_end"):
        DLeafConfig(layer_start=3, layer_end=2)
    with pytest.raises(ValueError, match="fusion_target"):
        DLeafConfig(fusion_target="worst")
    with pytest.raises(ValueError, match="keep_ratio"):
        SPINConfig(keep_ratio=0)
    with pytest.raises(ValueError, match="alpha"):
        PAIConfig(alpha=-1)
    with pytest.raises(ValueError, match="unknown method"):
        method_config("opera")
    with pytest.raises(ValueError, match="no knob"):
        method_config("pai", gamma=0.5)
    assert method_config("no_localization").localization == "everywhere"
