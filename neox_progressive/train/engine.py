"""The builtin training engine: one stage of a family on one CPU or one GPU.

Reads the stage's NeoX YAML (see `settings.py`), trains the reference model
(`neox_progressive.model.Transformer`) as NeoX's non-pipeline `train_step` does, and writes NeoX
checkpoints (`checkpoint.py`). Per iteration: for each of the gradient-accumulation micro batches,
the mean token cross-entropy (NeoX's `lm_loss`, every position counted) divided by the number of
micro batches is back-propagated; the gradients are clipped to `gradient_clipping` (global norm);
AdamW (NeoX's Adam is AdamW-style) steps with the learning rate NeoX's AnnealingLR gives for the
number of steps taken so far (`schedule.py`). On a GPU with `precision: bfloat16` the forward pass
runs under bf16 autocast over fp32 master weights; checkpoints hold the weights in the config's
precision, as NeoX's do.

Where the stage starts (first match wins):
1. `save` already holds a checkpoint of this engine for this run: resume from it (weights, optimizer,
   iteration, data position, RNG). This is what makes a killed family run resumable.
2. `load` with `finetune: true`: the weights only (NeoX's module-only load): iteration 0, a fresh
   optimizer and learning-rate warmup, data from the first sample.
3. `load` without `finetune`: resume from that checkpoint (it must be one of ours).
4. Otherwise a random initialization (`weights.py`) from `seed`.

Unlike NeoX, a `load` dir without `latest` is an error (NeoX prints "Unable to load checkpoint" and
trains from a random init), except when `load` is the `save` dir of a run that has not saved yet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neox_progressive.errors import UserError
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.model import Transformer
from neox_progressive.train import checkpoint as ckpt
from neox_progressive.train.batches import SampleSource, open_source
from neox_progressive.train.metrics import FIRST_ITERATIONS, MetricsLog, truncate_after
from neox_progressive.train.schedule import LRSchedule
from neox_progressive.train.settings import TrainSettings, read_settings
from neox_progressive.train.weights import DTYPES, init_neox, param_groups


@dataclass
class StageResult:
    """What `train_stage` did."""

    save_dir: Path | None
    """The NeoX save dir (with `latest`): pass it as the next stage's source or `load`."""
    checkpoint: Path | None
    """The final checkpoint's tag dir (global_stepN)."""
    iterations: int
    completed: bool
    """False when `exit_interval` stopped the stage early."""
    final_train_loss: float | None
    final_valid_loss: float | None
    start_valid_loss: float | None
    """Validation loss of the starting weights (iteration 0), None when resumed past it."""
    tokens: int
    flops: float
    parameters: int
    metrics_path: Path
    started_from: str
    """"scratch", "finetune:<tag dir>" or "resume:<tag dir>"."""


@dataclass
class _Start:
    kind: str
    tag_dir: Path | None = None
    state: dict[str, Any] | None = None


def _starting_point(s: TrainSettings, resume: bool) -> _Start:
    if s.save is not None:
        ckpt.remove_stale_staging(s.save)
        tag_dir = ckpt.latest_tag_dir(s.save) if s.save.is_dir() else None
        if tag_dir is not None:
            state = ckpt.read_train_state(tag_dir)
            if state is None:
                raise UserError(f"save dir {s.save} already holds {tag_dir.name}, which the builtin engine did not write; "
                                "use an empty save dir for this stage")
            if not resume:
                raise UserError(f"save dir {s.save} already holds {tag_dir.name}; delete it to start over, or resume")
            return _Start("resume", tag_dir, state)
    if s.load is None:
        return _Start("scratch")
    tag_dir = ckpt.latest_tag_dir(s.load, s.load_iteration) if s.load.is_dir() else None
    if tag_dir is None:
        if s.save is not None and s.load.resolve() == s.save.resolve():
            return _Start("scratch")
        raise UserError(f"load: {s.load} holds no checkpoint (no `latest` file); NeoX would print 'Unable to load "
                        "checkpoint' and silently train from a random init. Fix the path, or remove `load`")
    if s.finetune:
        return _Start("finetune", tag_dir)
    state = ckpt.read_train_state(tag_dir)
    if state is None:
        raise UserError(f"{tag_dir} has no training state of the builtin engine (NeoX or `expand` wrote it), so it cannot be "
                        "resumed; set finetune: true to start this stage from its weights")
    return _Start("resume", tag_dir, state)


