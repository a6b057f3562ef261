"""One config system for every command: nested sections, one loader (YAML + --set + flags), one
strictness. Each bad input is an error that names the key, what is allowed and where it came from."""

import pytest

from sparselm import config
from sparselm.cli.main import main
from sparselm.config import ConfigError
from sparselm.training import FinetuneConfig, PretrainConfig, load_finetune_config, load_pretrain_config


def test_layers_defaults_preset_yaml_set_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  n_layer: 2\nsparsity:\n  target: 0.5\noptim:\n  lr: 3e-4\n  warmup_steps: 10\n")
    cfg = load_pretrain_config(path, ["optim.lr=1e-3", "model.n_embd=64"], {"optim.max_steps": 100, "run.seed": None})
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # --set wins over YAML, 1e-3 is a number
    assert cfg.optim.max_steps == 100 and cfg.optim.batch_size == 32  # flag, then the preset's default
    assert cfg.sparsity.target == 0.5 and cfg.run.seed == 1337  # YAML; a flag left as None is not given
    assert cfg.shape().n_layer == 2 and cfg.shape().n_embd == 64
    assert load_pretrain_config(path).optim.lr == 3e-4  # YAML's 3e-4 is a float, not PyYAML's string


def test_the_default_config_is_valid_for_every_preset():
    from sparselm.models import PRESETS

    for preset in PRESETS:
        cfg = load_pretrain_config(flags={"model.preset": preset})
        assert cfg.optim.max_steps >= 1 and cfg.optim.warmup_steps < cfg.optim.max_steps


