import pytest

from raytrain.config import load_config, presets
from raytrain.errors import ConfigError


def test_presets_load_and_resolve():
    assert {"demo", "tiny"} <= set(presets())
    config = load_config("demo")
    assert config.data.prepare.seq_len == 128
    assert config.data.source.inputs == ["stdlib"]


def test_overrides_are_typed():
    config = load_config("tiny", ["data.prepare.seq_len=64", "data.prepare.val_fraction=0",
                                  "data.source.inputs=[a, b]", "runtime.address=auto"])
    assert config.data.prepare.seq_len == 64
    assert config.data.prepare.val_fraction == 0.0 and isinstance(config.data.prepare.val_fraction, float)
    assert config.data.source.inputs == ["a", "b"]
    assert config.runtime.address == "auto"


def test_single_string_becomes_list():
    assert load_config(None, ["data.source.inputs=corpus"]).data.source.inputs == ["corpus"]


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError, match=r"'data.prepare.seq_lne'.*did you mean 'data.prepare.seq_len'"):
        load_config(None, ["data.prepare.seq_lne=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'data.prepare.seq_len' must be int, got str"):
        load_config(None, ["data.prepare.seq_len=long"])
    with pytest.raises(ConfigError, match=r"'data.source.skip_bad_records' must be bool"):
        load_config(None, ["data.source.skip_bad_records=3"])


def test_literal_lists_choices():
    with pytest.raises(ConfigError, match="choose one of: debug, info, warning, error"):
        load_config(None, ["runtime.log_level=loud"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.prepare.seq_len=1", "seq_len' is 1; it must be >= 2"),
        ("data.tokenizer.vocab_size=100", "vocab_size' is 100; it must be at least 263"),
        ("data.prepare.val_fraction=1.5", "val_fraction' is 1.5"),
    ],
)
def test_value_checks(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_file_and_bad_yaml(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("data:\n  prepare:\n    seq_len: 77\n")
    assert load_config(str(good)).data.prepare.seq_len == 77
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  prepare: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="neither a config file nor a preset; presets: demo"):
        load_config("nosuchpreset")


def test_resolved_config_round_trips(tmp_path):
    config = load_config("tiny", ["data.prepare.seed=7"])
    config.save(tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == config
