"""Tokenizers: a byte-level BPE trained on the corpus (the default), or a pretrained one (GPT-2's
BPE, any ``tokenizer.json`` or Hugging Face tokenizer directory), all as HF ``tokenizers``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
TRAINED = "bpe"  # --tokenizer value (and the default) for a BPE trained on the corpus
# end-of-text tokens of common tokenizers (GPT-2, Llama/SentencePiece, Llama 3, Gemma), tried in order
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or used; the message names the path and the fix."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def load_pretrained(spec: str, data_root) -> tuple[Tokenizer, str | None]:
    """(tokenizer, its declared EOS token or None) for ``--tokenizer SPEC``: ``gpt2`` (the official
    files in ``<data root>/tokenizers/gpt2``), a ``tokenizer.json``, or an HF tokenizer directory."""
    if spec == "gpt2":
        folder = data_root() / "tokenizers" / "gpt2"
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(folder / "tokenizer.json")), EOS_TOKEN
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return _byte_level_bpe(folder / "vocab.json", folder / "merges.txt"), EOS_TOKEN
        raise TokenizerError(f"--tokenizer gpt2: no tokenizer.json (or vocab.json + merges.txt) in {folder}; "
                             "put the official GPT-2 files there (see tokenizers/README.md in the data folder)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise TokenizerError(f"--tokenizer {spec}: no such file or directory; use '{TRAINED}' (train one on the corpus), "
                             "'gpt2', a tokenizer.json file or a Hugging Face tokenizer directory")
    if path.is_file():
        return _from_file(path), _declared_eos(path.parent / "tokenizer_config.json")
    if (path / "tokenizer.json").is_file():
        return _from_file(path / "tokenizer.json"), _declared_eos(path / "tokenizer_config.json")
    return _converted(path), _declared_eos(path / "tokenizer_config.json")


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise TokenizerError(f"{path}: not a Hugging Face tokenizers file ({e}); pass a tokenizer.json "
                             "saved by tokenizers or transformers") from None


def _byte_level_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2's BPE from its vocab.json and merges.txt (as GPT2TokenizerFast builds it)."""
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _converted(path: Path) -> Tokenizer:
    """A directory without tokenizer.json (vocab.json + merges.txt, a SentencePiece model ...):
    transformers converts it to a fast tokenizer if it can."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise TokenizerError(f"--tokenizer {path}: not a tokenizer directory ({type(e).__name__}: {e}); "
                             "pass a folder with tokenizer.json or a tokenizer.json file") from None
    if not getattr(hf, "is_fast", False):
        raise TokenizerError(f"--tokenizer {path}: transformers could not convert it to a fast tokenizer; save one with "
                             "AutoTokenizer.from_pretrained(dir).save_pretrained(out) and pass out/tokenizer.json")
    return hf.backend_tokenizer


def _declared_eos(config: Path) -> str | None:
    """The ``eos_token`` of an HF ``tokenizer_config.json`` beside the tokenizer, if any."""
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def find_eos(tok: Tokenizer, wanted: str | None = None, declared: str | None = None) -> str:
    """The end-of-document token: ``wanted`` (``data.eos_token``), else the one the tokenizer
    declares, else the first of ``EOS_CANDIDATES`` in its vocabulary."""
    if wanted is not None:
        if tok.token_to_id(wanted) is None:
            raise TokenizerError(f"data.eos_token={wanted!r} is not in the tokenizer's vocabulary; "
                                 f"choose one of its special tokens: {', '.join(special_tokens(tok)) or '(none)'}")
        return wanted
    for token in ((declared,) if declared else ()) + EOS_CANDIDATES:
        if tok.token_to_id(token) is not None:
            return token
    raise TokenizerError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)}); set "
                         f"data.eos_token (--eos-token) to one of its tokens, e.g. {', '.join(special_tokens(tok)[:5]) or '(none)'}")


def special_tokens(tok: Tokenizer) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def vocab_size_of(tok: Tokenizer) -> int:
    """Ids run from 0 to this minus one (added tokens included)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def encoding_hash(tok) -> str:
    """A hash of what decides the ids of a text: normalizer, pre-tokenizer, model (vocabulary and
    merges) and added tokens. Not ``tokenizer_hash``: transformers' ``save_pretrained`` rewrites the
    post-processor of the same tokenizer. ``tok``: a ``tokenizers.Tokenizer`` or an HF fast tokenizer."""
    spec = json.loads(getattr(tok, "backend_tokenizer", tok).to_str())
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens") or [])
    key = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("model"), added], sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (special tokens of the tokenizer's template included). Uses
    ``encode_batch_fast`` (no character offsets; same ids) where this tokenizers version has it."""
    fast = getattr(tok, "encode_batch_fast", None)
    return [e.ids for e in (fast or tok.encode_batch)(texts)]


def save_hf_tokenizer(tokenizer_json: str | Path, out_dir: str | Path, model_max_length: int,
                      eos_token: str | None = None) -> None:
    """Write the tokenizer as a ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained(run)`` works.
    The EOS token is ``eos_token``, else the one a ``tokenizer_config.json`` beside ``tokenizer_json``
    declares (re-saving a saved run keeps it), else the tokenizer's own (``find_eos``)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = Path(tokenizer_json)
    tok = Tokenizer.from_file(str(tokenizer_json))
    declared = _declared_eos(tokenizer_json.parent / "tokenizer_config.json")
    eos = find_eos(tok, eos_token, declared)
    bos = next((t for t in BOS_CANDIDATES if tok.token_to_id(t) is not None), eos)
    unk = "<unk>" if tok.token_to_id("<unk>") is not None else eos
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        bos_token=bos,
        unk_token=unk,
        pad_token=eos,
        model_max_length=model_max_length,
    )
    hf.save_pretrained(str(out_dir))
    make_portable(out_dir)


# transformers 5 records the class of a plain tokenizer.json tokenizer as "TokenizersBackend", which
# transformers 4.x cannot load; "PreTrainedTokenizerFast" loads the same files in both.
PORTABLE_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def make_portable(out_dir: str | Path) -> None:
    """Rewrite ``tokenizer_config.json`` in ``out_dir`` so every transformers version we declare loads it."""
    path = Path(out_dir) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    cls = config.get("tokenizer_class")
    if cls in PORTABLE_CLASSES:
        config["tokenizer_class"] = PORTABLE_CLASSES[cls]
        config.pop("backend", None)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
