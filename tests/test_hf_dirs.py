"""Local Hugging Face model directories (not made by sparselm) of every registered family through every
command: the weights that train, prune, fine-tune, export and evaluate are the loaded ones, never a
fresh initialisation; a directory sparselm cannot load exactly is refused, naming it. Every test that
takes ``hf_dir`` or ``family`` runs once per family in the registry."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sparselm.cli.main import main
from sparselm.data.tasks import TASKS, Task, load_e2e, register_task
from sparselm.data.tokenizer import save_hf_tokenizer, train_tokenizer
from sparselm.models import block_linear_names, build_model, get_family, load_model, shape_of
from sparselm.models.export import load_exported

from family_fixtures import FAMILY_NAMES, family_preset, micro_shape


def hf_shape(family):
    return micro_shape(family, n_embd=32, block_size=128, vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, shared_data):
    """A 300-token byte-level BPE: its own vocabulary, so a model built for another would not fit."""
    text = (shared_data / "corpus" / "brown.txt").read_text(encoding="utf-8")[:60_000]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(text.splitlines(), 300).save(str(path))
    return path


@pytest.fixture(params=FAMILY_NAMES)
def hf_dir(request, tmp_path, tokenizer_json):
    """An HF model directory as another tool writes it: save_pretrained + tokenizer files, nothing else."""
    torch.manual_seed(7)
    model = build_model(hf_shape(request.param))
    with torch.no_grad():  # not sparselm's initialisation: a re-initialised model could not match
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / f"hf-{request.param}"
    model.save_pretrained(out)
    save_hf_tokenizer(tokenizer_json, out, model_max_length=128)
    return out


@pytest.fixture
def e2e_bleu():
    """E2E scored by BLEU alone: evaluation runs per family, the official metrics (Java, ~30 s) need not."""
    saved = dict(TASKS)
    try:
        yield register_task(Task("e2e-bleu-test", load_e2e, "e2e", ("bleu",)))
    finally:
        TASKS.clear()
        TASKS.update(saved)


def weights(path):
    return load_file(path / "model.safetensors")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pretrain_and_flops_of_the_family_preset(family, tmp_path, small_corpus, cache_dir, capsys):
    """``--preset <family>-tiny`` trains a few steps, masks the family's block linears and saves a
    directory that loads strictly (no missing or unexpected weights) with the preset's shape."""
    preset = family_preset(family)
    run = tmp_path / "run"
    assert main(["pretrain", "--preset", preset.name, "--max-steps", "3", "--sparsity", "0.5", "--batch-size", "4",
                 "--corpus", str(small_corpus), "--set", f"data.cache_dir={cache_dir}", "--set", "optim.warmup_steps=1",
                 "--set", "run.eval_batches=1", "--set", "data.val_fraction=0.1", "--no-progress", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    model = load_model(run)
    assert summary["family"] == family and type(model) is get_family(family).model_class
    assert shape_of(model.config) == preset.shape.override(vocab_size=model.config.vocab_size)
    assert sorted(load_file(run / "masks.safetensors")) == sorted(block_linear_names(model))
    assert summary["train_flops"] < summary["dense_train_flops"]

    capsys.readouterr()
    assert main(["flops", "--preset", preset.name, "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"{preset.name} ({family}, L={preset.shape.n_layer} d={preset.shape.n_embd}" in out
    assert "dense/sparse ratio" in out


def test_pretrain_init_from_continues_from_the_loaded_weights(hf_dir, tmp_path, small_corpus, cache_dir):
    """lr so small that AdamW cannot move a weight measurably: the result equals what was loaded, so
    it was loaded (and the sparse run holds exactly the loaded values where its mask keeps weights)."""
    loaded = weights(hf_dir)
    common = ["--init-from", str(hf_dir), "--corpus", str(small_corpus), "--set", f"data.cache_dir={cache_dir}",
              "--max-steps", "2", "--batch-size", "2", "--lr", "1e-30", "--set", "optim.warmup_steps=0",
              "--set", "optim.weight_decay=0", "--no-progress"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "dense")]) == 0
    dense = weights(tmp_path / "dense")
    assert dense.keys() == loaded.keys()
    for k, v in loaded.items():
        torch.testing.assert_close(dense[k], v, rtol=0, atol=1e-20)
    summary = json.loads((tmp_path / "dense" / "summary.json").read_text())
    assert summary["init_from"] == str(hf_dir) and summary["model"]["vocab_size"] == 320  # not padded: the model's own
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "dense").get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(hf_dir).get_vocab()
    assert not (tmp_path / "dense" / "checkpoint").exists()  # a finished run drops it (--keep-checkpoint keeps it)

    assert main(["pretrain", *common, "--sparsity", "0.5", "--method", "magnitude", "--out", str(tmp_path / "sparse")]) == 0
    sparse, masks = weights(tmp_path / "sparse"), load_file(tmp_path / "sparse" / "masks.safetensors")
    assert sorted(masks) == sorted(block_linear_names(load_model(hf_dir)))  # the family's block linears, no more
    for k, m in masks.items():
        assert torch.equal(sparse[k] != 0, m) or torch.count_nonzero(sparse[k][~m]) == 0
        torch.testing.assert_close(sparse[k][m], loaded[k][m], rtol=0, atol=1e-20)
        kept_magnitude, pruned_magnitude = loaded[k][m].abs().min(), loaded[k][~m].abs().max()
        assert kept_magnitude >= pruned_magnitude  # magnitude pruning of the loaded weights, not of fresh ones


def finetune_one_step(source, out, *flags):
    """One fine-tuning step at a learning rate too small to move a weight: the result shows what was loaded."""
    return main(["finetune", "--from", str(source), "--task", "e2e", "--max-steps", "1", "--batch-size", "2",
                 "--lr", "1e-30", "--set", "optim.weight_decay=0", "--limit-train", "8", "--set", "data.val_limit=4",
                 "--out", str(out), "--no-progress", *flags])


def test_prune_export_and_finetune_use_the_loaded_model(hf_dir, tmp_path):
    loaded = weights(hf_dir)
    assert main(["prune", "--from", str(hf_dir), "--out", str(tmp_path / "pruned"), "--sparsity", "0.5"]) == 0
    pruned, masks = weights(tmp_path / "pruned"), load_file(tmp_path / "pruned" / "masks.safetensors")
    assert sorted(masks) == sorted(block_linear_names(load_model(hf_dir)))
    for k, v in loaded.items():
        expected = v * masks[k] if k in masks else v
        assert torch.equal(pruned[k], expected), k

    assert main(["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "exported")]) == 0
    exported, _ = load_exported(tmp_path / "exported")
    state = exported.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pruned.items())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(exported.eval()(ids).logits, load_model(tmp_path / "pruned").eval()(ids).logits)

    assert finetune_one_step(hf_dir, tmp_path / "ft") == 0
    tuned = weights(tmp_path / "ft")
    for k, v in loaded.items():
        torch.testing.assert_close(tuned[k], v, rtol=0, atol=1e-20)
    generation = json.loads((tmp_path / "ft" / "generation_config.json").read_text())
    assert generation["num_beams"] == 10 and generation["no_repeat_ngram_size"] == 4  # evaluate's decoding, recorded
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "Prompt format" in card and "||" in card and "sparselm finetune" in card

    # sparse fine-tuning keeps the pruned run's masks; LoRA adapts the family's block linears and merges
    assert finetune_one_step(tmp_path / "pruned", tmp_path / "ft-sparse", "--mode", "sparse") == 0
    assert load_file(tmp_path / "ft-sparse" / "masks.safetensors").keys() == masks.keys()
    assert all(torch.count_nonzero(weights(tmp_path / "ft-sparse")[k][~m]) == 0 for k, m in masks.items())
    assert finetune_one_step(hf_dir, tmp_path / "ft-lora", "--mode", "lora") == 0
    merged = weights(tmp_path / "ft-lora")
    assert merged.keys() == loaded.keys()  # the adapters merged into the same weights (B = 0 after one tiny step)
    for k, v in loaded.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)


def test_evaluate_reads_a_directory_and_writes_only_where_told(hf_dir, tmp_path, e2e_bleu):
    """An HF directory from elsewhere is never written to (evaluate needs --out for it); a sparselm run
    gets eval/ inside it and its model card shows the metrics."""
    assert finetune_one_step(hf_dir, tmp_path / "ft") == 0
    before = sorted(p.name for p in hf_dir.iterdir())
    evaluate = ["evaluate", "--task", "e2e-bleu-test", "--limit", "2", "--beams", "1", "--max-new-tokens", "8", "--no-progress"]
    assert main([*evaluate, "--from", str(hf_dir)]) == 2
    assert main([*evaluate, "--from", str(hf_dir), "--out", str(tmp_path / "hf-eval")]) == 0
    assert sorted(p.name for p in hf_dir.iterdir()) == before
    result = json.loads((tmp_path / "hf-eval" / "e2e-bleu-test-test.json").read_text())
    assert result["n_examples"] == 2 and "bleu" in result["metrics"]
    # a sparselm run: eval/ inside it by default, and its model card shows the metrics
    assert main([*evaluate, "--from", str(tmp_path / "ft")]) == 0
    assert (tmp_path / "ft" / "eval" / "e2e-bleu-test-test.json").is_file()
    assert "## Evaluation" in (tmp_path / "ft" / "README.md").read_text()


def test_unsupported_or_incomplete_directories_are_refused_by_every_command(tmp_path, capsys, small_corpus):
    opt = tmp_path / "opt"
    transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16)).save_pretrained(opt)
    holes = tmp_path / "holes"
    build_model(hf_shape("llama")).save_pretrained(holes)
    sd = load_file(holes / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, holes / "model.safetensors", metadata={"format": "pt"})

    for argv in (["pretrain", "--init-from", str(opt), "--corpus", str(small_corpus)],
                 ["flops", "--from", str(opt)],
                 ["prune", "--from", str(opt), "--out", str(tmp_path / "p1")],
                 ["finetune", "--from", str(opt), "--out", str(tmp_path / "f1")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(opt) in err and "'opt'" in err and "supported families" in err, (argv, err)
    for argv in (["prune", "--from", str(holes), "--out", str(tmp_path / "p2")],
                 ["finetune", "--from", str(holes), "--out", str(tmp_path / "f2")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(holes) in err and "missing model.layers.1.mlp.up_proj.weight" in err, err
    assert not any((tmp_path / d).exists() for d in ("p1", "f1", "p2", "f2"))


def test_init_from_refuses_another_tokenizer_and_shape_changes(hf_dir, capsys):
    assert main(["pretrain", "--init-from", str(hf_dir), "--tokenizer", "gpt2"]) == 2
    assert "brings its own tokenizer" in capsys.readouterr().err
    assert main(["pretrain", "--init-from", str(hf_dir), "--set", "model.n_layer=4"]) == 2
    assert "unset model.n_layer" in capsys.readouterr().err


def test_flops_of_a_model_directory(hf_dir, capsys):
    assert main(["flops", "--from", str(hf_dir), "--sparsity", "0.5"]) == 0
    out = capsys.readouterr().out
    assert str(hf_dir) in out and "L=2 d=32" in out and "V=320" in out
