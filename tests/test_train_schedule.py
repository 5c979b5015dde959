"""The builtin engine's learning rate equals NeoX's AnnealingLR step by step: against the formulas
written out here from megatron/learning_rates.py + training.py (ea7aefd8, after fix #1379), and,
with NEOX_DIR, against NeoX's own class in a subprocess."""

import json
import math
import subprocess

import pytest

from neox_progressive.train.schedule import LRSchedule

CASES = [
    # (config keys, train_iters)
    ({"lr_decay_style": "cosine", "warmup": 0.01, "min_lr": 1e-5}, 1000),
    ({"lr_decay_style": "cosine", "warmup": 0.1, "min_lr": 1e-4, "lr_decay_iters": 80}, 100),   # rises again after 80
    ({"lr_decay_style": "cosine", "warmup": 0.01, "min_lr": 0.0}, 40),                          # warmup_iter 0.4 < 1
    ({"lr_decay_style": "linear", "warmup": 0.05, "min_lr": 2e-4, "lr_decay_fraction": 0.5}, 200),
    ({"lr_decay_style": "exponential", "warmup": 0.0}, 50),
    ({"lr_decay_style": "constant", "warmup": 0.2}, 30),
    ({}, 60),                                                                                   # NeoX defaults
]
LR = 3e-3


def neox_lr(n, cfg, train_iters):
    """NeoX, written out: horizon, float warmup, then AnnealingLR.get_lr at num_iters = n."""
    if cfg.get("lr_decay_iters") is not None:
        end = cfg["lr_decay_iters"]
    elif cfg.get("lr_decay_fraction") is not None:
        end = math.floor(train_iters * cfg["lr_decay_fraction"])
    else:
        end = train_iters
    end = max(1, end)
    warm = cfg.get("warmup", 0.01) * end
    min_lr, style = cfg.get("min_lr", 0.0), cfg.get("lr_decay_style", "linear")
    if warm > 0 and n <= warm:
        return LR * max(1, n) / warm
    x, span = n - warm, end - warm
    if style == "linear":
        lr = LR * (span - x) / span
    elif style == "cosine":
        lr = min_lr + (LR - min_lr) / 2.0 * (math.cos(math.pi * x / span) + 1)
    elif style == "exponential":
        lr = LR * math.exp(-0.693 * x / span)
    else:
        lr = LR
    return max(lr, min_lr)


@pytest.mark.parametrize("cfg,iters", CASES)
def test_schedule_equals_neox_formulas(cfg, iters):
    sched = LRSchedule.from_neox(cfg, LR, iters)
    for n in range(iters + 1):
        assert sched.lr(n) == neox_lr(n, cfg, iters), n


def test_step_zero_and_quirks():
    s = LRSchedule.from_neox({"lr_decay_style": "cosine", "warmup": 0.1, "min_lr": 1e-4}, LR, 100)
    assert s.warmup_iter == 10.0
    assert s.lr(0) == LR / 10 == s.lr(1)            # fix #1379: step 0 is not zero
    assert s.lr(10) == LR and s.lr(100) == pytest.approx(1e-4)
    short = LRSchedule.from_neox({"lr_decay_style": "cosine", "warmup": 0.01}, LR, 40)
    assert short.lr(0) == pytest.approx(LR / 0.4)    # NeoX's formula for a sub-iteration warmup
    rises = LRSchedule.from_neox({"lr_decay_style": "cosine", "warmup": 0.0, "lr_decay_iters": 50}, LR, 100)
    assert rises.lr(100) == pytest.approx(LR)       # cosine is not clamped after the horizon


@pytest.mark.neox
def test_schedule_equals_neox_annealing_lr():
    from neox_run import neox_dir, neox_python

    script = (
        "import sys, json, math; sys.path.insert(0, '.')\n"
        "from megatron.learning_rates import AnnealingLR\n"
        "class Opt: param_groups = [{}]\n"
        "out = []\n"
        "for cfg, iters in json.loads(sys.argv[1]):\n"
        "    # training.get_learning_rate_scheduler, verbatim in effect\n"
        "    if cfg.get('lr_decay_iters') is not None: num = cfg['lr_decay_iters']\n"
        "    elif cfg.get('lr_decay_fraction') is not None: num = math.floor(iters * cfg['lr_decay_fraction'])\n"
        "    else: num = iters\n"
        "    num = max(1, num)\n"
        "    opt = Opt()\n"
        "    s = AnnealingLR(opt, start_lr=float(sys.argv[2]), warmup_iter=cfg.get('warmup', 0.01) * num, total_iters=num,\n"
        "                    decay_style=cfg.get('lr_decay_style', 'linear'), last_iter=0, min_lr=cfg.get('min_lr', 0.0))\n"
        "    lrs = [opt.param_groups[0]['lr']]\n"
        "    for _ in range(iters):\n"
        "        s.step(); lrs.append(opt.param_groups[0]['lr'])\n"
        "    out.append(lrs)\n"
        "print('JSON' + json.dumps(out))\n"
    )
    proc = subprocess.run([neox_python(), "-c", script, json.dumps(CASES), repr(LR)], cwd=neox_dir(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    neox = json.loads(proc.stdout.split("JSON", 1)[1])
    for (cfg, iters), lrs in zip(CASES, neox):
        sched = LRSchedule.from_neox(cfg, LR, iters)
        assert [sched.lr(n) for n in range(iters + 1)] == lrs
