"""Metrics of a stage: a JSONL file, console lines, and optionally Weights & Biases.

One JSON object per line:

    {"kind": "train", "iteration": 10, "loss": 5.31, "lr": 0.00098, "grad_norm": 1.2,
     "tokens": 40960, "flops": 1.9e12, "samples": 80, "elapsed_s": 3.1}
    {"kind": "valid", "iteration": 10, "loss": 5.40, "ppl": 221.4, "tokens": 40960, "flops": 1.9e12}

`iteration` counts optimizer steps; a train record's loss is the mean over the micro batches of
that iteration (NeoX's `lm_loss`) and `lr` is the rate that iteration's update used. `tokens` =
iteration x global batch x seq_length seen by this stage, `flops` = 6 x parameters x tokens
(Kaplan et al. / the paper's C = 6ND, every parameter counted, embeddings included). The first
`FIRST_ITERATIONS` iterations are always recorded one by one (the stage-start check reads them),
later ones every `log_interval`, averaged over the interval as NeoX does. A `valid` record at
iteration 0 scores the starting weights.

On resume, records after the resumed iteration are dropped first, so an interrupted and an
uninterrupted run leave the same file (up to the elapsed times). W&B: `wandb.init` gets the
configured group and run name exactly (NeoX appends a random suffix to the group; we do not), and
a run id derived from them and the save dir, so a resumed stage continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from neox_progressive.errors import UserError

FIRST_ITERATIONS = 10


def truncate_after(path: Path, iteration: int, keep_valid_at_end: bool = True) -> None:
    """Drop the records of iterations after `iteration` (those are about to be redone), and the
    validation record at `iteration` itself unless the resumed state includes it."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        it = rec.get("iteration", 0)
        if it < iteration or (it == iteration and (keep_valid_at_end or rec.get("kind") != "valid")):
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file (optionally only `train` or `valid` ones)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
    return out


class MetricsLog:
    def __init__(self, path: Path, *, quiet: bool = False, wandb_cfg: dict | None = None, run_config: dict | None = None,
                 save: Path | None = None, wandb_dir: Path | None = None):
        self.path = path
        self.quiet = quiet
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a")
        self.wandb = None
        if wandb_cfg is not None:
            self.wandb = _start_wandb(wandb_cfg, run_config or {}, save, wandb_dir or path.parent)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self.wandb is not None:
            prefix = "train" if record["kind"] == "train" else "validation"
            data = {f"{prefix}/{k}": v for k, v in record.items() if k not in ("kind", "iteration")}
            self.wandb.log(data, step=record["iteration"])
        if not self.quiet:
            print(_console_line(record), file=sys.stderr, flush=True)

    def close(self) -> None:
        self._f.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _console_line(r: dict) -> str:
    if r["kind"] == "valid":
        return (f" validation | iteration {r['iteration']:>7} | loss {r['loss']:.4f} | ppl {r['ppl']:.2f} | "
                f"tokens {r['tokens']:.3e} | flops {r['flops']:.3e}")
    return (f" iteration {r['iteration']:>7} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad norm {r['grad_norm']:.3f} | "
            f"tokens {r['tokens']:.3e} | flops {r['flops']:.3e} | {r['elapsed_s']:.1f} s")


def _start_wandb(cfg: dict, run_config: dict, save: Path | None, wandb_dir: Path):
    try:
        import wandb
    except ImportError:
        raise UserError("use_wandb: true but wandb is not installed: pip install wandb (or set use_wandb: false)") from None
    key = json.dumps([cfg.get("project"), cfg.get("group"), cfg.get("name"), str(save.resolve()) if save else None])
    run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    wandb_dir.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(base_url=cfg["host"]) if cfg.get("host") else None
    return wandb.init(project=cfg.get("project"), group=cfg.get("group"), name=cfg.get("name"), entity=cfg.get("entity"),
                      id=run_id, resume="allow", config=run_config, dir=str(wandb_dir), settings=settings, reinit=True)
