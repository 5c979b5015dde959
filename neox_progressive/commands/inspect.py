"""Describe a GPT-NeoX checkpoint, and with --config check it against the member's NeoX YAML(s).

Prints the format (pipeline: layer_XX-model_TT files; sequential: mp_rank_TT files holding
`sequential.N.` keys), the tag, the TP degree, the number of layers, the architecture as far as
the tensors show it (RMSNorm `scale` or LayerNorm `weight`/`bias`; SwiGLU linear1 = 2 x linear2's
width or GeLU; learned position embeddings; the residual form and the GeLU flavour are config keys),
dtypes, the parameter count and every tensor's shape per NeoX layer index (identical transformer
layers are grouped).

With --config the checkpoint is checked against the config the way NeoX's strict loading would:
missing or unexpected keys, shapes, the mp_rank count, and non-finite values (every tensor is
read once, one layer file at a time). Any problem gives exit status 1.

Temporary dirs that writers killed mid-write left beside the checkpoint (or in it) are listed with
their size and the writer's PID; inspect itself writes nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from neox_progressive.config import ModelShape
from neox_progressive.errors import CheckFailed, UserError

if TYPE_CHECKING:  # torch and the reader load when the verb runs, not for --help
    from neox_progressive.io.reader import CheckpointReader

HELP = "describe a NeoX checkpoint; with --config, check it (exit 1 on problems)"
EXAMPLES = """
  neox-progressive inspect runs/family/progressive/2B/expanded
  neox-progressive inspect ckpts/global_step40700 --config configs/neox/stage_1B.yml
  neox-progressive inspect ckpts --config arch.yml --config data.yml --format json
