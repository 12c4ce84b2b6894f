from fcit.config import PRESETS, load_config


def test_overrides_never_leak_into_presets():
    before = repr(PRESETS)
    load_config(preset="smoke", overrides={"scenario.stages": 1, "data.synth.n_train": 11})
    assert repr(PRESETS) == before
    assert load_config(preset="smoke").scenario.stages == 2