@pytest.mark.parametrize("sets,match", [
    (["optim.lrr=1"], r"optim.lrr: unknown key \(--set\); did you mean optim.lr\?; keys of optim: batch_size, beta1, .*lr"),
    (["lr=1e-3"], r"lr: unknown key \(--set\); did you mean optim.lr\?"),
    (["warmup_steps=5"], r"did you mean optim.warmup_steps\?"),
    (["run.dtyp=float32"], r"did you mean run.dtype\?"),
    (["bogus=1"], "bogus: unknown key"),
    (["model=5"], "model: expected a section"),
    (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    (["optim.max_steps=2.5"], "optim.max_steps: expected int, got 2.5"),
    (["optim.max_steps=0"], r"optim.max_steps: 0 is out of range; allowed >= 1"),
    (["optim.lr=1000"], r"optim.lr: 1000.0 is out of range; allowed \(0.0, 1.0\]"),
    (["run.dtype=float64"], "run.dtype: 'float64' is not one of auto, float32, bfloat16, float16"),
    (["model.preset=huge"], "model.preset: 'huge' is not one of"),
    (["model.n_head=3"], "not divisible"),
    (["model.family=mamba"], "unknown model family 'mamba'"),
    (["sparsity.method=magic"], "sparsity.method: 'magic' is not one of .*gmp.*rigl"),
    (["sparsity.target=1.0"], r"sparsity.target: 1.0 is out of range; allowed \[0.0, 1.0\)"),
    (["sparsity.method=set", "sparsity.options.drop_fraction=-0.5"], r"drop_fraction: -0.5 is out of range; allowed \(0.0, 1.0\]"),
    (["sparsity.method=static", "sparsity.options.drop_fraction=0.3"], "sparsity.options.drop_fraction: unknown key"),
    (["sparsity.method=gmp", "sparsity.end=2"], r"sparsity.end: 2.0 is out of range; allowed \[0.0, 1.0\]"),
    (["sparsity.method=gmp", "sparsity.end=0.1"], "schedule .* has no update step"),
    (["sparsity.method=gmp", "sparsity.end=0.5", "sparsity.end_step=100"], "sparsity.end and sparsity.end_step both given"),
    (["sparsity.method=rigl", "sparsity.end_step=900"], "end_step=900 is after the last training step"),
    (["optim.warmup_steps=600"], "optim.warmup_steps=600 must be below optim.max_steps=500"),
])
def test_bad_values_name_the_key_and_what_is_allowed(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_pretrain_config(None, sets)


@pytest.mark.parametrize("max_steps,warmup", [(3, 0), (20, 2), (30, 3), (40, 4), (300, 30), (500, 50), (2000, 50)])
def test_the_presets_warmup_follows_a_smaller_step_budget(max_steps, warmup):
    # the tiny preset warms up over 50 of its 500 steps: a smaller --max-steps keeps that 10%, never refused
    cfg = load_pretrain_config(flags={"optim.max_steps": max_steps})
    assert cfg.optim.warmup_steps == warmup
    assert bool(cfg.notes) == (max_steps < 500)


def test_a_warmup_the_user_set_is_kept_or_refused_never_changed():
    assert load_pretrain_config(None, ["optim.warmup_steps=7"], {"optim.max_steps": 30}).optim.warmup_steps == 7
    with pytest.raises(ConfigError, match="warmup_steps=40 must be below optim.max_steps=30"):
        load_pretrain_config(None, ["optim.warmup_steps=40"], {"optim.max_steps": 30})
    with pytest.raises(ConfigError, match="the preset default; set --max-steps above"):
        load_pretrain_config(None, ["optim.warmup_steps=600"])


def test_a_scaled_warmup_follows_a_new_budget_on_resume():
    from sparselm.training.rundir import check_resume_config
    import json, tempfile, pathlib

    short, longer = (load_pretrain_config(flags={"optim.max_steps": n}).to_dict() for n in (30, 60))
    with tempfile.TemporaryDirectory() as d:
        saved = pathlib.Path(d) / "train_config.json"
        saved.write_text(json.dumps(short))
        check_resume_config(saved, longer, log=lambda *a: None)  # warm-up 3 -> 6 with the budget: allowed
        other = dict(short, optim=dict(short["optim"], warmup_steps=9))
        with pytest.raises(ValueError, match="optim.warmup_steps"):
            check_resume_config(saved, other, log=lambda *a: None)  # same budget, another warm-up: refused


def test_fractions_and_steps_are_different_fields():
    # an int in a fraction field is the same number as a float: end=1 is the end of training, not step 1
    cfg = load_pretrain_config(None, ["sparsity.method=rigl", "sparsity.target=0.5", "sparsity.end=1"])
    assert cfg.sparsity.end == 1.0 and cfg.sparsity.schedule(500).end_step == 499
    cfg = load_pretrain_config(None, ["sparsity.method=rigl", "sparsity.target=0.5", "sparsity.end_step=150"])
    assert cfg.sparsity.schedule(500).end_step == 150
    cfg = load_pretrain_config(None, ["sparsity.method=gmp", "sparsity.target=0.5"])  # the method's default span
    assert (cfg.sparsity.schedule(500).start_step, cfg.sparsity.schedule(500).end_step) == (125, 375)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_pretrain_config(path)
    path.write_text("optim:\n  lr: 0.1\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"optim.max_stepz: unknown key \(.*bad.yaml\)"):
        load_pretrain_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_pretrain_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrain_config(tmp_path / "missing.yaml")


def test_finetune_config_is_just_as_strict(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("model: {from_run: runs/x}\noptim: {epochz: 3}\n")
    with pytest.raises(ConfigError, match=r"optim.epochz: unknown key \(.*ft.yaml\)"):  # was silently dropped
        load_finetune_config(path)
    for sets, match in ((["optim.max_steps=0"], "optim.max_steps: 0 is out of range"),
                        (["optim.epochs=0"], r"optim.epochs: 0.0 is out of range; allowed > 0.0"),
                        (["data.limit_train=-5"], "data.limit_train: -5 is out of range"),
                        (["tuning.mode=half"], "tuning.mode: 'half' is not one of dense, sparse, lora")):
        with pytest.raises(ConfigError, match=match):
            load_finetune_config(None, sets + ["model.from_run=x"])
    with pytest.raises(ConfigError, match="model.from_run: required"):
        load_finetune_config()


def test_configs_round_trip_through_their_dict():
    cfg = load_pretrain_config(None, ["sparsity.method=set", "sparsity.target=0.75", "sparsity.options.drop_fraction=0.2"])
    again = config.from_dict(PretrainConfig, cfg.to_dict())
    assert again == cfg
    ft = load_finetune_config(None, ["model.from_run=x", "tuning.mode=lora"])
    assert config.from_dict(FinetuneConfig, ft.to_dict()) == ft


def test_the_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "x"), "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparselm pretrain: error: optim.lrr: unknown key") and err.count("\n") == 1
    assert main(["finetune", "--from", "x", "--set", "optim.warmup_ratio=2"]) == 2
    assert "optim.warmup_ratio: 2.0 is out of range" in capsys.readouterr().err
    assert main(["pretrain", "--set", "noequals"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_cli_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--lr", "config key optim.lr", "--sparsity", "default: 0.0", "--method", "rigl:", "--compile", "--resume"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("sparselm ")
