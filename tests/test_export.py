"""``sparselm export``: the compressed checkpoint restores the run's weights exactly and is smaller."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparselm.files import CorruptFileError, write_manifest
from sparselm.models.export import META_KEY, decode_2_4, encode_2_4, export_run, load_exported
from sparselm.models.runs import load_run

SMALL = dict(n_layer=2, vocab_size=512)  # 2:4 runs: shape matters more than size


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished runs without training: a fresh model, a static mask, ``save_run`` (about a second each)."""
    from sparselm.cli.main import quiet_transformers
    from sparselm.data.tokenizer import save_hf_tokenizer, train_tokenizer
    from sparselm.models import build_model, get_preset
    from sparselm.sparsity import Static
    from sparselm.training.checkpoint import save_run

    quiet_transformers()  # the autouse fixture runs per test, after this one
    root = tmp_path_factory.mktemp("export")
    train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 8, 300).save(str(root / "tok.json"))

    def make(name, shape, edit=None, **sparsity):
        torch.manual_seed(0)
        model = build_model(shape)
        sp = Static(**sparsity).attach(model)
        if edit:  # hand-made masks (the pruned weights stay zero)
            sp.load_state_dict(edit({k: m.clone() for k, m in sp.masks.items()}))
        save_run(root / name, model, lambda d: save_hf_tokenizer(root / "tok.json", d, shape.block_size),
                 sp.state_dict(), {"kind": "pretrain", "sparsity": sp.report()})
        return root / name

    return {
        "tiny-s75": make("tiny-s75", get_preset("tiny"), sparsity=0.75),
        "gpt2-2:4": make("gpt2-24", dataclasses.replace(get_preset("tiny"), **SMALL), n_m=(2, 4)),
        "llama-2:4": make("llama-24", dataclasses.replace(get_preset("llama-tiny"), **SMALL), n_m=(2, 4)),
        "gpt2-1:4": make("gpt2-14", dataclasses.replace(get_preset("tiny"), **SMALL), n_m=(1, 4)),
        "gpt2-3:4-group": make("gpt2-34", dataclasses.replace(get_preset("tiny"), **SMALL), edit=_three_of_four,
                               n_m=(2, 4)),
    }


THIRD_LAYER = "transformer.h.0.mlp.c_fc.weight"  # (Conv1D: (in, out)) the first mask it edits, in layer order


def _three_of_four(masks):
    """2:4 masks with one group of 4 inputs of ``THIRD_LAYER`` (output 7, inputs 4-7) keeping 3."""
    masks[THIRD_LAYER][4:8, 7] = torch.tensor([True, True, True, False])
    return masks


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """The 75% run exported once (tests that change it work on a copy)."""
    out = tmp_path_factory.mktemp("exported") / "tiny-s75"
    return out, export_run(runs["tiny-s75"], out)


def assert_same_weights(run, model):
    dense = load_run(run)[0].state_dict()
    got = model.state_dict()
    assert dense.keys() == got.keys()
    for k in dense:
        assert torch.equal(dense[k], got[k]), k