def _fingerprint(s: TrainSettings, shape) -> dict:
    """What decides the trajectory; a resumed run must match it."""
    data = s.train_data
    return json.loads(json.dumps({
        "shape": dataclasses.asdict(shape), "seed": s.seed, "micro_batch": s.micro_batch, "grad_acc": s.grad_acc,
        "train_data": [str(Path(data.prefix).resolve()), data.split_index, s.split if data.split_index is not None else None],
        "optimizer": s.optimizer, "weight_decay": s.weight_decay, "gradient_clipping": s.gradient_clipping,
    }))


def _check_resume(s: TrainSettings, state: dict, fingerprint: dict, tag_dir: Path) -> LRSchedule:
    old = state["fingerprint"]
    diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if diff:
        raise UserError(f"{tag_dir} was trained with different {', '.join(diff)} than this config; resuming would not "
                        "continue that run: use a new save dir (or restore the config)")
    saved = LRSchedule.from_state_dict(state["lr_scheduler"])
    if s.override_lr_scheduler or saved == s.schedule:
        return s.schedule
    if s.use_checkpoint_lr_scheduler:
        return saved
    fields = [f.name for f in dataclasses.fields(LRSchedule) if getattr(saved, f.name) != getattr(s.schedule, f.name)]
    raise UserError(f"the learning-rate schedule differs from the one {tag_dir} was trained with ({', '.join(fields)}); "
                    "NeoX refuses that too: set override_lr_scheduler: true (use the config's) or "
                    "use_checkpoint_lr_scheduler: true (keep the checkpoint's)")


