"""The order in which a member reads its window dataset: NeoX's shuffle, or the paper's epochs (+Fixed Data).

What NeoX does (megatron/data/gpt2_dataset.py `_build_index_mappings`, data_utils.py, blendable_dataset.py):
for every dataset of `train_data_paths` it builds three index maps and caches them as .npy files beside
the dataset, `<prefix>_train_<i>_indexmap_<n>ns_<S>sl_<seed>s_packedpi_ac_{doc,sample,shuffle}_idx.npy`:
- doc_idx: the documents of every epoch, shuffled;
- sample_idx: where sample j (seq_length + 1 tokens, consecutive samples sharing one token) ends,
  as (position in doc_idx, offset in that document);
- shuffle_idx: a permutation of the samples. The run's k-th sample is sample shuffle_idx[k].
So all the samples of one dataset are always shuffled together, and several `train_data_paths` are
interleaved by weight (BlendableDataset), never read one after the other: NeoX has no setting that
reads training data in order. A "+Fixed Data" member whose window wraps (the rest of the stream,
then its start again) therefore sees its repeated tokens spread through the whole stage.

The paper's order (Yano et al. 2025, Sec. 4.3, Fig. 3 bottom: the second epoch begins once the
unique tokens are used up) needs other index maps, and NeoX loads its maps from those files when
they exist ("Build the indexed mapping if not exist"). `write_epoch_order` writes them, under the
names NeoX looks for:
- doc_idx: the documents in file order, one epoch (the window dataset is cut window after window);
- sample_idx: the sample boundaries of that order (sample j covers tokens [j*S, j*S + S]);
- shuffle_idx: the samples of each window ("segment") shuffled within the segment, segment after
  segment. A sample that straddles two windows belongs to the later segment.
Beside them `<prefix>.order.json` records what was written; the builtin engine reads the segments
from it (neox_progressive.train.batches), and `remove_epoch_order` deletes the maps again when the
family goes back to NeoX's own order (NeoX would otherwise keep loading them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from neox_progressive.data.mmap_dataset import MMapDataset

ORDER_SUFFIX = ".order.json"
_CHUNK = 1 << 22  # samples per block when writing sample_idx


def neox_index_map_files(prefix: str | Path, num_samples: int, seq_length: int, seed: int, *,
                         allow_chopped: bool = True, index: int = 0) -> dict[str, Path]:
    """The three cache files NeoX (pack_impl: packed) reads for the `index`-th dataset of `train_data_paths`.

    `num_samples` is what NeoX asks that dataset for: ceil(train_iters x global batch x weight x 1.005).
    """
    base = f"{prefix}_train_{index}_indexmap_{num_samples}ns_{seq_length}sl_{seed}s_packedpi"
    base += "_ac" if allow_chopped else ""
    return {k: Path(f"{base}_{k}_idx.npy") for k in ("doc", "sample", "shuffle")}


def segment_samples(window_tokens: Sequence[int], seq_length: int, num_samples: int) -> list[list[int]]:
    """[[first, end), ...] samples of each window of a dataset cut window after window.

    A sample belongs to the window its last token lies in (so every sample of segment k but the first
    one holds only tokens of window k, and segment 1 only tokens of window 1)."""
    bounds, cum = [0], 0
    for length in window_tokens[:-1]:
        cum += int(length)
        # samples j whose tokens [jS, jS + S] all lie before `cum`: jS + S <= cum - 1
        bounds.append(min(num_samples, max(bounds[-1], (cum - 1) // seq_length)))
    bounds.append(num_samples)
    return [[a, b] for a, b in zip(bounds, bounds[1:])]


def _record(prefix: str, num_samples: int, seq_length: int, seed: int, segments: list[list[int]],
            files: dict[str, Path]) -> dict:
    window = Path(prefix + ".window.json")
    source = json.loads(window.read_text()) if window.is_file() else None
    return {"order": "epochs", "num_samples": num_samples, "seq_length": seq_length, "seed": seed, "segments": segments,
            "files": {k: str(v) for k, v in files.items()}, "window": source}


def read_order(prefix: str | Path) -> dict | None:
    """The `<prefix>.order.json` record, or None (NeoX's own order)."""
    path = Path(str(prefix) + ORDER_SUFFIX)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    tmp.replace(path)


def _sample_idx(sizes: np.ndarray, num_samples: int, seq_length: int, path: Path) -> None:
    """NeoX's sample_idx for documents in file order: row j = (document, offset) of token j*S."""
    ends = np.cumsum(sizes, dtype=np.int64)                 # ends[d]: first token after document d
    starts = ends - sizes
    dtype = np.int32 if 2 * (num_samples + 1) < np.iinfo(np.int32).max else np.int64  # as NeoX's helper chooses
    tmp = path.with_name(f".{path.name}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(num_samples + 1, 2))
    for first in range(0, num_samples + 1, _CHUNK):
        pos = np.arange(first, min(first + _CHUNK, num_samples + 1), dtype=np.int64) * seq_length
        doc = np.searchsorted(ends, pos, side="right")      # the document holding token `pos`
        out[first: first + len(pos), 0] = doc
        out[first: first + len(pos), 1] = pos - starts[doc]
    out.flush()
    del out
    tmp.replace(path)


def _shuffle_idx(segments: list[list[int]], seed: int) -> np.ndarray:
    n = segments[-1][1]
    dtype = np.uint32 if n < np.iinfo(np.uint32).max - 1 else np.int64   # NeoX's _build_shuffle_idx dtype
    parts = []
    for k, (a, b) in enumerate(segments):
        rng = np.random.Generator(np.random.PCG64([seed, k]))
        parts.append((a + rng.permutation(b - a)).astype(dtype))
    return np.concatenate(parts)


def write_epoch_order(prefix: str | Path, window_tokens: Sequence[int], seq_length: int, num_samples: int, seed: int,
                      *, allow_chopped: bool = True) -> dict:
    """Write NeoX's index maps of `prefix` so that its windows are read one after the other (see module doc).

    Args:
        prefix: a window dataset cut window after window (`cut_windows`).
        window_tokens: the length of each window, in order.
        seq_length, seed, allow_chopped: the stage's NeoX keys (they name the files NeoX looks for).
        num_samples: the samples NeoX asks the dataset for (`neox_window_tokens` made the dataset exactly
            num_samples x seq_length + 1 tokens long, one epoch).

    Returns:
        The `<prefix>.order.json` record. Nothing is rewritten when the record and the files are current.
    """
    prefix = str(prefix)
    ds = MMapDataset(prefix)
    have = (ds.num_tokens - 1) // seq_length
    if have != num_samples:
        raise ValueError(f"{prefix} holds {have} samples of {seq_length} + 1 tokens, not the {num_samples} NeoX asks for")
    segments = segment_samples(window_tokens, seq_length, num_samples)
    files = neox_index_map_files(prefix, num_samples, seq_length, seed, allow_chopped=allow_chopped)
    record = _record(prefix, num_samples, seq_length, seed, segments, files)
    if read_order(prefix) == record and all(p.is_file() for p in files.values()):
        return record
    remove_epoch_order(prefix)
    _save(files["doc"], np.arange(len(ds), dtype=np.int32))
    _sample_idx(np.asarray(ds.sizes, dtype=np.int64), num_samples, seq_length, files["sample"])
    _save(files["shuffle"], _shuffle_idx(segments, seed))
    path = Path(prefix + ORDER_SUFFIX)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return record


def remove_epoch_order(prefix: str | Path) -> bool:
    """Delete the index maps `write_epoch_order` wrote for `prefix` and its record; True if there were any."""
    record = read_order(prefix)
    path = Path(str(prefix) + ORDER_SUFFIX)
    if record is None and not path.exists():
        return False
    for f in (record or {}).get("files", {}).values():
        Path(f).unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return True


def order_segments(prefix: str | Path, seq_length: int, samples_per_epoch: int) -> list[list[int]] | None:
    """The sample segments of `prefix` for a reader with this seq_length (None: one shuffled epoch)."""
    record = read_order(prefix)
    if not record or record.get("seq_length") != seq_length or record.get("num_samples") != samples_per_epoch:
        return None
    return [list(s) for s in record["segments"]]



def neox_order_problem(log_text: str, prefix: str | Path, order: dict) -> str | None:
    """Did NeoX read `prefix` through the index maps `write_epoch_order` wrote? None if so, else why not.

    `log_text` is NeoX's output of the stage; only its last launch counts (the family runner's NeoX engine
    starts every launch with a `# <command>` line). NeoX prints, per dataset, `train_0:`, then a warning
    when it builds the maps itself, then `loading shuffle-idx mapping from <file>`."""
    files = neox_index_map_files(prefix, order["num_samples"], order["seq_length"], order["seed"],
                                 allow_chopped=order.get("allow_chopped", True))
    text = log_text.rsplit("\n# ", 1)[-1]
    loaded = f"loading shuffle-idx mapping from {files['shuffle']}"
    if loaded not in text:
        return (f"NeoX did not load {files['shuffle'].name}, the index map that reads the fixed-data epochs in order: this "
                "NeoX names its index maps otherwise and shuffles both epochs together; use a NeoX whose "
                "megatron/data/gpt2_dataset.py names them as commit ea7aefd8 does, or set budget.fixed_data_order: shuffled")
    before = text[: text.index(loaded)]
    if "could not find index map files" in before[before.rfind("train_0:"):]:
        return (f"NeoX built its own index maps for {prefix} (ours were missing when it started), so it shuffles both "
                "epochs together; run again (the runner writes them before every stage)")
    return None
