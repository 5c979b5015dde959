"""Options of an expansion (EXPANSION_SPEC section 8), one frozen dataclass.

Defaults follow the paper (Yano et al. 2025 use bert2BERT AKI) and the most common reading of
bert2BERT where the sources leave a choice open (EXPANSION_SPEC section 5):

- method `aki` (paper); `fpi` is the function-preserving variant.
- depth_rule `b2b` (bert2BERT Algorithm 1: whole stacks, then the top layers).
- new_layer_init `copy` (stacked layers are plain copies); `zero_out` sets Wo = W_down = 0 on
  the added layers, which makes them the identity (exact with FPI).
- rms_comp: None picks the method's default, `none` for aki (as bert2BERT/AquilaMoE), `exact`
  for fpi (residual rescaling that makes RMSNorm exact at any width ratio, EXPANSION_SPEC sec. 4).
  LayerNorm models (NeoX's classic transformer): always `none`; `exact` cannot make LayerNorm
  exact and is refused (`plan.resolve_rms_comp`; the derivation is in expand/rules.py).
- map_sampling `uniform` (bert2BERT: i.i.d. with replacement); `balanced` permutations.
- gqa_layout `auto` (mha, g_fixed, kv_fixed or general, the first the head counts allow).
- aki_second `current` (Wo / W_down columns from layer l, the LEMON AKI baseline's literal
  per-matrix reading); `upper` takes the new units' columns from layer l+1 (zxhcelestes).
- aki_hidden `copy` (rows of new hidden indices are copies, the residual stream stays a
  consistent copy); `upper` takes them from layer l+1.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from neox_progressive.errors import UserError

CHOICES: dict[str, tuple] = {
    "method": ("aki", "fpi"),
    "depth_rule": ("b2b", "interp", "cyclic"),
    "new_layer_init": ("copy", "zero_out"),
    "rms_comp": (None, "none", "exact"),
    "map_sampling": ("uniform", "balanced"),
    "gqa_layout": ("auto", "mha", "g_fixed", "kv_fixed", "general"),
    "aki_second": ("current", "upper"),
    "aki_hidden": ("copy", "upper"),
}


@dataclass(frozen=True)
class ExpandOptions:
    """The `expand` verb's flags are generated from these fields; the docstrings are their help."""

    method: str = "aki"
    """aki (bert2BERT advanced knowledge initialization, as in the paper) or fpi (function preserving)."""
    depth_rule: str = "b2b"
    """Which source layer an added layer copies: b2b (bert2BERT Algorithm 1: whole stacks, then the top layers);
    interp: t -> floor(t L/L'); cyclic: t mod L."""
    new_layer_init: str = "copy"
    """Added layers: copy, or zero_out (Wo = W_down = 0: the layer is the identity)."""
    rms_comp: str | None = None
    """RMSNorm compensation; default none for aki, exact for fpi (what makes FPI exactly function preserving);
    LayerNorm models: none only (see above)."""
    map_sampling: str = "uniform"
    """New units: uniform with replacement (the paper's) or balanced permutations."""
    seed: int = 0
    """Seed of the hashed unit maps."""
    gqa_layout: str = "auto"
    """auto: the first of mha, g_fixed (same group size), kv_fixed (same KV heads) and general (each target group
    copies one source group) that the head counts allow."""
    aki_second: str = "current"
    """AKI Wo/W_down columns of new units: from the current layer, or the upper layer l+1."""
    aki_hidden: str = "copy"
    """AKI Wo/W_down rows of new hidden units: copies, or from the upper layer l+1."""

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                shown = ", ".join(str(a) for a in allowed if a is not None)
                raise UserError(f"expansion option {name}: {value!r} is not one of {shown}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserError(f"expansion option seed: {self.seed!r} is not an integer")

    @property
    def resolved_rms_comp(self) -> str:
        """`rms_comp`, with None replaced by the method's default for RMSNorm models (aki: none, fpi: exact).

        The plan's `rms_comp` (`plan.resolve_rms_comp`) is the one applied: LayerNorm models get none."""
        if self.rms_comp is not None:
            return self.rms_comp
        return "exact" if self.method == "fpi" else "none"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rms_comp"] = self.resolved_rms_comp
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> ExpandOptions:
        """Build from a mapping (family YAML `expansion:`, expansion.json); dashes allowed in keys."""
        d = {str(k).replace("-", "_"): v for k, v in (d or {}).items()}
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; known options: {', '.join(names)}"
                raise UserError(f"unknown expansion option {key!r}{hint}")
        if "map_sampling" in d and d["map_sampling"] == "uniform_with_replacement":
            d["map_sampling"] = "uniform"
        return cls(**d)


DEFAULT_OPTIONS = ExpandOptions()
"""The defaults (immutable, so safe as a default argument)."""
