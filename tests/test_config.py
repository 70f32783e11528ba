"""The run configuration: YAML + --key value, coercion by field type, clear errors naming the key."""

import pytest

from recipe.config import ConfigError, RunConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads 3e-4 as the string "3e-4": the field's type decides.
    cfg = load_config(["--config", write(tmp_path, "learning_rate: 3e-4\nmax_steps: 7\n")])
    assert cfg.learning_rate == pytest.approx(3e-4) and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 7


def test_command_line_overrides_yaml(tmp_path):
    path = write(tmp_path, "max_steps: 7\nbias: true\n")
    cfg = load_config(
        [
            "--config",
            path,
            "--max_steps",
            "9",
            "--bias=false",
            "--train_files",
            "a.txt,b/*.txt",
            "--intermediate_size",
            "none",
        ]
    )
    assert (cfg.max_steps, cfg.bias, cfg.intermediate_size) == (9, False, None)
    assert cfg.train_files == ["a.txt", "b/*.txt"]


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match="'learning_rat'.*did you mean 'learning_rate'"):
        load_config(["--learning_rat", "1"])
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(["--config", write(tmp_path, "batch_sise: 4\n")])


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("max_steps", "ten", "max_steps expects an integer"),
        ("max_steps", "2.5", "max_steps expects an integer"),
        ("learning_rate", "fast", "learning_rate expects a number"),
        ("bias", "maybe", "bias expects true or false"),
        ("mixed_precision", "fp8", "mixed_precision must be one of"),
        ("max_steps", "0", "max_steps must be a positive"),
        ("dropout", "-0.1", "dropout"),
        ("num_attention_heads", "3", "divisible by num_attention_heads"),
    ],
)
def test_bad_values_name_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config([f"--{key}", value])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="mapping"):
        load_config(["--config", write(tmp_path, "- a\n- b\n")])


def test_saved_config_loads_back(tmp_path):
    cfg = load_config(["--learning_rate", "2e-4", "--train_files", "x.txt"])
    cfg.save(tmp_path / "run.yaml")
    again = load_config(["--config", str(tmp_path / "run.yaml")])
    assert again == cfg and isinstance(again, RunConfig)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config(["--config", "whatever.yaml", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("learning_rate", "per_device_train_batch_size", "resume_from_checkpoint", "train_files"):
        assert f"--{key} " in out
