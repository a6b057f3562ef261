"""Export a sparse run as a compressed checkpoint, and load it back as the dense HF model.

A run stores its masked weights densely (zeros included) in ``model.safetensors``; at 75% sparsity
three quarters of those bytes are zeros. ``export_run`` writes the same weights without them:

``model.safetensors`` (one file) holds, for each weight W with a mask in ``masks.safetensors``:

* layout ``bitmask``: ``<name>.values``, the kept values of W in row-major (C) order of W as stored,
  1-D, in W's dtype; and ``<name>.bitmask``, uint8, ``numpy.packbits(mask.flatten(), bitorder="big")``:
  element 0 of the flattened mask is the most significant bit of byte 0, the last byte is padded
  with zero bits. 1 bit per weight.
* layout ``2:4`` (every group of 4 consecutive weights along the input axis keeps at most 2: the
  rule of ``sparselm.sparsity.masks.nm_problem``, which the 2:4 kernels share): the packed layout of
  an (out, in) matrix (GPT-2's Conv1D stores (in, out), so it is transposed first):
  ``<name>.values``, shape (out, in/2), the two stored values of each group in input order (a group
  that keeps fewer than 2 is padded with zero values at its lowest positions not kept); and
  ``<name>.indices``, uint8, shape (out, ceil(in/8)): per group of 4 one 4-bit nibble, bits 0-1 the
  position (0-3) of the first kept weight, bits 2-3 of the second (first < second); group 2k in the
  low nibble of byte k, group 2k+1 in its high nibble (a last odd group leaves the high nibble 0).
  Also 1 bit per weight. This is the logical metadata of a 2:4 sparse tensor-core matrix, not the
  interleaved order CUTLASS keeps in memory: ``torch.sparse.to_sparse_semi_structured`` takes the
  dense 2:4 matrix and reorders itself, so on CUDA the loader rebuilds the dense (out, in) weight
  and calls it (``load_exported(path, semi_structured=True)``, for ``nn.Linear`` layers in float16 or
  bfloat16); on the CPU the model stays dense.

Every other tensor is stored as it is, and tied weights once (as the run's own file has them). The
safetensors metadata key ``sparselm_export`` is a JSON string: ``{"format": "sparselm-sparse",
"version": 1, "bit_order": "big", "tensors": {name: {"layout", "shape", "dtype", "kept", "in_axis"}}}``;
it is what the loader reads. ``config.json``, ``generation_config.json``, the tokenizer files and
``summary.json`` are copied; ``export.json`` describes the format and the sizes; ``manifest.json``
seals the directory as in a run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..files import MANIFEST, CorruptFileError, Staging, read_json, reading, verify, write_json
from ..sparsity.masks import nm_problem

FORMAT, VERSION, BIT_ORDER = "sparselm-sparse", 1, "big"
META_KEY = "sparselm_export"
LAYOUTS = ("auto", "bitmask", "2:4")
REEXPORT_HINT = "export the run again"
COPIED = ("config.json", "generation_config.json", "summary.json", "special_tokens_map.json", "vocab.json",
          "merges.txt", "added_tokens.json", "tokenizer.model")  # plus tokenizer*.json, chat_template*


# ---- the two layouts -------------------------------------------------------------------------------
def encode_bitmask(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept values in row-major order, packed mask bits)."""
    bits = np.packbits(mask.reshape(-1).numpy(), bitorder=BIT_ORDER)
    return weight[mask].contiguous(), torch.from_numpy(bits)


