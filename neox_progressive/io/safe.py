"""Loading `.pt` files without letting them run code.

Every load is `torch.load(weights_only=True)`: torch's restricted unpickler rebuilds tensors
and plain containers and refuses every other global. NeoX's `mp_rank_XX_model_states.pt`
files also hold objects that are not tensors (NumPy's RNG state from `np.random.get_state()`,
and whatever a DeepSpeed version adds). We never need those objects, so the globals they
name are mapped to `Opaque`, an inert placeholder that only records its arguments: no NumPy,
DeepSpeed or other foreign code runs during the load. Globals outside that explicit list
(`os.system`, `builtins.eval`, any other callable) make the file refused with its name.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from neox_progressive.errors import UserError

# Module prefixes whose objects may appear in NeoX/DeepSpeed checkpoints as data and are
# replaced by `Opaque` (never imported, never called).
OPAQUE_PREFIXES = ("numpy.", "deepspeed.", "megatron.", "argparse.Namespace", "collections.")


class Opaque:
    """Stands in for an object we do not need and will not build (e.g. a NumPy array)."""

    __slots__ = ("name", "args", "state")

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.name, obj.args, obj.state = None, args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<opaque {self.name or 'object'}>"


def _opaque_for(name: str):
    cls = type(f"Opaque[{name}]", (Opaque,), {"__slots__": ()})
    cls.__module__ = __name__
    return cls


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"checkpoint file {str(path)!r} is missing")
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        raise UserError(
            f"{path} is truncated or not a torch checkpoint (expected torch.save's zip format); "
            "the copy may be incomplete: copy it again or re-save it"
        )


def load_pt(path: str | Path, *, mmap: bool = True) -> Any:
    """Load one `.pt` file safely (tensors on CPU, memory-mapped where possible)."""
    path = Path(path)
    _check_file(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # a corrupt pickle stream
        raise UserError(f"{path} cannot be read as a torch checkpoint: {exc}") from None
    refused = [g for g in unsafe if not g.startswith(OPAQUE_PREFIXES)]
    if refused:
        raise UserError(
            f"{path} refers to {', '.join(sorted(refused))}, which a checkpoint has no reason to "
            "contain; refusing to load it (it could run code). Re-save it from a trusted source"
        )
    stand_ins = [(_opaque_for(g), g) for g in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is damaged and cannot be loaded ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # the restricted unpickler refuses anything else
        raise UserError(f"{path} cannot be loaded safely: {str(exc).splitlines()[0]}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A layer file: a flat {key: tensor} dict."""
    sd = load_pt(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a NeoX layer file (expected a dict of tensors)")
    return sd