class _Stage:
    """The state of one training run; `run()` does the work."""

    def __init__(self, s: TrainSettings, device: torch.device, quiet: bool, log_path: Path | None, resume: bool,
                 callback: Callable[[dict], None] | None):
        self.s, self.device, self.quiet, self.callback = s, device, quiet, callback
        self.start = _starting_point(s, resume)
        self.shape = self._complete_shape()
        self.params = self.shape.param_count()
        self.file_dtype = DTYPES[self.shape.params_dtype]
        self.autocast = device.type == "cuda" and self.file_dtype != torch.float32
        self.fingerprint = _fingerprint(s, self.shape)
        self.model = Transformer(self.shape).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, s.weight_decay), lr=s.schedule.lr(0),
                                           betas=s.optimizer["betas"], eps=s.optimizer["eps"])
        self.iteration, self.log_acc, self.schedule = 0, [0.0, 0], s.schedule
        self.last_train = self.last_valid = self.start_valid = None
        self.last_valid_it: int | None = None
        self.last_saved: int | None = None
        self._load_weights()
        self.train_src = open_source(s.train_data, s.seq_length, s.seed, s.split, "train")
        self.valid_src = open_source(s.valid_data, s.seq_length, None, s.split, "valid") if s.valid_data else None
        want = s.eval_iters * s.global_batch
        if self.valid_src is not None and 0 < self.valid_src.samples_per_epoch < want:
            s.notes.append(f"the validation data holds {self.valid_src.samples_per_epoch} samples, fewer than eval_iters x "
                           f"global batch = {want}; every evaluation scores them all (in whole micro batches)")
        self.metrics_path = log_path or (s.save / "metrics.jsonl" if s.save else (s.log_dir or Path(".")) / "metrics.jsonl")

    def _complete_shape(self):
        shape = self.s.shape
        if self.start.tag_dir is not None:
            return CheckpointReader(self.start.tag_dir, shape).shape
        if shape.padded_vocab_size is None:
            raise UserError("the vocab size is unknown: set tokenizer_type and vocab_file to the tokenizer the data was "
                            "prepared with (e.g. vocab_file: data/train.tokenizer.model, tokenizer_type: SPMTokenizer)")
        return shape

    def _load_weights(self) -> None:
        s, start = self.s, self.start
        if start.kind == "scratch":
            torch.manual_seed(s.seed)
            init_neox(self.model, s.seed, s.init_method, s.output_layer_init_method, s.init_method_std)
            return
        state = start.state or {}
        sd = state.get("master_weights") or CheckpointReader(start.tag_dir, self.shape).state_dict()
        self.model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        if start.kind == "finetune":
            torch.manual_seed(s.seed)
            return
        self.schedule = _check_resume(s, state, self.fingerprint, start.tag_dir)
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        self.log_acc = list(state["log_acc"])
        self.last_train, self.last_valid, self.start_valid = state["last_train"], state["last_valid"], state["start_valid"]
        self.last_valid_it = state["last_valid_it"]
        self.last_saved = self.iteration
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    # ---- one step --------------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        if int(batch.max()) >= self.shape.padded_vocab_size:
            raise UserError(f"token id {int(batch.max())} in the data is outside the model's vocab "
                            f"({self.shape.padded_vocab_size} rows): the data was prepared with another tokenizer")
        batch = batch.to(self.device, non_blocking=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with ctx:
            logits = self.model(batch[:, :-1])                                  # (B, S, V)
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def _train_step(self) -> tuple[float, float, float]:
        s = self.s
        lr = self.schedule.lr(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        first = self.iteration * s.global_batch
        for m in range(s.grad_acc):
            loss = self._loss(self.train_src.batch(first + m * s.micro_batch, s.micro_batch))
            (loss / s.grad_acc).backward()
            losses.append(loss.detach())
        max_norm = s.gradient_clipping if s.gradient_clipping > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.iteration += 1
        return float(torch.stack(losses).mean()), lr, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        src: SampleSource = self.valid_src
        size = min(self.s.micro_batch, src.samples_per_epoch)
        n = max(1, min(self.s.eval_iters * self.s.grad_acc, src.samples_per_epoch // size))
        self.model.eval()
        losses = [float(self._loss(src.batch(b * size, size))) for b in range(n)]
        self.model.train()
        return sum(losses) / len(losses)

    # ---- records, checkpoints ----------------------------------------------------------------------
    def _record(self, kind: str, **values) -> None:
        tokens = self.iteration * self.s.tokens_per_iteration
        rec = {"kind": kind, "iteration": self.iteration, **values, "tokens": tokens, "flops": 6.0 * self.params * tokens}
        self.log.write(rec)
        if self.callback is not None:
            self.callback(rec)

    def _valid(self) -> None:
        loss = self.evaluate()
        self.last_valid, self.last_valid_it = loss, self.iteration
        if self.iteration == 0:
            self.start_valid = loss
        self._record("valid", loss=loss, ppl=math.exp(min(loss, 50.0)))

    def _save(self) -> None:
        s = self.s
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state = {
            "format": ckpt.STATE_FORMAT, "iteration": self.iteration, "consumed_samples": self.iteration * s.global_batch,
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.schedule.state_dict(self.iteration),
            "master_weights": sd if self.file_dtype != torch.float32 else None, "fingerprint": self.fingerprint,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "log_acc": self.log_acc, "last_train": self.last_train, "last_valid": self.last_valid,
            "start_valid": self.start_valid, "last_valid_it": self.last_valid_it,
        }
        ckpt.save_checkpoint(s.save, self.iteration, self.shape, sd, state, s.config_paths, self.file_dtype,
                             s.keep_last_n_checkpoints)
        self.last_saved = self.iteration

    # ---- the loop ------------------------------------------------------------------------------------
    def run(self) -> StageResult:
        s = self.s
        if self.start.kind == "resume":
            truncate_after(self.metrics_path, self.iteration, keep_valid_at_end=self.last_valid_it == self.iteration)
        else:
            self.metrics_path.unlink(missing_ok=True)
        self.log = MetricsLog(self.metrics_path, quiet=self.quiet, wandb_cfg=s.wandb, save=s.save,
                              run_config=s.cfg, wandb_dir=s.log_dir or s.save or Path("."))
        try:
            self._banner()
            if self.iteration == 0 and self.valid_src is not None and s.eval_iters > 0:
                self._valid()
            completed = self._loop()
            if completed and self.valid_src is not None and s.eval_iters > 0 and not self._evaluated_at_end():
                self._valid()
            if s.save is not None and self.iteration > 0 and self.last_saved != self.iteration:
                self._save()
        finally:
            self.log.close()
        return self._result(completed)

    def _loop(self) -> bool:
        s = self.s
        t0 = time.time()
        while self.iteration < s.train_iters:
            loss, lr, grad_norm = self._train_step()
            self.log_acc = [self.log_acc[0] + loss, self.log_acc[1] + 1]
            it = self.iteration
            if it <= FIRST_ITERATIONS or it % s.log_interval == 0 or it == s.train_iters:
                self.last_train = self.log_acc[0] / self.log_acc[1]
                self._record("train", loss=self.last_train, lr=lr, grad_norm=grad_norm,
                             samples=it * s.global_batch, elapsed_s=round(time.time() - t0, 3))
                self.log_acc = [0.0, 0]
            # evaluation before the checkpoint (NeoX saves first): the saved state then covers both
            if s.eval_interval and it % s.eval_interval == 0 and self.valid_src is not None and s.eval_iters > 0:
                self._valid()
            if s.save is not None and s.is_save_iter(it):
                self._save()
            if s.exit_interval and it % s.exit_interval == 0 and it < s.train_iters:
                return False
        return True

    def _evaluated_at_end(self) -> bool:
        return self.last_valid_it == self.iteration

    def _banner(self) -> None:
        if self.quiet:
            return
        s = self.s
        for note in s.notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
        origin = self.start.kind + (f" from {self.start.tag_dir}" if self.start.tag_dir else "")
        print(f"builtin engine: {self.params:,} parameters on {self.device} | start: {origin} (iteration {self.iteration}) | "
              f"{s.train_iters} iterations x {s.global_batch} samples x {s.seq_length} tokens | "
              f"train data: {self.train_src.samples_per_epoch} samples/epoch "
              f"({self.train_src.epochs_for(s.train_iters * s.global_batch):.2f} epochs)", file=sys.stderr, flush=True)

    def _result(self, completed: bool) -> StageResult:
        s = self.s
        tag_dir = (s.save / ckpt.tag_of(self.last_saved)) if s.save is not None and self.last_saved else None
        tokens = self.iteration * s.tokens_per_iteration
        origin = self.start.kind + (f":{self.start.tag_dir}" if self.start.tag_dir else "")
        return StageResult(save_dir=s.save, checkpoint=tag_dir, iterations=self.iteration, completed=completed,
                           final_train_loss=self.last_train, final_valid_loss=self.last_valid,
                           start_valid_loss=self.start_valid, tokens=tokens, flops=6.0 * self.params * tokens,
                           parameters=self.params, metrics_path=self.metrics_path, started_from=origin)


def train_stage(stage_yaml_paths: list[str | Path] | str | Path, *, device: str | torch.device | None = None,
                quiet: bool = False, log_path: str | Path | None = None, resume: bool = True,
                callback: Callable[[dict], None] | None = None) -> StageResult:
    """Train one stage from its NeoX YAML file(s) with the builtin engine.

    Args:
        stage_yaml_paths: the stage's NeoX config file(s), merged as NeoX merges them.
        device: "cpu", "cuda", "cuda:1", ...; default: CUDA when available.
        quiet: no console output (the metrics file is still written).
        log_path: metrics JSONL (default `<save>/metrics.jsonl`, else `<log_dir>/metrics.jsonl`).
        resume: continue from a checkpoint of this engine already in `save` (see module docstring).
        callback: called with every metrics record; raising from it stops training.

    Returns:
        A StageResult (final checkpoint, losses, tokens, FLOPs, metrics path).
    """
    paths = [stage_yaml_paths] if isinstance(stage_yaml_paths, (str, Path)) else list(stage_yaml_paths)
    settings = read_settings(paths)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but PyTorch sees no CUDA device; use device='cpu'")
    stage = _Stage(settings, dev, quiet, Path(log_path) if log_path else None, resume, callback)
    return stage.run()
