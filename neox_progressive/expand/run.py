"""The streaming executor: read a NeoX checkpoint, write its expansion, one layer at a time.

Width first, then depth (bert2BERT Algorithm 1): source layer l is widened once (AKI reads l and
l+1), then written to every target position whose depth order names it. The writer takes layers
in any order, so b2b's revisits of earlier layers need neither a cache nor a recomputation.
Memory: the source layers l and l+1, the widened layer and the writer's per-rank copies; the
embedding and head are widened in row chunks. Output: TP degree and format of the target config,
written atomically (nothing at `out` until `latest` is in place), with `expansion.json` and the
maps (`expansion_maps.npz`) inside `out`.
"""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from neox_progressive import __version__, arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.expand import ops
from neox_progressive.expand.options import DEFAULT_OPTIONS, ExpandOptions
from neox_progressive.expand.plan import ExpansionPlan, plan_expansion
from neox_progressive.io import finite
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import CheckpointWriter, check_destination

MANIFEST = "expansion.json"
MAPS_FILE = "expansion_maps.npz"


def _paths(configs: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(configs)] if isinstance(configs, (str, Path)) else [Path(c) for c in configs]


def load_shapes(src_configs, dst_configs) -> tuple[ModelShape, ModelShape]:
    return ModelShape.from_yamls(_paths(src_configs)), ModelShape.from_yamls(_paths(dst_configs))


def plan_for(src, src_configs, dst_configs, options: ExpandOptions = DEFAULT_OPTIONS, stage: str = "",
             ) -> tuple[ExpansionPlan, CheckpointReader | None]:
    """The plan, from the source checkpoint's metadata when it exists (vocab rows, dtype), else from the configs."""
    src_shape, dst_shape = load_shapes(src_configs, dst_configs)
    reader = None
    dtype = None
    if src is not None and Path(src).exists():
        reader = CheckpointReader(src, src_shape)
        src_shape = reader.shape
        raw = reader.file_state(arch.embed_index())[0][arch.EMBED_KEY]  # memory-mapped: only the header is read
        dtype = str(raw.dtype).replace("torch.", "")
    return plan_expansion(src_shape, dst_shape, options, stage, dtype=dtype), reader


def _units(plan: ExpansionPlan, layer: int) -> ops.LayerUnits:
    m = plan.layers[layer]
    s = plan.src
    return ops.LayerUnits(
        hidden=ops.Unit.of(plan.hidden, s.hidden_size), heads=ops.Unit.of(m.heads, s.num_heads),
        kv_heads=ops.Unit.of(m.kv_heads, s.num_kv_heads), ffn=ops.Unit.of(m.ffn, s.ffn_size),
        alpha=torch.from_numpy(plan.alpha()), head_dim=s.head_dim,
    )


