"""Plugins: an installed distribution's entry points add sparsity methods (and families, tasks,
metrics) that the CLI uses like built-in ones; they load on a registry's first read, never at
import, and a broken or clashing plugin is named once and skipped without breaking anything.

The distributions here are real: a package plus a ``*.dist-info`` folder on ``sys.path``, which is
all ``importlib.metadata`` needs (no pip install)."""

from __future__ import annotations

import json
import logging
import os
import pkgutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from safetensors.torch import load_file

import sparselm
from sparselm.registry import Registry

SRC = Path(sparselm.__file__).resolve().parents[1]

KEEP_LAST = '''
import torch
from sparselm.sparsity import Sparsifier


class KeepLastWeights(Sparsifier):
    """Keeps each layer's largest-index weights: masks a test recognises at a glance."""

    name = "mine"
    help = "keep the largest-index weights (plugin test method)"

    def init_masks(self):
        return self.masks_for(self.sparsity, {t.name: torch.arange(t.param.numel(), dtype=torch.float64).view(t.param.shape)
                                              for t in self.targets})
'''

EXTRAS = '''
from sparselm.data.tasks import Task
from sparselm.evaluation.metrics import Metric

METRIC = Metric("mine-metric", "Mine", True, {"count": lambda hyps, refs: {"mine-metric": float(len(hyps))}})
TASK = Task("mine-task", lambda folder, skip_bad_rows: None, None, ("mine-metric",))
'''

GPT2_AGAIN = '''
from sparselm.models.families.gpt2 import GPT2Family


class GPT2Again(GPT2Family):
    name = "gpt2-again"


FAMILY = GPT2Again()
'''

CLASHING = '''
from sparselm.sparsity import Sparsifier


class NotStatic(Sparsifier):
    name = "static"
    help = "a plugin trying to take a built-in name"
'''


