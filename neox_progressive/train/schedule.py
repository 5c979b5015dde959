"""NeoX's learning-rate schedule (megatron/learning_rates.py AnnealingLR, training.py
get_learning_rate_scheduler, at ea7aefd8, i.e. after fix #1379).

Decay horizon (`end_iter`): `lr_decay_iters` if set, else floor(train_iters x lr_decay_fraction) if
set, else train_iters; at least 1. Warmup iterations = `warmup` (a fraction, default 0.01) x that
horizon, kept as a float. The learning rate at step n (n = optimizer steps taken so far; the update
of iteration n+1 uses lr(n), because DeepSpeed steps the scheduler after each optimizer step):

    warmup (warmup_iter > 0 and n <= warmup_iter):  lr * max(1, n) / warmup_iter   (no min_lr clip)
    otherwise, m = n - warmup_iter, E = end_iter - warmup_iter:
        linear:      lr * (E - m) / E
        cosine:      min_lr + (lr - min_lr) / 2 * (cos(pi m / E) + 1)
        exponential: lr * exp(-0.693 m / E)
        constant:    lr
      then max(., min_lr)

Two NeoX quirks are kept on purpose: cosine is not clamped after end_iter (it rises again), and a
warmup shorter than one iteration (0 < warmup_iter < 1) gives step 0 the rate lr / warmup_iter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from neox_progressive.errors import UserError

DECAY_STYLES = ("constant", "linear", "cosine", "exponential")


@dataclass(frozen=True)
class LRSchedule:
    start_lr: float
    min_lr: float
    warmup_iter: float
    end_iter: int
    decay_style: str

    def lr(self, n: int) -> float:
        """The learning rate NeoX's AnnealingLR gives after `n` optimizer steps."""
        if self.warmup_iter > 0 and n <= self.warmup_iter:
            return float(self.start_lr) * max(1, n) / self.warmup_iter
        m = n - self.warmup_iter
        span = self.end_iter - self.warmup_iter
        if self.decay_style == "linear":
            lr = self.start_lr * (span - m) / span
        elif self.decay_style == "cosine":
            lr = self.min_lr + (self.start_lr - self.min_lr) / 2.0 * (math.cos(math.pi * m / span) + 1)
        elif self.decay_style == "exponential":
            lr = self.start_lr * math.exp(-0.693 * m / span)
        else:
            lr = self.start_lr
        return max(lr, self.min_lr)

    def state_dict(self, num_iters: int) -> dict:
        """The dict NeoX stores as `lr_scheduler` in its checkpoints."""
        return {"start_lr": self.start_lr, "warmup_iter": self.warmup_iter, "num_iters": num_iters,
                "decay_style": self.decay_style, "end_iter": self.end_iter, "min_lr": self.min_lr}

    @classmethod
    def from_state_dict(cls, sd: dict) -> LRSchedule:
        return cls(float(sd["start_lr"]), float(sd["min_lr"]), float(sd["warmup_iter"]), int(sd["end_iter"]),
                   str(sd["decay_style"]))

    @classmethod
    def from_neox(cls, cfg: dict, lr: float, train_iters: int) -> LRSchedule:
        """From a merged NeoX config (`lr` is optimizer.params.lr)."""
        style = str(cfg.get("lr_decay_style", "linear"))
        if style not in DECAY_STYLES:
            raise UserError(f"config key lr_decay_style: {style!r} is not one of {DECAY_STYLES}")
        decay_iters, fraction = cfg.get("lr_decay_iters"), cfg.get("lr_decay_fraction")
        if decay_iters is not None:
            num_iters = int(decay_iters)
        elif fraction is not None:
            num_iters = math.floor(train_iters * float(fraction))
        else:
            num_iters = train_iters
        num_iters = max(1, num_iters)
        warmup = cfg.get("warmup", 0.01)
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
            raise UserError(f"config key warmup: expected a fraction of the decay iterations like 0.01, got {warmup!r}")
        min_lr = float(cfg.get("min_lr", 0.0))
        if min_lr > lr:
            raise UserError(f"min_lr {min_lr} is larger than the learning rate {lr}; NeoX refuses that")
        return cls(start_lr=float(lr), min_lr=min_lr, warmup_iter=warmup * num_iters, end_iter=num_iters, decay_style=style)