def test_75_percent_round_trips_exactly_and_is_smaller(runs, exported):
    run, (out, report) = runs["tiny-s75"], exported
    assert report["layout"] == "bitmask" and report["sparsity"] == pytest.approx(0.75) and report["masked_layers"] == 16

    model, tok = load_exported(out)
    assert_same_weights(run, model)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stored once, tied again
    assert tok.eos_token_id is not None

    # bound: every unmasked tensor as it is, each masked weight 4 bytes x 25% kept + 1 bit, 16 KiB of header
    tensors, masks = load_file(str(run / "model.safetensors")), load_file(str(run / "masks.safetensors"))
    unmasked = sum(t.numel() * t.element_size() for k, t in tensors.items() if k not in masks)
    masked = sum(m.numel() for m in masks.values())
    bound = unmasked + masked * (4 * 0.25 + 1 / 8) + 16 * 1024
    dense, exported = (run / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    print(f"\ntiny preset at 75%: {exported:,} of {dense:,} bytes, ratio {exported / dense:.3f} (bound {bound / dense:.3f})")
    assert exported <= bound < dense
    assert report["exported_bytes"] == exported and report["dense_bytes"] == dense
    assert json.loads((out / "export.json").read_text())["ratio"] == pytest.approx(exported / dense)
    assert {"config.json", "tokenizer.json", "summary.json", "manifest.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("kind", ["gpt2-2:4", "llama-2:4"])  # Conv1D (in, out) and Linear (out, in)
def test_2_4_run_packs_the_tensor_core_layout_and_round_trips(runs, tmp_path, kind):
    run = runs[kind]
    assert export_run(run, tmp_path / "out")["layout"] == "2:4"  # auto picks it
    model, _ = load_exported(tmp_path / "out", semi_structured=True)  # on the CPU: dense
    assert_same_weights(run, model)

    tensors, masks = load_file(str(run / "model.safetensors")), load_file(str(run / "masks.safetensors"))
    with safe_open(str(tmp_path / "out/model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
        name = next(iter(meta["tensors"]))
        values, indices = f.get_tensor(f"{name}.values"), f.get_tensor(f"{name}.indices")
    e = meta["tensors"][name]
    w, m = tensors[name].movedim(e["in_axis"], -1), masks[name].movedim(e["in_axis"], -1)  # (out, in)
    assert torch.equal(values, w[m].reshape(w.shape[0], -1))  # (out, in/2)
    p0, p1 = m[0, :4].nonzero().flatten().tolist()  # row 0, group 0: the low nibble of byte 0
    assert indices[0, 0] & 0xF == p0 | p1 << 2
    assert torch.equal(decode_2_4(name, values, indices, e["shape"], e["in_axis"]), tensors[name])


def test_2_4_packing_with_an_odd_number_of_groups():
    torch.manual_seed(0)
    w = torch.randn(3, 12)  # 3 groups of 4 per row: the last byte's high nibble is padding
    mask = torch.zeros(3, 3, 4, dtype=torch.bool)
    mask.scatter_(2, torch.rand(3, 3, 4).argsort(-1)[..., :2], True)
    mask = mask.view(3, 12)
    values, indices = encode_2_4(w * mask, mask, in_axis=1)
    assert values.shape == (3, 6) and indices.shape == (3, 2) and not (indices[:, 1] >> 4).any()
    assert torch.equal(decode_2_4("w", values, indices, (3, 12), 1), w * mask)
    assert torch.equal(decode_2_4("w", *encode_2_4(w.T * mask.T, mask.T, 0), (12, 3), 0), w.T * mask.T)


def test_2_4_layout_pads_groups_that_keep_fewer_than_2():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -3.0, 1.0, 0.0, 2.0, 0.0]])
    mask = w != 0  # groups keeping 0, 1 (position 0), 1 (position 3) and 2
    values, indices = encode_2_4(w, mask, in_axis=1)
    assert values.tolist() == [[0.0, 0.0, 5.0, 0.0, 0.0, -3.0, 1.0, 2.0]]  # zeros at the lowest free positions
    nibbles = [int(indices[0, k // 2] >> (4 * (k % 2))) & 0xF for k in range(4)]
    assert [(n & 3, n >> 2) for n in nibbles] == [(0, 1), (0, 1), (0, 3), (0, 2)]
    assert torch.equal(decode_2_4("w", values, indices, (1, 16), 1), w)


def test_a_1_4_run_packs_as_2_4_on_request_and_auto_picks_the_smaller_bitmask(runs, tmp_path):
    run = runs["gpt2-1:4"]
    packed = export_run(run, tmp_path / "packed", layout="2:4")
    assert packed["layout"] == "2:4" and packed["sparsity"] == pytest.approx(0.75)
    assert_same_weights(run, load_exported(tmp_path / "packed")[0])
    auto = export_run(run, tmp_path / "auto")
    assert auto["layout"] == "bitmask" and auto["exported_bytes"] < packed["exported_bytes"]
    assert_same_weights(run, load_exported(tmp_path / "auto")[0])


def test_a_group_keeping_3_of_4_is_refused_naming_layer_and_group(runs, tmp_path):
    run = runs["gpt2-3:4-group"]
    with pytest.raises(ValueError, match=rf"not a 2:4 run: layer {THIRD_LAYER} \(output 7, inputs 4-7 keep 3 of 4, "
                                         r"more than 2 \(the mask is not 2:4\)\)"):
        export_run(run, tmp_path / "out", layout="2:4")
    assert export_run(run, tmp_path / "auto")["layout"] == "bitmask"


def test_a_values_count_that_does_not_match_the_bitmask_names_the_tensor(exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported[0], out)
    path = out / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = "transformer.h.1.mlp.c_fc.weight"
    stored[f"{name}.values"] = stored[f"{name}.values"][:-1].clone()
    save_file(stored, str(path), metadata=metadata)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is corrupt \(size mismatch"):
        load_exported(out)  # the manifest catches a file changed afterwards
    write_manifest(out, [p.name for p in out.iterdir() if p.name != "manifest.json"])  # a writer bug: sealed as is
    with pytest.raises(CorruptFileError, match=rf"{name}: 16383 values stored, but its bitmask keeps 16384"):
        load_exported(out)


def test_2_4_layout_is_refused_for_a_run_that_is_not_and_a_dense_run_has_nothing_to_compress(runs, tmp_path):
    with pytest.raises(ValueError, match=r"not a 2:4 run: layer transformer\.h\.0\.attn\.c_attn\.weight"):
        export_run(runs["tiny-s75"], tmp_path / "out", layout="2:4")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()

    dense = tmp_path / "dense"
    shutil.copytree(runs["tiny-s75"], dense, ignore=shutil.ignore_patterns("masks.safetensors", "manifest.json"))
    with pytest.raises(ValueError, match=r"has no masks\.safetensors: nothing to compress \(a dense run\).*`sparselm prune"):
        export_run(dense, tmp_path / "out")


def test_cli_prints_the_size_table_and_reports_errors(runs, tmp_path, capsys):
    from sparselm.cli.main import main

    assert main(["export", str(runs["llama-2:4"]), "--out", str(tmp_path / "out"), "--layout", "2:4"]) == 0
    shown = capsys.readouterr().out
    for row in ("dense model.safetensors", "exported model.safetensors", "ratio", "masked layers", "sparsity"):
        assert row in shown
    assert "0.5000" in shown and "2:4" in shown
    assert main(["export", str(runs["tiny-s75"]), "--out", str(tmp_path / "o2"), "--layout", "2:4"]) == 2
    assert "not a 2:4 run: layer transformer.h.0.attn.c_attn.weight" in capsys.readouterr().err
