"""Loading `.pt` files without letting them run code.

Every load is `torch.load(weights_only=True)`: torch's restricted unpickler rebuilds tensors
and plain containers and refuses every other global. NeoX's `mp_rank_XX_model_states.pt`
files also hold objects that are not tensors (NumPy's RNG state from `np.random.get_state()`,
and whatever a DeepSpeed version adds). We never need those objects, so the globals they
name are mapped to `Opaque`, an inert placeholder that only records its arguments: no NumPy,
DeepSpeed or other foreign code runs during the load. Globals outside that explicit list
(`os.system`, `builtins.eval`, any other callable) make the file refused with its name.

Two paths, one policy:
- torch >= 2.5: `torch.serialization.get_unsafe_globals_in_checkpoint` lists the globals torch's own
  restricted unpickler would refuse; those outside `OPAQUE_PREFIXES` refuse the file, the others are
  admitted as `Opaque` stand-ins (`safe_globals`) and the file is loaded with `weights_only=True`.
- older torch (GPT-NeoX's containers ship 2.3 and 2.4 builds, which lack that API and `safe_globals`):
  torch.load reads the zip and storages with our `RestrictedUnpickler` as its pickle module. Its
  `find_class` returns only the tensor-rebuilding functions, dtypes, sizes, devices and plain
  containers of `_allowed()`, an `Opaque` stand-in for `OPAQUE_PREFIXES`, and refuses every other
  global before anything is called (the "restricting globals" recipe of Python's pickle docs).
  `weights_only` is False there only because torch accepts no pickle module of ours with it.
Tests force the second path on a current torch (`use_torch_scan`).
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import pickle
import types
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
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        names = None
    if path.stat().st_size == 0 or names is None:
        raise UserError(
            f"{path} is truncated or not a torch checkpoint (expected torch.save's zip format); "
            "the copy may be incomplete: copy it again or re-save it"
        )
    if any(n.split("/")[-1] == "constants.pkl" for n in names):  # torch.load would hand it to torch.jit.load
        raise UserError(f"{path} is a TorchScript archive, not a checkpoint; refusing to load it")


def use_torch_scan() -> bool:
    """torch can list a checkpoint's globals and admit stand-ins (2.5+); else the restricted unpickler is used."""
    return hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint") and hasattr(torch.serialization, "safe_globals")


def _refuse(path: Path, names) -> UserError:
    return UserError(
        f"{path} refers to {', '.join(sorted(names))}, which a checkpoint has no reason to "
        "contain; refusing to load it (it could run code). Re-save it from a trusted source"
    )


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as pickle protocol 2 uses it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}: only latin-1 text is rebuilt")
    return text.encode("latin1")


@functools.cache
def _allowed() -> dict[str, Any]:
    """The globals a tensor checkpoint needs, by `module.name`: nothing here runs code beyond building data."""
    out: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
        "builtins.complex": complex, "builtins.slice": slice,
        "_codecs.encode": _latin1,
        "torch.Size": torch.Size, "torch.device": torch.device,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            out[f"torch._utils.{name}"] = getattr(torch._utils, name)
    out.update({f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return out


class _Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(f"refused global {name}")
        self.name = name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds tensors and plain data only (torch.load supplies the storages)."""

    def find_class(self, module: str, name: str):
        # Python 2 names (torch.save writes protocol 2), mapped as pickle's own find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        found = _allowed().get(full)
        if found is not None:
            return found
        if full.startswith(OPAQUE_PREFIXES):
            return _opaque_for(full)
        raise _Refused(full)


# What torch.load needs of a pickle module for zip-format files.
RESTRICTED_PICKLE = types.SimpleNamespace(__name__=f"{__name__}.restricted", Unpickler=RestrictedUnpickler)


def _load_with_torch_scan(path: Path, mmap: bool) -> Any:
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # a corrupt pickle stream
        raise UserError(f"{path} cannot be read as a torch checkpoint: {exc}") from None
    refused = [g for g in unsafe if not g.startswith(OPAQUE_PREFIXES)]
    if refused:
        raise _refuse(path, refused)
    stand_ins = [(_opaque_for(g), g) for g in unsafe]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def _load_restricted(path: Path, mmap: bool) -> Any:
    """torch without `get_unsafe_globals_in_checkpoint` (2.3/2.4, NeoX's containers). Code never runs here either:
    every global goes through `RestrictedUnpickler.find_class`, which returns only tensor/storage rebuilders,
    plain containers and inert stand-ins, and refuses the rest. torch refuses a `pickle_module` together with
    `weights_only=True`, hence `weights_only=False` with our restricted module in place of torch's."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE, mmap=mmap)
    except _Refused as exc:
        raise _refuse(path, [exc.name]) from None


def load_pt(path: str | Path, *, mmap: bool = True) -> Any:
    """Load one `.pt` file safely (tensors on CPU, memory-mapped where possible)."""
    path = Path(path)
    _check_file(path)
    try:
        if use_torch_scan():
            return _load_with_torch_scan(path, mmap)
        return _load_restricted(path, mmap)
    except UserError:
        raise
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
