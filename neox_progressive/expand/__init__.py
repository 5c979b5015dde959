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

from neox_progressive.expand.options import ExpandOptions
from neox_progressive.expand.plan import ExpansionPlan, plan_expansion
from neox_progressive.expand.run import MANIFEST, MAPS_FILE, expand_checkpoint, load_maps, plan_for

__all__ = ["MANIFEST", "MAPS_FILE", "ExpandOptions", "ExpansionPlan", "expand_checkpoint", "load_maps", "plan_expansion",
           "plan_for"]
