"""Fine-tuning modes, label masking, and deterministic evaluation."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sparselm.evaluation.evaluate import evaluate
from sparselm.evaluation.generate import DecodingConfig
from sparselm.models.loss import collate, encode_pairs, target_loss
from sparselm.models.runs import load_run
from sparselm.training import FinetuneConfig, finetune

from conftest import MICRO_MODEL, make_config


def test_labels_mask_the_prompt(sparse_run):
    model, tok, _, _ = load_run(sparse_run)
    ((ids, labels),), left_out = encode_pairs(tok, [("name[Aromi], food[French] ||", " Aromi serves French food.")], 128)
    assert left_out == 0
    n_prompt = len(tok("name[Aromi], food[French] ||").input_ids)
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    # the loss is the mean cross-entropy over target positions only
    x, y, m = collate([(ids, labels)], tok.eos_token_id)
    logits = model(input_ids=x, attention_mask=m).logits[0, :-1]
    targets = torch.tensor(ids[1:])
    per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    want = per_token[n_prompt - 1 :].mean()
    assert target_loss(model, x, y, m).item() == pytest.approx(want.item(), rel=1e-5)
    assert not torch.isclose(per_token.mean(), want)  # prompt tokens would change it


def run_ft(sparse_run, tmp_path, mode, **kw):
    cfg = make_config(FinetuneConfig, from_run=str(sparse_run), task="e2e", mode=mode, out=str(tmp_path / mode),
                      max_steps=12, batch_size=8, limit_train=96, val_limit=16, eval_every=6, ckpt_every=6, lr=3e-3,
                      progress=False, **kw)
    return finetune(cfg, log=lambda *_: None), tmp_path / mode


def test_dense_mode_updates_formerly_zero_weights(sparse_run, tmp_path):
    masks = load_file(str(sparse_run / "masks.safetensors"))
    summary, out = run_ft(sparse_run, tmp_path, "dense")
    weights = load_file(str(out / "model.safetensors"))
    revived = sum(int(torch.count_nonzero(weights[k][~m])) for k, m in masks.items())
    assert revived > 0.9 * sum(int((~m).sum()) for m in masks.values())
    assert summary["formerly_zero_weights_now_nonzero"] == revived
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert summary["source_sparsity"] == pytest.approx(0.5, abs=1e-3) and summary["pretrain_flops"] > 0
    assert not (out / "masks.safetensors").exists()


def test_sparse_mode_keeps_them_zero(sparse_run, tmp_path):
    masks = load_file(str(sparse_run / "masks.safetensors"))
    summary, out = run_ft(sparse_run, tmp_path, "sparse")
    weights = load_file(str(out / "model.safetensors"))
    for k, m in masks.items():
        assert torch.count_nonzero(weights[k][~m]) == 0
    assert torch.equal(load_file(str(out / "masks.safetensors"))[next(iter(masks))], next(iter(masks.values())))
    dense_summary, _ = run_ft(sparse_run, tmp_path / "d", "dense")
    assert summary["finetune_flops"] < dense_summary["finetune_flops"]  # sparse fine-tuning costs less


@pytest.mark.slow
def test_lora_mode_trains_adapters_on_a_frozen_sparse_base(sparse_run, tmp_path):
    summary, out = run_ft(sparse_run, tmp_path, "lora")
    assert (out / "adapter" / "adapter_config.json").exists()
    assert summary["final_val_loss"] < summary["initial_val_loss"]


def test_evaluate_is_deterministic_and_resume_refused(sparse_run, tmp_path):
    _, out = run_ft(sparse_run, tmp_path, "dense")
    dec = DecodingConfig(num_beams=3, max_new_tokens=16, batch_size=4)
    a = evaluate(out, "e2e", "test", limit=6, decoding=dec, progress=False)
    hyps_a = (out / "eval" / "e2e-test.hyp.txt").read_text()
    b = evaluate(out, "e2e", "test", limit=6, decoding=dec, progress=False)
    assert a["metrics"] == b["metrics"] and hyps_a == (out / "eval" / "e2e-test.hyp.txt").read_text()
    assert set(a["metrics"]) == {"bleu", "nist", "meteor", "rouge_l", "cider", "val_ppl"}
    assert len(hyps_a.splitlines()) == 6
    assert json.loads((out / "eval" / "e2e-test.json").read_text())["metrics"] == a["metrics"]
    with pytest.raises(FileExistsError):
        run_ft(sparse_run, tmp_path, "dense")


def test_prompts_too_long_for_the_context_are_counted_not_hidden(sparse_run):
    _, tok, _, _ = load_run(sparse_run)
    long_prompt = "Aarhus : leader : Jacob Bundsgaard | " * 20 + "||"
    pairs = [(long_prompt, " x"), ("name[A] ||", " A.")]
    with pytest.raises(ValueError, match="leaves no room in the context of 128"):
        encode_pairs(tok, pairs, 128)
    kept, left_out = encode_pairs(tok, pairs, 128, skip_too_long=True)
    assert len(kept) == 1 and left_out == 1


def test_bad_inputs(sparse_run, tmp_path):
    with pytest.raises(ValueError, match="tuning.mode: 'half' is not one of dense, sparse, lora"):
        make_config(FinetuneConfig, from_run="x", mode="half")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        finetune(make_config(FinetuneConfig, from_run=str(tmp_path), out=str(tmp_path / "o")), progress=False)


def test_prune_a_dense_run_then_finetune_sparse(sparse_run, tmp_path, micro_config, capsys):
    from sparselm.cli.main import main
    from sparselm.training import pretrain

    dense = tmp_path / "dense"
    pretrain(micro_config(out=str(dense), model=dict(MICRO_MODEL, block_size=128), max_steps=10),
             progress=False, log=lambda *_: None)
    assert main(["prune", "--from", str(dense), "--out", str(tmp_path / "pruned"), "--sparsity", "0.5", "--n-m", "2:4"]) == 0
    masks = load_file(str(tmp_path / "pruned" / "masks.safetensors"))
    weights = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    original = load_file(str(dense / "model.safetensors"))
    for name, m in masks.items():
        assert (m.reshape(-1, m.shape[-1]).T.reshape(-1, 4).sum(-1) == 2).all()  # Conv1D: input axis 0
        kept, dropped = original[name].abs()[m], original[name].abs()[~m]
        assert torch.count_nonzero(weights[name][~m]) == 0 and kept.mean() > dropped.mean()
    summary, out = run_ft(tmp_path / "pruned", tmp_path, "sparse")
    assert summary["source_sparsity"] == pytest.approx(0.5)
    assert main(["prune", "--from", str(sparse_run), "--out", str(tmp_path / "again")]) == 2  # already sparse
    assert main(["prune", "--from", str(sparse_run), "--out", str(tmp_path / "again"), "--refine", "dsnot"]) == 2
    assert "refine while pruning the dense source" in capsys.readouterr().err
