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


def test_equals_form_keeps_dashes_in_the_value():
    from recipe.config import parse_overrides

    values = parse_overrides(["--hub-model-id=my-org/my-run", "--output_dir", "/tmp/a-b", "--run-name=x-y"])
    assert values == {"hub_model_id": "my-org/my-run", "output_dir": "/tmp/a-b", "run_name": "x-y"}


def test_no_token_in_the_resume_hint_in_any_argument_form():
    from recipe.stopping import resume_hint

    hint = resume_hint(
        ["--hub_token=hf_one", "--hub-token", "hf_two", "--hub-token=hf_three", "--max_steps", "5"], 1
    )
    assert "hf_" not in hint.replace("--hub_token", "").replace("--hub-token", "")
    assert hint.count("<your token>") == 3 and "--max_steps 5" in hint


def test_remote_code_runs_only_when_asked(monkeypatch, tiny_gpt, tmp_path):
    from transformers import AutoModelForCausalLM

    import recipe.run_setup as train

    # Our own folder loads without remote code: `import recipe` registers the model.
    tiny_gpt().save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).config.model_type
    seen = []
    real = train.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        train.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: seen.append(k) or real(*a, **k)
    )
    tok = type("Tok", (), {"__len__": lambda self: 97})()
    for argv in ([], ["--trust_remote_code", "true"]):
        train.build_model(load_config(["--model_name_or_path", str(tmp_path), *argv]), tok)
    assert [k["trust_remote_code"] for k in seen] == [False, True]


def test_an_unset_hub_private_repo_keeps_the_namespace_default(monkeypatch):
    import recipe.hub as hub

    calls = []

    class Api:
        def whoami(self):
            return {"name": "tester"}

        def create_repo(self, repo_id, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(hub, "make_api", lambda token=None: Api())
    for argv in ([], ["--hub_private_repo", "true"], ["--hub_private_repo", "false"]):
        hub.HubPusher.from_config(load_config(["--output_dir", "/tmp/x", *argv]), log=lambda m: None)
    assert [c["private"] for c in calls] == [None, True, False]


def test_auto_resume_with_push_needs_the_checkpoint_strategy():
    """Only hub_strategy checkpoint pushes last-checkpoint/: with another, auto would start a new machine
    afresh and push over the run."""
    with pytest.raises(ConfigError, match="needs hub_strategy checkpoint"):
        load_config(["--resume_from_checkpoint", "auto", "--push_to_hub", "true"])
    load_config(["--resume_from_checkpoint", "auto", "--push_to_hub", "true", "--hub_strategy", "checkpoint"])
    load_config(["--resume_from_checkpoint", "auto"])  # local checkpoints only
