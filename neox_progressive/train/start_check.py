"""Stage-start check: did member k really start from the expanded weights?

The trap (EXPANSION_SPEC section 10 item 10; DeeperSpeed issue #56): some DeepSpeed versions load a
`finetune: true` checkpoint into the bf16/fp16 module but keep the fp32 *master* weights of the
random initialization. The first forward pass still sees the expanded weights, so the first
logged loss looks right; the first optimizer step then copies the random master weights back and
the loss jumps to a random init's, about ln(V). The expansion is silently thrown away. A second
way to lose it: `load` pointing at a dir without `latest`, where NeoX prints "Unable to load
checkpoint" and trains from a random init.

`expanded_loss` scores the expanded checkpoint with the reference model on held-out samples (the
first ones of the validation data, in order, as the builtin engine's evaluation takes them);
`check_stage_start` compares it with the first logged training losses, judged on their median (one
spike is not a lost expansion): the median must stay below the midpoint between the expanded loss
and ln(V) (else: not loaded if the first loss is already there, the master-weight trap if it got
there after the first step); between an eighth of the way and the midpoint it passes with a
warning. Pass per-iteration losses (log_interval: 1 for NeoX, or the first records of the builtin
engine's metrics, which are per iteration).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from neox_progressive.config import ModelShape
from neox_progressive.errors import CheckFailed, UserError
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.model import Transformer
from neox_progressive.train.batches import open_source
from neox_progressive.train.settings import DatasetPart, read_settings

TRAP = (
    "Known cause: a DeepSpeed/DeeperSpeed version whose `finetune` (module-only) load keeps the fp32 master weights "
    "of the random initialization, so the first optimizer step overwrites the expanded weights (EXPANSION_SPEC "
    "section 10 item 10, DeeperSpeed #56). Use the DeepSpeed NeoX pins (DeeperSpeed 0.16.5, which rebuilds the master "
    "weights from the loaded ones), or train this stage with the builtin engine"
)
NOT_LOADED = (
    "The checkpoint was not loaded: check that `load` names the expanded checkpoint's dir, that it has a `latest` "
    "file, and that `finetune: true` is set (NeoX prints 'Unable to load checkpoint' and trains from a random init)"
)


@torch.no_grad()
def expanded_loss(ckpt: str | Path, config: str | Path | Sequence[str | Path], data: str | Path | None = None,
                  n_batches: int = 4, *, batch_size: int | None = None, device: str | None = None) -> float:
    """Mean token cross-entropy of a checkpoint on held-out samples, with the reference model.

    Args:
        ckpt: NeoX save dir (with `latest`) or tag dir of the expanded checkpoint.
        config: the stage's NeoX YAML file(s) (shape, seq_length, micro batch, validation data).
        data: held-out dataset prefix; default the config's validation data.
        n_batches: micro batches scored (the first samples of the data, in order).
        batch_size: samples per batch; default the config's micro batch.
        device: default CUDA when available (bf16 autocast there if the config trains in bf16).
    """
    paths = [config] if isinstance(config, (str, Path)) else list(config)
    s = read_settings(paths)
    reader = CheckpointReader(ckpt, s.shape)
    shape: ModelShape = reader.shape
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = Transformer.from_state_dict(shape, {k: v.float() for k, v in reader.state_dict().items()}).to(dev)
    spec = DatasetPart(str(data)) if data is not None else s.valid_data
    if spec is None:
        raise UserError("no held-out data: pass data= (a dataset prefix) or set valid_data_paths in the config")
    src = open_source(spec, shape.seq_length, None, s.split, "held-out")
    if src is None:
        raise UserError(f"the config's split {s.split!r} leaves no validation documents; pass data= explicitly")
    size = min(batch_size or s.micro_batch, src.samples_per_epoch)
    n = max(1, min(n_batches, src.samples_per_epoch // size))
    bf16 = dev.type == "cuda" and shape.params_dtype != "float32"
    losses = []
    for b in range(n):
        batch = src.batch(b * size, size).to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch[:, :-1])
        losses.append(float(F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())))
    return sum(losses) / len(losses)


_NEOX_TRAIN_LINE = re.compile(r"iteration\s+(\d+)\s*/\s*\d+ \|.*?\blm_loss: ([0-9.Ee+-]+)")


def parse_neox_losses(log_text: str) -> list[tuple[int, float]]:
    """(iteration, lm_loss) of every training line in a NeoX log (megatron/logging.py training_log:
    "iteration N/ M | ... | lm_loss: 5.123456E+00 | ..."); with log_interval > 1 each loss is the mean
    over the interval, so run the first iterations of a stage with log_interval: 1 for the check."""
    return [(int(m.group(1)), float(m.group(2))) for m in _NEOX_TRAIN_LINE.finditer(log_text)]


@dataclass
class StartCheck:
    ok: bool
    verdict: str
    """"expanded", "not_loaded" (the first losses like a random init), "master_weight_trap" (the first loss
    fine, then like a random init), or "inconclusive" (the expanded loss is itself near ln V)."""
    message: str
    expanded_loss: float
    random_loss: float
    first_losses: list[float]
    threshold: float = math.inf
    """Fail above: midway between the expanded loss and ln V."""
    warn_above: float = math.inf
    """Warn above (and pass up to `threshold`): an eighth of the way from the expanded loss to ln V."""
    warning: bool = False
    """Passed, but the start rose into the band between `warn_above` and `threshold`."""


BUILTIN_TRAP = (
    "The builtin engine keeps no separate master weights, so nothing reset them: training itself went to a random "
    "init's loss. Likely causes: a learning rate too high for the stage start (check the family file's warmup and "
    "max LR), or data unlike the previous member's"
)
BUILTIN_NOT_LOADED = (
    "The builtin engine did not start from the expanded checkpoint: check that the stage config's `load` names the "
    "expanded checkpoint's dir, that it has a `latest` file, and that `finetune: true` is set"
)


def _median(xs: list[float]) -> float:
    """The middle value; of an even count the higher middle one (two losses [fine, bad] fail rather than pass)."""
    return statistics.median_high(xs)


def check_stage_start(expanded: float, first_losses: Sequence[float], vocab_size: int, *, member: str = "",
                      min_gap: float = 0.5, engine: str = "neox") -> StartCheck:
    """Decide from the expanded checkpoint's loss and the first per-iteration training losses
    whether a stage started from the expanded weights or like a random initialization.

    The start is judged on the median of the first losses, so one spike (4.9 -> 6.8 -> 4.9 with a
    short budget) is not taken for a lost expansion. It fails above the midpoint between `expanded`
    and ln(vocab_size), a random init's loss; it passes with a warning in the band from an eighth of
    the way up to that midpoint. The messages name both numbers, and the cause for `engine`
    ("neox": DeepSpeed's fp32 master weights; "builtin": no master weights, so the LR or data).
    `vocab_size`: the model's (padded) vocabulary.
    """
    losses = [float(x) for x in first_losses]
    if not losses:
        raise UserError("no training losses to check: the stage logged none (train at least one iteration)")
    rand = math.log(vocab_size)
    who = f"member {member}: " if member else ""
    gap = rand - expanded
    threshold, warn_above = expanded + gap / 2, expanded + gap / 8
    shown = ", ".join(f"{x:.3f}" for x in losses[:5])
    if gap < min_gap:
        msg = (f"{who}the expanded checkpoint's loss {expanded:.3f} is within {min_gap} of a random init's ln V = {rand:.3f}, "
               "so the start cannot be told apart from a random one (was the smaller member trained?)")
        return StartCheck(True, "inconclusive", msg, expanded, rand, losses)
    med = _median(losses)
    limits = (f"threshold {threshold:.3f}: midway between the expanded checkpoint's {expanded:.3f} and a random init's "
              f"ln V = {rand:.3f}")
    result = lambda ok, verdict, msg, warning=False: StartCheck(  # noqa: E731
        ok, verdict, msg, expanded, rand, losses, threshold, warn_above, warning)
    if med > threshold and losses[0] > threshold:
        cause = BUILTIN_NOT_LOADED if engine == "builtin" else NOT_LOADED
        return result(False, "not_loaded", f"{who}the first training losses ({shown}; median {med:.3f}) are near a random "
                      f"init's, not the expanded checkpoint's ({limits}). {cause}")
    if med > threshold:
        cause = BUILTIN_TRAP if engine == "builtin" else TRAP
        return result(False, "master_weight_trap", f"{who}training started at the expanded checkpoint's loss "
                      f"({losses[0]:.3f} vs {expanded:.3f}) but the median of the first losses ({shown}) is {med:.3f}, "
                      f"near a random init's ({limits}): the stage threw the expansion away. {cause}")
    if med > warn_above:
        return result(True, "expanded", f"{who}warning: started from the expanded weights, but the first losses ({shown}; "
                      f"median {med:.3f}) rose above the expanded checkpoint's {expanded:.3f} by {med - expanded:.3f} "
                      f"(warning above {warn_above:.3f}, failing above {threshold:.3f}, midway to a random init's ln V = "
                      f"{rand:.3f}): part of what the expansion kept is being lost; check the stage's warmup and max LR",
                      warning=True)
    return result(True, "expanded", f"{who}started from the expanded weights: first losses {shown} (median {med:.3f}) vs "
                  f"expanded {expanded:.3f} ({limits}; warning above {warn_above:.3f})")


def require_expanded_start(expanded: float, first_losses: Sequence[float], vocab_size: int, *, member: str = "",
                           engine: str = "neox") -> StartCheck:
    """`check_stage_start`, raising CheckFailed (exit status 1) with its message when the check fails."""
    result = check_stage_start(expanded, first_losses, vocab_size, member=member, engine=engine)
    if not result.ok:
        raise CheckFailed(result.message)
    return result
