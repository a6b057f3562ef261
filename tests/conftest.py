"""Shared fixtures: a small slice of the real corpus and a micro GPT config that trains in seconds."""

from __future__ import annotations

import os

import pytest

from sparselm.data.paths import data_root

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MICRO_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512)


@pytest.fixture(scope="session")
def shared_data():
    return data_root()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, shared_data):
    """~240 KB of real English: the first 80 KB of three corpus files."""
    out = tmp_path_factory.mktemp("corpus")
    for name in ("brown.txt", "inaugural.txt", "webtext.txt"):
        text = (shared_data / "corpus" / name).read_text(encoding="utf-8")[:80_000]
        (out / name).write_text(text, encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# Short names for config keys in tests: a flat key goes to the section that has a field of that name.
ALIASES = {"sparsity": "sparsity.target", "preset": "model.preset"}


def nested(cls, flat: dict) -> dict:
    """``{"lr": 3e-3, "sparsity": 0.5, "model": {...}}`` -> the nested dict of config ``cls``."""
    import dataclasses
    import typing

    sections = {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}
    out: dict = {}
    for key, value in flat.items():
        if key in sections and isinstance(value, dict):
            out.setdefault(key, {}).update(value)
            continue
        dotted = ALIASES.get(key) if key in ALIASES and ALIASES[key].split(".")[0] in sections else None
        if dotted is None:
            owners = [s for s, t in sections.items() if key in {f.name for f in dataclasses.fields(t)}]
            assert len(owners) == 1, f"test config key {key!r} is in sections {owners}"
            dotted = f"{owners[0]}.{key}"
        section, leaf = dotted.split(".")
        out.setdefault(section, {})[leaf] = value
    return out


def make_config(cls, **flat):
    from sparselm import config

    return config.from_dict(cls, nested(cls, flat), source="test")


@pytest.fixture
def micro_config(small_corpus, cache_dir, tmp_path):
    """A factory of PretrainConfig for a 2-layer, d=32 GPT on the small corpus (flat test keys)."""
    from sparselm.training import PretrainConfig

    def make(**kw):
        base = dict(
            preset="tiny", model=dict(MICRO_MODEL), corpus=str(small_corpus), cache_dir=str(cache_dir),
            out=str(tmp_path / "run"), max_steps=20, batch_size=8, warmup_steps=5, eval_every=10,
            ckpt_every=10, log_every=1, eval_batches=2, lr=3e-3, progress=False,
        )
        base.update(kw)
        return make_config(PretrainConfig, **base)

    return make


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from sparselm.cli.main import quiet_transformers

    quiet_transformers()


@pytest.fixture(scope="session")
def sparse_run(tmp_path_factory, small_corpus, cache_dir):
    """A micro GPT pre-trained for 30 steps at 50% sparsity (context 128 so task prompts fit)."""
    from sparselm.training import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrained") / "run"
    cfg = make_config(
        PretrainConfig, preset="tiny", model=dict(MICRO_MODEL, block_size=128), corpus=str(small_corpus), cache_dir=str(cache_dir),
        out=str(out), sparsity=0.5, max_steps=30, batch_size=8, warmup_steps=5, eval_every=30, ckpt_every=30, eval_batches=2,
        keep_checkpoint=True,  # the reliability tests damage and resume it
    )
    pretrain(cfg, progress=False, log=lambda *_: None)
    return out


@pytest.fixture
def tiny_run(tmp_path):
    """A 1-layer GPT-2 with the GPT-2 tokenizer, saved as a (fine-tuning) run sparselm made."""
    import json

    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    run = tmp_path / "run"
    tok = GPT2TokenizerFast(tokenizer_file=str(data_root() / "tokenizers" / "gpt2" / "tokenizer.json"))
    tok.save_pretrained(run)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=len(tok),
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(run)
    (run / "summary.json").write_text(json.dumps({"kind": "finetune", "task": "e2e", "final_val_loss": 3.0}))
    return run