def decode_bitmask(name: str, values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    """The dense weight; a values count other than the mask's popcount is an error naming ``name``."""
    numel = int(np.prod(shape))
    if bitmask.numel() != (numel + 7) // 8:
        raise CorruptFileError(f"{name}.bitmask has {bitmask.numel()} bytes, but a {tuple(shape)} weight needs "
                               f"{(numel + 7) // 8}; {REEXPORT_HINT}")
    mask = torch.from_numpy(np.unpackbits(bitmask.numpy(), count=numel, bitorder=BIT_ORDER).astype(bool))
    kept = int(mask.sum())
    if values.numel() != kept:
        raise CorruptFileError(f"{name}: {values.numel()} values stored, but its bitmask keeps {kept} weights; "
                               f"{REEXPORT_HINT}")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[mask] = values.reshape(-1)
    return dense.view(*shape)


def not_2_4(mask: torch.Tensor, in_axis: int | None) -> str | None:
    """Why ``mask`` cannot be stored in the 2:4 layout (``nm_problem`` of 2:4), or None when it can."""
    if in_axis is None:
        return "not the weight of a linear layer"
    return nm_problem(mask, 2, 4, in_axis)


def encode_2_4(weight: torch.Tensor, mask: torch.Tensor, in_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in/2), nibble indices (out, ceil(in/8))) of a weight whose mask keeps at most 2 of
    every 4 along ``in_axis``, as the module docstring says: a group with fewer is padded."""
    w, m = weight.movedim(in_axis, -1), mask.movedim(in_axis, -1)
    rows, cols = m.shape
    groups = m.reshape(rows, cols // 4, 4)
    free = ~groups  # pad each group to 2 with its lowest positions not kept
    stored = groups | (free & (free.cumsum(-1) <= 2 - groups.sum(-1, keepdim=True)))
    stored = stored.reshape(rows, cols)
    # boolean indexing keeps row-major order: the stored values of each group in input order
    values = torch.where(m, w, torch.zeros_like(w))[stored].reshape(rows, cols // 2)
    pos = stored.reshape(rows, cols // 4, 4).nonzero()[:, 2].reshape(rows, cols // 4, 2).to(torch.uint8)
    nibbles = pos[..., 0] | (pos[..., 1] << 2)
    if nibbles.shape[1] % 2:
        nibbles = torch.cat([nibbles, torch.zeros(rows, 1, dtype=torch.uint8)], 1)
    return values.contiguous(), (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()


def decode_2_4(name: str, values: torch.Tensor, indices: torch.Tensor, shape, in_axis: int) -> torch.Tensor:
    """The dense weight (in its stored orientation ``shape``) of a 2:4-packed one."""
    rows, cols = (shape[1], shape[0]) if in_axis == 0 else tuple(shape)
    groups = cols // 4
    if tuple(values.shape) != (rows, cols // 2) or tuple(indices.shape) != (rows, (groups + 1) // 2):
        raise CorruptFileError(f"{name}: 2:4 values {tuple(values.shape)} and indices {tuple(indices.shape)} do not "
                               f"fit a {tuple(shape)} weight; {REEXPORT_HINT}")
    nibbles = torch.stack([indices & 0xF, indices >> 4], -1).reshape(rows, -1)[:, :groups]
    first, second = (nibbles & 3).long(), (nibbles >> 2).long()
    if (first >= second).any():
        raise CorruptFileError(f"{name}.indices is corrupt (a group's kept positions are not increasing); "
                               f"{REEXPORT_HINT}")
    mask = torch.zeros(rows, groups, 4, dtype=torch.bool)
    mask.scatter_(2, first.unsqueeze(-1), True).scatter_(2, second.unsqueeze(-1), True)
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask.view(rows, cols)] = values.reshape(-1)
    return dense.movedim(-1, in_axis).contiguous()


# ---- export ------------------------------------------------------------------------------------------
def _copied(run: Path) -> list[str]:
    names = set(COPIED) | {p.name for p in run.glob("tokenizer*")} | {p.name for p in run.glob("chat_template*")}
    return sorted(n for n in names if (run / n).is_file())


def export_run(run_dir: str | Path, out_dir: str | Path, layout: str = "auto") -> dict:
    """Write run ``run_dir`` to ``out_dir`` in the compressed format; return what was written.

    ``layout``: ``bitmask`` (any mask), ``2:4`` (refused unless every mask keeps at most 2 of every 4
    along its input axis, naming the first layer that does not) or ``auto`` (2:4 where every mask
    keeps exactly 2 of every 4, else bitmask: the smaller of the two).
    A run without masks is refused: there is nothing to compress. Weights outside a mask must be
    zero (the mask describes the weights): otherwise the export would silently change the model."""
    from safetensors.torch import load_file, save_file

    from ..sparsity.selection import select_targets
    from .runs import RESTORE_RUN_HINT, load_run

    run, out = Path(run_dir), Path(out_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    dense_run = (f"{run} has no masks.safetensors: nothing to compress (a dense run); make it sparse with "
                 f"`sparselm prune --from {run} --out DIR`, then export that")
    if not (run / "masks.safetensors").exists() and (run / "config.json").exists():
        raise ValueError(dense_run)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out")
    model, _, masks, summary = load_run(run)  # checks the manifest, the mask counts and the tokenizer
    if not masks:
        raise ValueError(dense_run)
    with reading(run / "model.safetensors", RESTORE_RUN_HINT):
        tensors = load_file(str(run / "model.safetensors"))  # as saved: tied weights once
    order = {n: i for i, (n, _) in enumerate(model.named_parameters(remove_duplicate=False))}
    names = sorted(masks, key=lambda n: order.get(n, len(order)))  # layer order, for "the first offending layer"
    try:
        in_axis = {t.name: t.in_axis for t in select_targets(model, include=names, exclude=())}
    except ValueError:  # no mask is on a linear weight
        in_axis = {}

    for name in names:
        if name not in tensors or tensors[name].shape != masks[name].shape:
            raise ValueError(f"{run}: the mask of {name} has no weight of its shape in model.safetensors")
        if tensors[name][~masks[name]].any():
            raise ValueError(f"{run}: {name} has non-zero weights outside its mask (a dense fine-tune that kept "
                             "its masks?); exporting would change the model")
    reasons = {n: not_2_4(masks[n], in_axis.get(n)) for n in names}
    first_bad = next((n for n in names if reasons[n]), None)
    if layout == "2:4" and first_bad:
        raise ValueError(f"{run} is not a 2:4 run: layer {first_bad} ({reasons[first_bad]}); every mask must keep "
                         "at most 2 of each 4 consecutive weights along the input axis; use --layout bitmask")
    # auto: 2:4 where every group keeps exactly 2 (then it is as small as the bitmask and loads onto the
    # kernels); a sparser N:M run (1:4) is smaller as a bitmask, and --layout 2:4 packs it anyway
    half = all(2 * int(masks[n].sum()) == masks[n].numel() for n in names)
    chosen = "2:4" if layout == "2:4" or (layout == "auto" and first_bad is None and half) else "bitmask"

    stored, info = {}, {}
    for key, tensor in tensors.items():
        if key not in masks:
            stored[key] = tensor.contiguous()
            continue
        mask, entry = masks[key], {"layout": chosen, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
        entry["kept"] = int(mask.sum())
        if chosen == "2:4":
            entry["in_axis"] = in_axis[key]
            stored[f"{key}.values"], stored[f"{key}.indices"] = encode_2_4(tensor, mask, in_axis[key])
        else:
            stored[f"{key}.values"], stored[f"{key}.bitmask"] = encode_bitmask(tensor, mask)
        info[key] = entry
    meta = {"format": FORMAT, "version": VERSION, "bit_order": BIT_ORDER, "tensors": info}

    tmp = out.with_name(out.name + ".tmp")
    with Staging(tmp, out, f"{run} is untouched") as stage:
        stage.write("model.safetensors", lambda p: save_file(stored, str(p), metadata={"format": "pt",
                                                                                       META_KEY: json.dumps(meta)}))
        for name in _copied(run):
            stage.write(name, lambda p, name=name: shutil.copyfile(run / name, p))
        dense, exported = (run / "model.safetensors").stat().st_size, (tmp / "model.safetensors").stat().st_size
        total = sum(m.numel() for m in masks.values())
        report = {
            "format": FORMAT, "version": VERSION, "layout": chosen, "bit_order": BIT_ORDER, "source": str(run),
            "dense_bytes": dense, "exported_bytes": exported, "ratio": exported / dense,
            "masked_layers": len(masks), "masked_params": total,
            "sparsity": 1 - sum(e["kept"] for e in info.values()) / total,
            "method": summary.get("sparsity", {}).get("method"),
        }
        stage.write("export.json", lambda p: write_json(p, {**report, "tensors": info}))
        stage.seal()
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):  # the manifest last: complete
        os.replace(entry, out / entry.name)
    tmp.rmdir()
    return {**report, "out": str(out)}


# ---- load --------------------------------------------------------------------------------------------
def _decode(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The run's tensors (dense) and the export metadata of ``path``/model.safetensors."""
    from safetensors import safe_open

    file = path / "model.safetensors"
    with reading(file, REEXPORT_HINT), safe_open(str(file), "pt") as f:
        raw_meta = (f.metadata() or {}).get(META_KEY)
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if raw_meta is None:
        raise CorruptFileError(f"{file} is not a sparselm export (no {META_KEY} metadata); load a run with load_run")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{file}: its {META_KEY} metadata is not JSON ({e.msg}); {REEXPORT_HINT}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{file}: format {meta.get('format')} version {meta.get('version')} is not "
                         f"{FORMAT} version {VERSION}; use the sparselm that wrote it")
    tensors = {}
    for name, e in meta["tensors"].items():
        try:
            values = stored.pop(f"{name}.values")
            other = stored.pop(f"{name}.indices" if e["layout"] == "2:4" else f"{name}.bitmask")
        except KeyError as missing:
            raise CorruptFileError(f"{file} has no tensor {missing} ({name} is stored as {e['layout']}); "
                                   f"{REEXPORT_HINT}") from None
        if str(values.dtype) != e["dtype"]:
            raise CorruptFileError(f"{file}: {name}.values is {values.dtype}, recorded {e['dtype']}; {REEXPORT_HINT}")
        if e["layout"] == "2:4":
            tensors[name] = decode_2_4(name, values, other, e["shape"], e["in_axis"])
        else:
            tensors[name] = decode_bitmask(name, values, other, e["shape"])
    return {**stored, **tensors}, meta


