"""Per-member token windows of one dataset (the family's data convention).

Progressive stages must not re-read the same tokens: with `finetune: true` NeoX starts every stage
at sample 0 of its data. So member k trains on its own dataset, cut from the family's token
stream (the items of the source dataset in file order, concatenated, as NeoX's loader sees them):
the windows `[start, end)` that follow the windows of members < k. With a fixed-data cap a window
wraps to the start of the stream, so a member may have two windows.

`cut_windows` writes exactly those tokens, window after window, as a new NeoX mmap dataset. An
item (document) that a window boundary cuts is cut too; every piece becomes its own item and
document. Beside it, `<out>.window.json` records the source and the windows, so cutting the same
windows again is a no-op (the family runner calls this before every stage).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from neox_progressive.data.mmap_dataset import DatasetBuilder, MMapDataset, dataset_exists, paths_of
from neox_progressive.data.sample_order import remove_epoch_order, write_epoch_order
from neox_progressive.errors import UserError

WINDOW_SUFFIX = ".window.json"
# NeoX asks each dataset of `train_data_paths` for 0.5% more samples than it will use
# (data_utils.get_normalized_weights_and_num_samples).
NEOX_BLEND_MARGIN = 1.005


def neox_window_tokens(train_iters: int, global_batch: int, seq_length: int, *, weighted: bool = True) -> int:
    """Tokens a member's dataset needs so that NeoX builds its samples from one epoch.

    NeoX's GPT2Dataset needs (tokens - 1) // seq_length >= the samples it is asked for; for a dataset
    named in `train_data_paths` that is ceil(train_iters x global_batch x 1.005) (`weighted`), for
    `data_path` train_iters x global_batch. With fewer tokens NeoX builds two epochs, shuffles the
    documents and samples of both together and trains on a random subset of them: about a quarter of
    the window is then never seen and as much is seen twice (gpt2_dataset._num_epochs,
    _build_doc_idx, _build_shuffle_idx).
    """
    samples = train_iters * global_batch
    if weighted:
        samples = math.ceil(samples * NEOX_BLEND_MARGIN)
    return samples * seq_length + 1


def _check_windows(windows: Sequence[Sequence[int]], n_tokens: int, src: str) -> list[tuple[int, int]]:
    out = []
    if not windows:
        raise UserError(f"no token window given for {src}; expected a list of [start, end) pairs, e.g. [[0, 1048576]]")
    for w in windows:
        if len(w) != 2 or not all(isinstance(x, (int, np.integer)) for x in w):
            raise UserError(f"token window {w!r} is not a [start, end) pair of integers")
        start, end = int(w[0]), int(w[1])
        if not 0 <= start < end:
            raise UserError(f"token window [{start}, {end}) is empty or negative; windows need 0 <= start < end")
        if end > n_tokens:
            raise UserError(
                f"token window [{start}, {end}) goes past the end of {src}, which holds {n_tokens} tokens; "
                f"prepare at least {end} tokens of training data, or use the family's fixed-data cap so windows wrap"
            )
        out.append((start, end))
    return out


def _source_id(src: MMapDataset) -> dict:
    h = hashlib.sha256()
    with src.idx_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"idx_sha256": h.hexdigest(), "bin_bytes": src.bin_path.stat().st_size}


def window_pieces(sizes: np.ndarray, start: int, end: int) -> list[tuple[int, int, int]]:
    """The (item, offset, length) pieces of the token range [start, end) of a stream of items."""
    bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    first = int(np.searchsorted(bounds, start, side="right")) - 1
    pieces = []
    item = first
    while item < len(sizes) and bounds[item] < end:
        lo, hi = max(start, int(bounds[item])), min(end, int(bounds[item + 1]))
        if hi > lo:
            pieces.append((item, lo - int(bounds[item]), hi - lo))
        item += 1
    return pieces


def cut_windows(src_prefix: str | Path, windows: Sequence[Sequence[int]], out_prefix: str | Path, *,
                force: bool = False) -> MMapDataset:
    """Write the tokens of `windows` (token offsets into `src_prefix`'s stream) as `out_prefix`.

    Args:
        src_prefix: the full training dataset (NeoX mmap prefix).
        windows: [[start, end), ...] in the order the member consumes them.
        out_prefix: the member's dataset prefix (e.g. `<train prefix>.<member name>`).
        force: replace an existing output that was cut differently.

    Returns:
        The output dataset. If `out_prefix` already holds exactly these windows of this source
        (per `<out_prefix>.window.json`), it is returned as is.
    """
    src = MMapDataset(src_prefix)
    wins = _check_windows(windows, src.num_tokens, src.prefix)
    record = {"source": str(Path(src.prefix).resolve()), **_source_id(src), "windows": [list(w) for w in wins],
              "tokens": sum(e - s for s, e in wins)}
    out_prefix = str(out_prefix)
    rec_path = Path(out_prefix + WINDOW_SUFFIX)
    if dataset_exists(out_prefix) and rec_path.is_file():
        try:
            old = json.loads(rec_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        # the same windows of the same tokens: a data dir copied or moved elsewhere is still the same data
        if isinstance(old, dict) and {**old, "source": None} == {**record, "source": None}:
            if old != record:
                _write_record(rec_path, record)
            return MMapDataset(out_prefix)
    if any(p.exists() for p in paths_of(out_prefix)) and not force:
        raise UserError(f"{out_prefix}.bin/.idx already exists and was not cut from these windows of {src.prefix}; "
                        f"delete {out_prefix}.bin/.idx, or re-cut it with `neox-progressive prepare-data --family "
                        "FAMILY.yml --force` (in code: force=True)")
    rec_path.unlink(missing_ok=True)
    with DatasetBuilder(out_prefix, src.dtype, force=True) as b:
        for start, end in wins:
            for item, offset, length in window_pieces(src.sizes, start, end):
                b.add_document(src[item][offset: offset + length])
    _write_record(rec_path, record)
    return MMapDataset(out_prefix)


def _write_record(rec_path: Path, record: dict) -> None:
    tmp = rec_path.with_name(rec_path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(rec_path)


def cut_member_windows(src_prefix: str | Path, members: Iterable[Mapping], *, force: bool = False) -> dict[str, MMapDataset]:
    """Cut every member's window dataset as `family_plan.json` describes it, and set the order NeoX reads it in.

    Args:
        src_prefix: the family's full training dataset.
        members: dicts with `data_windows` ([[start, end], ...]) and `train_data_path` (the output
            prefix, `<train prefix>.<member name>`), optionally `name` and `sample_order` (the paper's
            epoch order of a fixed-data window that wraps: NeoX's index maps are written beside the
            dataset; without it, maps written before are removed so that NeoX shuffles as usual).
        force: replace outputs cut differently before.

    Returns:
        {member name (or its train_data_path): the window dataset}.
    """
    out = {}
    for m in members:
        missing = [k for k in ("data_windows", "train_data_path") if k not in m]
        if missing:
            raise UserError(f"family plan member {m.get('name', '?')!r} has no {missing}; regenerate the plan")
        ds = cut_windows(src_prefix, m["data_windows"], m["train_data_path"], force=force)
        order = m.get("sample_order")
        if order:
            write_epoch_order(m["train_data_path"], [b - a for a, b in m["data_windows"]], order["seq_length"],
                              order["num_samples"], order["seed"], allow_chopped=order.get("allow_chopped", True))
        else:
            remove_epoch_order(m["train_data_path"])
        out[str(m.get("name", m["train_data_path"]))] = ds
    return out