def _work(t: torch.Tensor) -> torch.Tensor:
    """Math dtype: fp32, or fp64 for fp64 sources (EXPANSION_SPEC section 8)."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _embed(reader: CheckpointReader) -> torch.Tensor:
    """The source embedding; at TP 1 the memory-mapped tensor itself (no copy of V x h)."""
    if reader.tp == 1:
        t = reader.file_state(arch.embed_index())[0][arch.EMBED_KEY]
        if tuple(t.shape) == (reader.shape.padded_vocab_size, reader.shape.hidden_size):
            return t
    return reader.embed()


def _maps_npz(plan: ExpansionPlan) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **plan.maps_arrays())
    return buf.getvalue()


def expand_checkpoint(src, src_configs, dst_configs, out, options: ExpandOptions = DEFAULT_OPTIONS, *,
                      force: bool = False, quiet: bool = False, stage: str = "", allow_nonfinite: bool = False) -> dict:
    """Expand the NeoX checkpoint `src` (save dir or global_stepN dir) into `out`; return the expansion.json record.

    Every check runs before anything is written (UserError on bad input). `out` gets the target
    TP degree and format of `dst_configs`, `finetune: true`-loadable (NEOX_FACTS section 5).
    """
    if src is None or not Path(src).exists():
        raise UserError(f"source checkpoint {str(src)!r} does not exist; pass --src the NeoX save dir or a global_stepN dir")
    plan, reader = plan_for(src, src_configs, dst_configs, options, stage)
    out = Path(out)
    if out.resolve() == Path(src).resolve() or Path(src).resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is (inside) the source checkpoint {src}; write the expansion elsewhere")
    check_destination(out, force)
    record = _record(plan, reader, src, src_configs, dst_configs)
    with ThreadPoolExecutor(1) as pool:  # hashing the source overlaps the expansion (hashlib releases the GIL)
        pending = {"source_sha256": pool.submit(reader.sha256)}
        run_plan(plan, reader, out, force=force, quiet=quiet, record=record, pending=pending, configs=_paths(dst_configs),
                 allow_nonfinite=allow_nonfinite)
    return record


def _record(plan: ExpansionPlan, reader: CheckpointReader, src, src_configs, dst_configs) -> dict:
    rec = {"format": "neox-progressive-expansion/1", "plugin_version": __version__,
           "command_line": shlex.join(sys.argv), "source_checkpoint": str(Path(src).resolve()),
           "source_tag": reader.tag, "source_iteration": reader.iteration,
           "source_configs": [str(p) for p in _paths(src_configs)], "target_configs": [str(p) for p in _paths(dst_configs)],
           "source_sha256": None}
    rec.update(plan.summary())
    npz = _maps_npz(plan)
    rec["maps_file"] = MAPS_FILE
    rec["maps_sha256"] = hashlib.sha256(npz).hexdigest()
    return rec


class _Saver:
    """At most one save in flight on a worker thread (torch.save and the file writes release the GIL)."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.job: Future | None = None

    def __call__(self, fn, *args) -> None:
        self.wait()
        self.job = self.pool.submit(fn, *args)

    def wait(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            job.result()


def run_plan(plan: ExpansionPlan, reader: CheckpointReader, out: str | Path, *, force: bool = False, quiet: bool = False,
             record: dict | None = None, pending: dict[str, Future] | None = None,
             configs: Sequence[str | Path] | None = None, allow_nonfinite: bool = False) -> Path:
    """Execute a plan against an open reader; writes `out` atomically.

    `record` (the expansion.json content) is completed with the results of `pending` at the end.
    """
    from tqdm import tqdm

    dst, opt = plan.dst, plan.options
    dtype = getattr(torch, plan.dtype)
    reader = finite.guard(reader, allow_nonfinite, plan.dtype)  # NaN/Inf (unless --allow-nonfinite), mixed dtypes
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="expand", disable=quiet, file=sys.stderr)
    writer = CheckpointWriter(out, dst, force=force, configs=configs, need_bytes=plan.total_bytes)
    with bar, writer as w, ThreadPoolExecutor(1) as pool:
        save = _Saver(pool)  # the next part is computed while the previous one is saved

        def write_part(write, tensor, index):
            write(tensor)
            bar.update(plan.file_bytes[index])

        def write_targets(layer: int, wide: dict[str, torch.Tensor]) -> None:
            for t in plan.targets_of(layer):
                zero = plan.added[t] and opt.new_layer_init == "zero_out"
                w.write_layer(t, ops.zero_out(wide) if zero else wide)
                bar.update(plan.file_bytes[arch.layer_index(t)])

        u0 = _units(plan, 0)
        save(write_part, w.write_embed, ops.widen_rows_out_h(_embed(reader), u0.hidden, u0.alpha, dst.padded_vocab_size,
                                                              dtype), arch.embed_index())
        cur = reader.layer(0)
        for layer in range(plan.src.num_layers):
            upper = reader.layer(layer + 1) if layer + 1 < plan.src.num_layers else None
            wide = ops.widen_layer(cur, upper if opt.method == "aki" else None, _units(plan, layer),
                                   aki_second=opt.aki_second, aki_hidden=opt.aki_hidden, out_dtype=dtype)
            save(write_targets, layer, wide)
            del wide
            cur = upper
        norm = ops.norm_h(_work(reader.final_norm()), u0.hidden, u0.alpha).to(dtype)
        save(write_part, w.write_final_norm, norm, arch.final_norm_index(dst.num_layers))
        head = ops.widen_rows_in_h(reader.head(), u0.hidden, dst.padded_vocab_size, dtype)
        save(write_part, w.write_head, head, arch.head_index(dst.num_layers))
        del head
        save.wait()
        if w.root is not None:
            (w.root / MAPS_FILE).write_bytes(_maps_npz(plan))
        if record is not None:
            record.update({key: fut.result() for key, fut in (pending or {}).items()})
            w.extra_files[MANIFEST] = json.dumps(record, indent=1, default=str) + "\n"
    return Path(out)


def load_maps(out: str | Path) -> dict[str, np.ndarray]:
    """The maps sidecar of an expanded checkpoint."""
    with np.load(Path(out) / MAPS_FILE) as z:
        return {k: z[k] for k in z.files}