def load_exported(path: str | Path, semi_structured: bool = False):
    """(model, tokenizer) of an exported run: the plain HF model of the run's family with weights
    identical to the run's. ``semi_structured``: on CUDA, put the model on the GPU and make the
    weights of 2:4 ``nn.Linear`` layers ``torch.sparse`` semi-structured tensors (they need float16 or
    bfloat16 weights; GPT-2's Conv1D computes x @ W rather than F.linear and stays dense); on the CPU
    the flag does nothing and the model is dense."""
    from transformers import AutoConfig

    from .family import family_for_config
    from .runs import load_tokenizer

    path = Path(path)
    verify(path, REEXPORT_HINT)
    read_json(path / "config.json", REEXPORT_HINT)
    tensors, meta = _decode(path)
    config = AutoConfig.from_pretrained(str(path))
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    model = family_for_config(config).model_class._from_config(config, attn_implementation="sdpa", dtype=dtype)
    # tied weights are stored once: give each alias of a stored tensor the same tensor
    state = model.state_dict(keep_vars=True)
    by_ptr = {state[k].data_ptr(): k for k in tensors if k in state}
    for k, v in state.items():
        if k not in tensors and v.data_ptr() in by_ptr:
            tensors[k] = tensors[by_ptr[v.data_ptr()]]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the exported weights do not match the {config.model_type} model: {e}") from None
    model.eval()
    with reading(f"the tokenizer files in {path}", REEXPORT_HINT):
        tok = load_tokenizer(path)
    if semi_structured:
        _semi_structured(model, [n for n, e in meta["tensors"].items() if e["layout"] == "2:4"])
    return model, tok


def _semi_structured(model, names: list[str]) -> None:
    """Swap 2:4 Linear weights for semi-structured sparse tensors on CUDA (not run by the CPU tests)."""
    if not torch.cuda.is_available():
        logging.getLogger("sparselm").warning("semi_structured: no CUDA device; the model stays dense")
        return
    from torch.sparse import to_sparse_semi_structured

    model.cuda()
    for name in names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
