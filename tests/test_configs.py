"""Every preset in configs/ loads and only sets fields the entry point has."""
import glob
import os

import pytest
from absl import flags

from easytune import config as config_lib
from easytune.train_sft import DEFAULTS, DOCS

PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_preset_is_valid(preset):
    values = flags.FlagValues()
    config_lib.define_flags(DEFAULTS, DOCS, flag_values=values)
    values(["prog", f"--config={preset}"])
    cfg = config_lib.read_config(DEFAULTS, flag_values=values)
    assert set(cfg.keys()) == set(DEFAULTS)


def test_unknown_preset_field_is_an_error(tmp_path):
    preset = tmp_path / "bad.py"
    preset.write_text("def get_config():\n    return {'optimizer': {'learning_rate': 1e-4}}\n")
    values = flags.FlagValues()
    config_lib.define_flags(DEFAULTS, DOCS, flag_values=values)
    values(["prog", f"--config={preset}"])
    with pytest.raises(ValueError, match="unknown field 'optimizer.learning_rate'"):
        config_lib.read_config(DEFAULTS, flag_values=values)
