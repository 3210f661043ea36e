"""posttrain: the language-model post-training pipeline of the RLHF book.

The package is layered (docs/architecture.md is the map): ``maths`` (pure losses and selection rules), ``data``
(rows, rendering, packing), ``plumbing`` (config, run harness, checkpoints, logs), ``models`` (loading, heads,
attention, per-token log-probs, generation), ``rewards`` (the reward contract: RMs, verifiers, judges), ``world``
(the tiny world and its gold-based evaluation) and ``stages`` (one file per command). Import what you need from its
modules; this ``__init__`` imports nothing heavy.

Modules that moved when the tree was layered stay importable under their first names (``posttrain.sft``,
``posttrain.losses``, ``posttrain.sampling``, ...): ``import posttrain.sft`` returns the very module object of
``posttrain.stages.sft``, so attributes, patches and ``isinstance`` checks are shared.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# OpenMP threads that wait at a barrier sleep instead of spinning (set before torch loads its OpenMP runtime; an
# explicit setting wins). On a 2-core machine with another busy process, spinning threads steal the cores the work
# needs: pretraining the tiny world's base model ran at 2170 tokens/s with the default and 3650-4170 with PASSIVE
# (6020 on an idle machine; benchmarks/RESULTS.md, "Threads on a busy machine").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MOVED_MODULES = {
    "posttrain.attention": "posttrain.models.attention",
    "posttrain.modeling": "posttrain.models",
    "posttrain.generation": "posttrain.models.generation",
    "posttrain.losses": "posttrain.maths",
    "posttrain.sampling": "posttrain.maths.selection",
    "posttrain.advantages": "posttrain.maths.advantages",  # not moved: the short name the RL issue's API names
    "posttrain.judge": "posttrain.rewards.judge",
    "posttrain.verifiers": "posttrain.rewards.verifiers",
    "posttrain.checkpoint": "posttrain.plumbing.checkpoint",
    "posttrain.config": "posttrain.plumbing.config",
    "posttrain.runlog": "posttrain.plumbing.runlog",
    "posttrain.training": "posttrain.plumbing.training",
    "posttrain.templates": "posttrain.data.templates",
    "posttrain.evaluate": "posttrain.world.evaluate",
    "posttrain.world.build": "posttrain.stages.world",
    **{f"posttrain.{name}": f"posttrain.stages.{name}" for name in (
        "bestofn", "chat", "demo", "dpo", "label", "pretrain", "rm", "rs", "scaling", "serve", "sft")},
}
"""First module path -> where the module lives now."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves a first module path to the module at its new path (the same object, not a copy)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__  # the import system sets module.__spec__ = spec; exec_module undoes it
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