"""

REPLICATED = ("scale", "norm.weight", "norm.bias", "attention.dense.bias", "mlp.linear2.bias", "mlp.dense_4h_to_h.bias",
              "inv_freq", "position_embeddings.weight")


def add_arguments(p) -> None:
    p.add_argument("ckpt", help="NeoX save dir (with `latest`) or a global_stepN dir")
    p.add_argument("--config", action="append", default=[], metavar="YML",
                   help="the member's NeoX YAML file(s), repeatable; enables the checks")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _describe(reader: CheckpointReader) -> dict:
    groups: list[dict] = []
    dtypes: set[str] = set()
    params = 0
    for idx in reader.layer_indices:
        ranks = reader.file_state(idx)
        shapes = {k: [list(sd[k].shape) for sd in ranks] for k in ranks[0]}
        for sd in ranks:
            dtypes.update(str(v.dtype).removeprefix("torch.") for v in sd.values())
        params += sum(v.numel() for k, v in ranks[0].items() if k.endswith(REPLICATED))
        params += sum(v.numel() for sd in ranks for k, v in sd.items() if not k.endswith(REPLICATED))
        if groups and groups[-1]["shapes"] == shapes and groups[-1]["last"] == idx - 1:
            groups[-1]["last"] = idx
        else:
            groups.append({"first": idx, "last": idx, "shapes": shapes})
    n_layers = max(0, len(reader.layer_indices) - 3)
    return {
        "path": str(reader.dir), "tag": reader.tag, "format": reader.format, "tp": reader.tp,
        "mp_rank_files": len(reader.mp_files), "iteration": reader.iteration, "layers": n_layers,
        "architecture": _architecture(groups), "dtypes": sorted(dtypes), "parameters": params, "files": groups,
    }


def _architecture(groups: list[dict]) -> dict:
    from neox_progressive import arch

    """What the tensors of the first transformer layer (index 2) and the embedding file show."""
    keys = {k: s[0] for g in groups if g["first"] <= arch.layer_index(0) <= g["last"] for k, s in g["shapes"].items()}
    embed = next((g["shapes"] for g in groups if g["first"] == arch.embed_index()), {})
    l1, l2 = keys.get(arch.LINEAR1_WEIGHT) or keys.get("mlp.dense_h_to_4h.weight"), \
        keys.get(arch.LINEAR2_WEIGHT) or keys.get("mlp.dense_4h_to_h.weight")
    mlp = None if not (l1 and l2) else "swiglu" if l1[0] == 2 * l2[1] else "gelu" if l1[0] == l2[1] else "unknown"
    return {"norm": "rmsnorm" if "input_layernorm.scale" in keys else "layernorm" if "input_layernorm.bias" in keys else None,
            "mlp": mlp, "positions": "learned" if arch.POS_EMBED_KEY in embed else "none stored (rotary)",
            "attn_bias": arch.QKV_BIAS in keys, "mlp_bias": arch.LINEAR1_BIAS in keys or "mlp.dense_h_to_4h.bias" in keys}


def _check(reader: CheckpointReader, shape: ModelShape, quiet: bool) -> list[str]:
    import torch

    from neox_progressive import arch
    from neox_progressive.progress import progress_bar

    problems: list[str] = []
    try:
        reader.shape = reader.match_shape(shape)
    except UserError as exc:
        return [str(exc)]
    shape = reader.shape
    want = arch.neox_file_shapes(shape)
    n_mp = len(reader.mp_files)
    expect_mp = shape.tp if shape.sequential else max(shape.pp, 1) * shape.tp
    if (reader.format == "sequential") != shape.sequential:
        problems.append(f"checkpoint is in {reader.format} format but the config's pipe_parallel_size={shape.pp} "
                        f"expects {'sequential' if shape.sequential else 'pipeline'}")
    elif n_mp != expect_mp:
        problems.append(f"{n_mp} mp_rank files, but the config (pp={shape.pp}, tp={shape.tp}) makes NeoX look for {expect_mp}")
    for idx in progress_bar(sorted(want), desc="checking", unit="file", quiet=quiet):
        for t, sd in enumerate(reader.file_state(idx)):
            where = f"layer {idx} rank {t}"
            missing, extra = sorted(set(want[idx]) - set(sd)), sorted(set(sd) - set(want[idx]))
            if missing:
                problems.append(f"{where}: missing keys {missing}")
            if extra:
                problems.append(f"{where}: unexpected keys {extra} (NeoX loads strictly)")
            for k in set(want[idx]) & set(sd):
                if tuple(sd[k].shape) != want[idx][k]:
                    problems.append(f"{where}: {k} has shape {tuple(sd[k].shape)}, config implies {want[idx][k]}")
                elif sd[k].is_floating_point() and not torch.isfinite(sd[k]).all():
                    bad = int((~torch.isfinite(sd[k])).sum())
                    problems.append(f"{where}: {k} has {bad} non-finite values")
    return problems


def _print_text(info: dict, problems: list[str] | None) -> None:
    print(f"checkpoint  {info['path']}  (tag {info['tag']}, iteration {info['iteration']})")
    print(f"format      {info['format']}, TP={info['tp']}, {info['mp_rank_files']} mp_rank file(s)")
    print(f"layers      {info['layers']}   dtype {', '.join(info['dtypes'])}   parameters {info['parameters']:,}")
    a = info["architecture"]
    print(f"architecture  norm {a['norm']}, mlp {a['mlp']}, positions {a['positions']}, biases: attention "
          f"{'yes' if a['attn_bias'] else 'no'}, mlp {'yes' if a['mlp_bias'] else 'no'}")
    for g in info["files"]:
        span = f"{g['first']}" if g["first"] == g["last"] else f"{g['first']}..{g['last']}"
        print(f"  layer {span}")
        for k, shapes in g["shapes"].items():
            same = all(s == shapes[0] for s in shapes)
            shown = f"{shapes[0]} x{len(shapes)} ranks" if same and len(shapes) > 1 else " ".join(map(str, shapes))
            print(f"    {k:40s} {shown}")
    for note in info.get("temporary_dirs", []):
        print(f"note: {note}")
    if problems is not None:
        if problems:
            print(f"\n{len(problems)} problem(s):")
            for p in problems:
                print(f"  - {p}")
        else:
            print("\ncheck: OK (keys, shapes, mp_rank count and values match the config)")


def run(args) -> int:
    from pathlib import Path

    from neox_progressive.io.atomic import temp_notes
    from neox_progressive.io.reader import CheckpointReader

    reader = CheckpointReader(args.ckpt)
    info = _describe(reader)
    ckpt = Path(args.ckpt).absolute()
    info["temporary_dirs"] = temp_notes([ckpt.parent, ckpt])  # debris of killed writers beside it, said not removed
    problems = None
    if args.config:
        problems = _check(reader, ModelShape.from_yamls(args.config), args.quiet)
        info["problems"] = problems
    if args.format == "json":
        print(json.dumps(info, indent=2))
    else:
        _print_text(info, problems)
    if problems:
        raise CheckFailed(f"{len(problems)} problem(s) found in {reader.dir}; first: {problems[0]}")
    return 0
