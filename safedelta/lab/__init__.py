"""The safety lab: Safe Delta against the baselines on a real model (SmolLM2-135M-Instruct).

- :mod:`safedelta.lab.scenarios`: the training sets and which prompts go where (disjoint);
- :mod:`safedelta.lab.models`: base, aligned parent and fine-tunes, built once and cached;
- :mod:`safedelta.lab.run`: scenarios x methods -> BENCHMARKS.md table and plots.

``python -m safedelta.lab run`` (``make lab``) regenerates everything; ``python -m safedelta.lab
build`` only builds the models.
"""

from __future__ import annotations

from safedelta.lab.models import (
    LabModels,
    LabSettings,
    TrainRecipe,
    build_aligned,
    build_base,
    build_demo_pair,
    build_finetune,
)

__all__ = ["LabModels", "LabSettings", "TrainRecipe", "build_aligned", "build_base",
           "build_demo_pair", "build_finetune"]
