"""Local Hugging Face model directories (not made by sparselm) through every command: the weights that
train, prune, fine-tune and evaluate are the loaded ones, never a fresh initialisation; a directory
sparselm cannot load exactly is refused, naming it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sparselm.cli.main import main
from sparselm.data.tokenizer import save_hf_tokenizer, train_tokenizer
from sparselm.models import block_linear_names, build_model, get_preset, load_model

SHAPES = {
    "gpt2": get_preset("tiny").override(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=320),
    "llama": get_preset("llama-tiny").override(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, d_ff=64, block_size=128,
                                               vocab_size=320),
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, shared_data):
    """A 300-token byte-level BPE: its own vocabulary, so a model built for another would not fit."""
    text = (shared_data / "corpus" / "brown.txt").read_text(encoding="utf-8")[:60_000]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(text.splitlines(), 300).save(str(path))
    return path


@pytest.fixture(params=sorted(SHAPES))
def hf_dir(request, tmp_path, tokenizer_json):
    """An HF model directory as another tool writes it: save_pretrained + tokenizer files, nothing else."""
    torch.manual_seed(7)
    model = build_model(SHAPES[request.param])
    with torch.no_grad():  # not sparselm's initialisation: a re-initialised model could not match
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / f"hf-{request.param}"
    model.save_pretrained(out)
    save_hf_tokenizer(tokenizer_json, out, model_max_length=128)
    return out


def weights(path):
    return load_file(path / "model.safetensors")


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


def test_prune_finetune_and_evaluate_use_the_loaded_model(hf_dir, tmp_path):
    loaded = weights(hf_dir)
    assert main(["prune", "--from", str(hf_dir), "--out", str(tmp_path / "pruned"), "--sparsity", "0.5"]) == 0
    pruned, masks = weights(tmp_path / "pruned"), load_file(tmp_path / "pruned" / "masks.safetensors")
    assert sorted(masks) == sorted(block_linear_names(load_model(hf_dir)))
    for k, v in loaded.items():
        expected = v * masks[k] if k in masks else v
        assert torch.equal(pruned[k], expected), k

    assert main(["finetune", "--from", str(hf_dir), "--task", "e2e", "--max-steps", "1", "--batch-size", "2",
                 "--lr", "1e-30", "--set", "optim.weight_decay=0", "--limit-train", "8", "--set", "data.val_limit=4",
                 "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    tuned = weights(tmp_path / "ft")
    for k, v in loaded.items():
        torch.testing.assert_close(tuned[k], v, rtol=0, atol=1e-20)
    generation = json.loads((tmp_path / "ft" / "generation_config.json").read_text())
    assert generation["num_beams"] == 10 and generation["no_repeat_ngram_size"] == 4  # evaluate's decoding, recorded
    card = (tmp_path / "ft" / "README.md").read_text()
    assert "Prompt format" in card and "||" in card and "sparselm finetune" in card

    # an HF directory from elsewhere is never written to: evaluate needs --out for it
    before = sorted(p.name for p in hf_dir.iterdir())
    assert main(["evaluate", "--from", str(hf_dir), "--limit", "2", "--beams", "1", "--max-new-tokens", "8",
                 "--no-progress"]) == 2
    assert main(["evaluate", "--from", str(hf_dir), "--limit", "2", "--beams", "1", "--max-new-tokens", "8",
                 "--out", str(tmp_path / "hf-eval"), "--no-progress"]) == 0
    assert sorted(p.name for p in hf_dir.iterdir()) == before
    assert json.loads((tmp_path / "hf-eval" / "e2e-test.json").read_text())["n_examples"] == 2
    # a sparselm run: eval/ inside it by default, and its model card shows the metrics
    assert main(["evaluate", "--from", str(tmp_path / "ft"), "--limit", "2", "--beams", "1", "--max-new-tokens", "8",
                 "--no-progress"]) == 0
    assert (tmp_path / "ft" / "eval" / "e2e-test.json").is_file()
    assert "## Evaluation" in (tmp_path / "ft" / "README.md").read_text()


def test_unsupported_or_incomplete_directories_are_refused_by_every_command(tmp_path, capsys, small_corpus):
    opt = tmp_path / "opt"
    transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16)).save_pretrained(opt)
    holes = tmp_path / "holes"
    build_model(SHAPES["llama"]).save_pretrained(holes)
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