def write_dist(root: Path, name: str, entry_points: dict[str, dict[str, str]], files: dict[str, str]) -> Path:
    """A distribution ``name`` 0.1 in ``root``: its files and a dist-info with its entry points."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in entry_points.items()))
    return root


@pytest.fixture(scope="module")
def good_site(tmp_path_factory):
    """A distribution with a method, a task and a metric: ``mine``, ``mine-task``, ``mine-metric``."""
    return write_dist(tmp_path_factory.mktemp("good-site"), "sparselm-mine",
                      {"sparselm.methods": {"mine": "sparselm_mine:KeepLastWeights"},
                       "sparselm.tasks": {"mine-task": "sparselm_mine.extras:TASK"},
                       "sparselm.metrics": {"mine-metric": "sparselm_mine.extras:METRIC"}},
                      {"sparselm_mine/__init__.py": KEEP_LAST, "sparselm_mine/extras.py": EXTRAS})


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory):
    """A distribution with a plugin that cannot be imported, one that takes a built-in method's name and
    a family that loads GPT-2 configs, which the built-in gpt2 family does."""
    return write_dist(tmp_path_factory.mktemp("bad-site"), "sparselm-bad",
                      {"sparselm.methods": {"broken": "sparselm_bad.broken", "not-static": "sparselm_bad.clash:NotStatic"},
                       "sparselm.families": {"gpt2-again": "sparselm_bad.family:FAMILY"}},
                      {"sparselm_bad/__init__.py": "", "sparselm_bad/clash.py": CLASHING, "sparselm_bad/family.py": GPT2_AGAIN,
                       "sparselm_bad/broken.py": "raise ImportError('needs libfoo, which is not installed')\n"})


def python(*args: str, sites: list[Path], env: dict | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` with the fake distributions and this checkout's sparselm on the path."""
    path = os.pathsep.join([*map(str, sites), str(SRC), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], env={**os.environ, **(env or {}), "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=300)


BUILT_IN_FAMILIES = sorted(m.name for m in pkgutil.iter_modules([str(SRC / "sparselm" / "models" / "families")]))


# ---- through the CLI, in fresh processes -----------------------------------------------------------
def test_importing_sparselm_loads_no_plugin_and_the_first_lookup_does(good_site, bad_site):
    code = ("import sys, sparselm, sparselm.models, sparselm.sparsity, sparselm.data, sparselm.evaluation, "
            "sparselm.training, sparselm.experiments, sparselm.cli.main\n"
            "print(sorted(m for m in sys.modules if m.startswith('sparselm_')))\n"
            "from sparselm.sparsity import METHODS\n"
            "print('mine' in METHODS, sorted(m for m in sys.modules if m.startswith('sparselm_')))\n"
            "from sparselm.data.tasks import TASKS\nfrom sparselm.evaluation.metrics import METRICS, score\n"
            "from sparselm.models import FAMILIES\n"
            "print(score('mine-task', ['a', 'b'], [['a'], ['c']]), sorted(FAMILIES))\n")
    done = python("-c", code, sites=[good_site, bad_site])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True ['sparselm_bad', 'sparselm_bad.clash', 'sparselm_mine']",
                                        f"{{'mine-metric': 2.0}} {BUILT_IN_FAMILIES}"]  # (the clashing one skipped)
    assert done.stderr.count("failed to load") == 3  # at the lookups, not at import
    assert ("plugin 'gpt2-again' (entry point sparselm.families: gpt2-again = sparselm_bad.family:FAMILY, of distribution "
            "sparselm-bad 0.1) failed to load: ValueError: model_type 'gpt2' is already loaded by family 'gpt2'; skipped"
            ) in done.stderr


@pytest.mark.slow
def test_a_method_plugin_trains_through_the_cli(good_site, small_corpus, cache_dir, tmp_path):
    run = tmp_path / "run"
    done = python("-m", "sparselm.cli.main", "pretrain", "--preset", "tiny", "--method", "mine", "--sparsity", "0.5",
                  "--max-steps", "3", "--batch-size", "4", "--corpus", str(small_corpus), "--out", str(run), "--no-progress",
                  "--set", "optim.warmup_steps=0", "--set", "model.n_layer=2", "--set", "model.vocab_size=512",
                  "--set", "model.block_size=64", "--set", "run.eval_batches=1",
                  sites=[good_site], env={"SPARSELM_CACHE": str(cache_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plugin" not in done.stderr
    assert json.loads((run / "summary.json").read_text())["sparsity"]["method"] == "mine"
    masks = load_file(str(run / "masks.safetensors"))
    assert len(masks) == 8  # 2 layers x (attention in/out, MLP in/out)
    for name, mask in masks.items():
        flat = mask.flatten().bool()
        kept = int(flat.sum())
        assert kept == flat.numel() // 2, name
        assert flat[-kept:].all() and not flat[:-kept].any(), name  # the plugin's rule: the largest indices


def test_broken_and_clashing_plugins_are_named_once_and_skipped(good_site, bad_site):
    help_run = python("-m", "sparselm.cli.main", "pretrain", "--help", sites=[bad_site, good_site])
    assert help_run.returncode == 0, help_run.stderr
    assert "mine: keep the largest-index weights" in " ".join(help_run.stdout.split())  # the good plugin still loads
    err = help_run.stderr
    assert err.count("plugin 'broken' (entry point sparselm.methods: broken = sparselm_bad.broken, of distribution "
                     "sparselm-bad 0.1) failed to load: ImportError: needs libfoo, which is not installed; skipped") == 1
    assert err.count("plugin 'not-static'") == 1
    assert "ValueError: sparsity method 'static' is already registered; a plugin cannot replace it" in err
    assert len(err.splitlines()) == 2  # nothing else on stderr

    code = ("from sparselm.cli.main import main\n"
            "rc = main(['flops', '--preset', 'tiny', '--sparsity', '0.5'])\n"
            "from sparselm.sparsity import METHODS, Static\n"
            "print('rc', rc, 'static is Static:', METHODS['static'] is Static)\n")
    flops = python("-c", code, sites=[bad_site])
    assert "dense/sparse ratio" in flops.stdout and "rc 0 static is Static: True" in flops.stdout, flops.stderr
    assert flops.stderr.count("plugin 'broken'") == 1 and flops.stderr.count("plugin 'not-static'") == 1


# ---- the Registry itself, in this process -------------------------------------------------------------
GROUP = "sparselm_test.widgets"


@pytest.fixture
def widget_site(tmp_path, monkeypatch):
    """Widget plugins: an object, a module that registers two, a module that registers one and then
    fails, and an object without a name. ``sparselm_test_host.REGISTRY`` is the registry they fill."""
    site = write_dist(tmp_path, "widgets", {GROUP: {
        "round": "widgets_objects:ROUND",
        "pair": "widgets_pair",
        "half": "widgets_half",
        "nameless": "widgets_objects:NAMELESS",
    }}, {
        "widgets_objects.py": "import types\nROUND = types.SimpleNamespace(name='round')\nNAMELESS = object()\n",
        "widgets_pair.py": "import types\nfrom sparselm_test_host import REGISTRY\n"
                           "REGISTRY.register('left', types.SimpleNamespace(name='left'), replace=True)\n"
                           "REGISTRY['right'] = types.SimpleNamespace(name='right')\n",
        "widgets_half.py": "import types\nfrom sparselm_test_host import REGISTRY\n"
                           "REGISTRY.register('half', types.SimpleNamespace(name='half'))\n"
                           "raise RuntimeError('second half missing')\n",
    })
    monkeypatch.syspath_prepend(str(site))
    for mod in ("widgets_objects", "widgets_pair", "widgets_half"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    registry = Registry("widget", entry_points=GROUP)
    monkeypatch.setitem(sys.modules, "sparselm_test_host", types.SimpleNamespace(REGISTRY=registry))
    yield registry
    for mod in ("widgets_objects", "widgets_pair"):
        sys.modules.pop(mod, None)


READS = {
    "getitem": lambda r: r["round"], "get": lambda r: r.get("round"), "contains": lambda r: "round" in r,
    "iter": lambda r: list(r), "len": len, "keys": lambda r: list(r.keys()), "values": lambda r: list(r.values()),
    "items": lambda r: list(r.items()), "lookup": lambda r: r.lookup("round"), "dict": dict, "eq": lambda r: r == {},
}


@pytest.mark.parametrize("read", sorted(READS))
def test_every_read_loads_the_plugins_first(widget_site, read):
    widget_site.register("built-in", types.SimpleNamespace(name="built-in"))  # a write loads nothing
    assert "widgets_objects" not in sys.modules
    READS[read](widget_site)
    assert list(widget_site.declared) == ["built-in", "round", "left", "right"]


def test_a_failing_plugin_is_named_once_and_leaves_nothing(widget_site, caplog):
    with caplog.at_level(logging.WARNING, logger="sparselm"):
        assert sorted(widget_site) == ["left", "right", "round"]  # "half" registered, then failed: rolled back
        assert len(widget_site) == 3 and widget_site.lookup("left").name == "left"  # loaded once: no second warnings
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith("plugin 'half' (entry point sparselm_test.widgets: half = widgets_half, of distribution "
                                  "widgets 0.1) failed to load: RuntimeError: second half missing; skipped")
    assert warnings[1].startswith("plugin 'nameless'") and "AttributeError" in warnings[1]


def test_a_plugin_cannot_replace_what_is_registered(widget_site, caplog):
    builtin = widget_site.register("left", types.SimpleNamespace(name="left"))
    with caplog.at_level(logging.WARNING, logger="sparselm"):
        assert widget_site["left"] is builtin
    assert "right" not in widget_site  # the module plugin that clashed, even with replace=True, is skipped whole
    clash = [r.getMessage() for r in caplog.records if "'pair'" in r.getMessage()]
    assert len(clash) == 1 and "widget 'left' is already registered; a plugin cannot replace it" in clash[0]
    with pytest.raises(ValueError, match="widget 'left' is already registered; pass replace=True"):
        widget_site.register("left", types.SimpleNamespace(name="left"))  # outside plugin loading: the usual rule
    assert widget_site.register("left", builtin) is builtin


def test_the_unknown_name_error_lists_plugins_too(widget_site):
    with pytest.raises(ValueError, match=r"unknown widget 'square'; registered widgets: \['left', 'right', 'round'\]"):
        widget_site.lookup("square")


def test_registries_without_a_group_and_the_built_in_groups():
    from sparselm.data.tasks import TASKS
    from sparselm.evaluation.metrics import METRICS
    from sparselm.models import FAMILIES
    from sparselm.sparsity import METHODS

    plain = Registry("thing")
    plain.register("a", 1)
    assert dict(plain) == {"a": 1}
    assert [r.group for r in (METHODS, FAMILIES, TASKS, METRICS)] == [
        "sparselm.methods", "sparselm.families", "sparselm.tasks", "sparselm.metrics"]
