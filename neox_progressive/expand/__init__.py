"""Grow a trained NeoX checkpoint into the start of the next family member (bert2BERT AKI / FPI).

Public API (the family runner and the `expand` verb use these):

- `ExpandOptions` (options.py): method aki|fpi, depth_rule, new_layer_init, rms_comp, map_sampling,
  seed, gqa_layout, aki_second, aki_hidden; `ExpandOptions.from_dict(d)`.
- `expand_checkpoint(src, src_configs, dst_configs, out, options, *, force, quiet, stage) -> dict`:
  writes `out` atomically with `expansion.json` inside it and returns that record.
- `plan_expansion(src_shape, dst_shape, options, stage)` -> `ExpansionPlan` (pure, no tensors;
  `--dry-run` prints `plan.describe()`, `--dry-run --format json` `plan.summary()` with every target
  tensor's rule, sources, maps, shape and bytes), `plan_for(src, src_configs, dst_configs, options, stage)`.

Layout: maps.py (unit maps, hashed draws, GQA layouts, depth orders), plan.py (checks, exactness,
the tensor list), rules.py (one pure rule per tensor role, registered by name; the roles of the
keys are data in `arch.LAYER_ROLES` / `arch.MODEL_ROLES`), run.py (streaming executor). The rules
are EXPANSION_SPEC.md's, extended to NeoX's classic transformer (LayerNorm, GeLU, biases).
"""

import importlib

# name -> module; imported on first use, so that `expand --help` and the options load without torch
_HOME = {"ExpandOptions": "options", "ExpansionPlan": "plan", "plan_expansion": "plan", "MANIFEST": "run",
         "MAPS_FILE": "run", "expand_checkpoint": "run", "load_maps": "run", "plan_for": "run"}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"neox_progressive.expand.{_HOME[name]}"), name)
    raise AttributeError(f"module 'neox_progressive.expand' has no attribute {name!r}")
