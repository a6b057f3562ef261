"""Extending sparselm from outside ``src/``: a sparsity method, a model family (with a preset) and a
task (and a pruner) registered in this file alone are accepted by the config, the CLI, training and
``reproduce --dry-run``, like the built-in ones."""

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from sparselm.cli.main import main
from sparselm.config import option
from sparselm.data import tasks
from sparselm.data.tasks import Example, Task, TaskData, register_task
from sparselm.models import FAMILIES, PRESETS, ModelShape, register_family, register_preset
from sparselm.sparsity import METHODS, Sparsifier, register_method

from test_models import NeoXFamily


class KeepSmallest(Sparsifier):
    """Keeps the smallest-magnitude weights: a deliberately odd method, easy to recognise in the masks."""

    name = "keep-smallest-test"
    help = "keep the smallest weights (test method)"

    @dataclass
    class Options:
        power: float = option(1.0, "exponent of the magnitude score", lo=0.0, lo_open=True)

    def init_masks(self):
        return self.masks_for(self.sparsity, {t.name: -t.param.detach().abs().pow(self.options.power) for t in self.targets})


def load_reverse(folder, skip_bad_rows):
    """Reverse three words: a task whose data lives in memory."""
    words = "red green blue cat dog fish sun moon star tree leaf root".split()
    examples = [Example(id=str(i), source=" ".join(words[i:i + 3]), refs=[" ".join(reversed(words[i:i + 3]))])
                for i in range(len(words) - 2)]
    return TaskData("reverse-test", {"train": examples, "validation": examples[:3], "test": examples[:4]})


@pytest.fixture
def extended():
    saved = [(reg, dict(reg)) for reg in (METHODS, FAMILIES, PRESETS, tasks.TASKS)]
    register_method(KeepSmallest)
    register_family(NeoXFamily())
    register_preset("neox-micro-test", ModelShape(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=512,
                                                  family="neox-test", tie_embeddings=False))
    register_task(Task("reverse-test", load_reverse, None, ("bleu",)))
    try:
        yield
    finally:
        for reg, content in saved:
            reg.clear()
            reg.update(content)


@pytest.mark.slow
def test_registered_method_family_and_task_run_through_the_cli(extended, small_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSELM_CACHE", str(cache_dir))
    run = tmp_path / "neox"
    rc = main(["pretrain", "--preset", "neox-micro-test", "--method", "keep-smallest-test", "--sparsity", "0.5",
               "--corpus", str(small_corpus), "--out", str(run), "--max-steps", "6", "--batch-size", "4", "--no-progress",
               "--set", "optim.warmup_steps=1", "--set", "run.eval_batches=1", "--set", "sparsity.options.power=2"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["family"] == "neox-test" and summary["sparsity"]["method"] == "keep-smallest-test"
    assert summary["sparsity"]["options"] == {"power": 2.0}
    masks = load_file(str(run / "masks.safetensors"))
    assert set(masks) == {f"gpt_neox.layers.{i}.{k}" for i in range(2) for k in
                          ("attention.query_key_value.weight", "attention.dense.weight",
                           "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")}
    assert summary["train_flops"] < summary["dense_train_flops"]  # the family's linears were accounted for
    config = json.loads((run / "config.json").read_text())
    assert config["model_type"] == "gpt_neox"

    ft = tmp_path / "ft"
    assert main(["finetune", "--from", str(run), "--task", "reverse-test", "--out", str(ft), "--max-steps", "2",
                 "--batch-size", "4", "--no-progress", "--data-dir", str(tmp_path)]) == 0
    assert json.loads((ft / "summary.json").read_text())["task"] == "reverse-test"

    spec = tmp_path / "spec.yaml"
    spec.write_text("preset: neox-micro-test\nsparsities: [0.0, 0.5]\nmethods: [keep-smallest-test]\n"
                    "method_options: {keep-smallest-test: {power: 0.5}}\ntasks: [reverse-test]\nmodes: [dense]\n"
                    f"corpus: {small_corpus}\nfinetune: {{data: {{data_dir: {tmp_path}}}}}\n")
    assert main(["reproduce", "--spec", str(spec), "--dry-run", "--out", str(tmp_path / "grid")]) == 0
    out = capsys.readouterr().out
    assert "s50-keep-smallest-test-seed1337" in out and "finetune+eval reverse-test" in out


def test_registered_method_options_are_checked_like_built_in_ones(extended):
    from sparselm.config import ConfigError
    from sparselm.training import load_pretrain_config

    cfg = load_pretrain_config(None, ["sparsity.method=keep-smallest-test", "sparsity.target=0.5", "sparsity.options.power=3"])
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(64.0).view(8, 8) - 31.5)
    sp = cfg.sparsity.build(10, seed=0).attach(model)
    kept = model[0].weight[sp.masks["0.weight"]].abs()
    assert kept.max() < 16  # the 32 smallest magnitudes are |x| <= 15.5
    with pytest.raises(ConfigError, match=r"sparsity.options.power: 0.0 is out of range; allowed > 0.0"):
        load_pretrain_config(None, ["sparsity.method=keep-smallest-test", "sparsity.options.power=0"])
    with pytest.raises(ConfigError, match="sparsity.options.drop_fraction: unknown key"):
        load_pretrain_config(None, ["sparsity.method=keep-smallest-test", "sparsity.options.drop_fraction=0.3"])


def test_a_pruner_registered_here_runs_through_prune(tiny_run, tmp_path):
    """A pruner is one class and ``register_pruner``: ``sparselm prune --method`` takes it, with its options
    checked, and the driver gives it exact counts and writes a run with its masks."""
    from sparselm.pruning import PRUNERS, Pruned, Pruner, register_pruner

    class KeepLargest(Pruner):
        name = "keep-largest-test"
        help = "keep the largest |W| of each layer (test pruner)"
        needs_calibration = False

        @dataclass
        class Options:
            scale: float = option(1.0, "multiplies the score", lo=0.0, lo_open=True)

        def prune(self, weight, stats, n_prune, n_m):
            score = weight.abs() * self.options.scale
            flat = torch.zeros(score.numel(), dtype=torch.bool)
            flat[score.flatten().argsort(descending=True)[: score.numel() - n_prune]] = True
            return Pruned(flat.view(score.shape))

    saved = dict(PRUNERS)
    register_pruner(KeepLargest)
    try:
        argv = ["prune", "--from", str(tiny_run), "--out", str(tmp_path / "p"), "--method", KeepLargest.name,
                "--sparsity", "0.25", "--set", "options.scale=2.0"]
        assert main(argv) == 0
        masks = load_file(str(tmp_path / "p" / "masks.safetensors"))
        assert masks and all(int((~m).sum()) == round(0.25 * m.numel()) for m in masks.values())
        summary = json.loads((tmp_path / "p" / "summary.json").read_text())
        assert summary["sparsity"]["method"] == KeepLargest.name and summary["pruning"]["options"] == {"scale": 2.0}
        assert main(argv[:4] + [str(tmp_path / "q")] + argv[5:-1] + ["options.scale=-1"]) == 2  # checked like built-ins
    finally:
        PRUNERS.clear()
        PRUNERS.update(saved)
