"""The builtin engine on a tiny model and real text: it learns, its first update is NeoX's AdamW step
(recomputed here by hand), its checkpoints are NeoX checkpoints, resuming equals not stopping,
finetuning starts at the checkpoint's loss, and bad configs are refused with a clear message."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_util import checksums, make_data, stage_config, tiny_shape, write_stage

from neox_progressive.cli import main as cli_main
from neox_progressive.data import MMapDataset, write_dataset
from neox_progressive.errors import UserError
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.safe import load_pt
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer, init_weights
from neox_progressive.train import expanded_loss, read_metrics, train_stage
from neox_progressive.train.batches import split_items


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 40-iteration run with checkpoints every 10 iterations."""
    root = tmp_path_factory.mktemp("trained")
    cfg = write_stage(root / "stage.yml", stage_config(data, root / "ck", train_iters=40))
    return cfg, train_stage(cfg, device="cpu", quiet=True)


def test_loss_goes_down_from_ln_v(trained):
    _, res = trained
    assert res.completed and res.iterations == 40
    assert abs(res.start_valid_loss - math.log(512)) < 0.1          # a fresh init predicts ~uniformly
    assert res.final_valid_loss < res.start_valid_loss - 1.0
    train = read_metrics(res.metrics_path, "train")
    assert [r["iteration"] for r in train] == [*range(1, 11), 15, 20, 25, 30, 35, 40]
    assert train[-1]["tokens"] == 40 * 4 * 32 and train[-1]["flops"] == 6 * res.parameters * 40 * 4 * 32
    assert [r["iteration"] for r in read_metrics(res.metrics_path, "valid")] == [0, 10, 20, 30, 40]


def test_checkpoints_are_neox_checkpoints(trained, capsys):
    cfg, res = trained
    save = res.save_dir
    assert (save / "latest").read_text() == "global_step40" and res.checkpoint == save / "global_step40"
    assert sorted(p.name for p in save.glob("global_step*")) == ["global_step10", "global_step20", "global_step30",
                                                                  "global_step40"]
    for tag in ("global_step10", "global_step40"):
        assert cli_main(["inspect", str(save / tag), "--config", str(cfg), "--quiet"]) == 0
    reader = CheckpointReader(save, tiny_shape().replace(padded_vocab_size=512))
    assert reader.iteration == 40 and reader.format == "pipeline"
    assert (save / "global_step40" / "configs" / "stage.yml").read_text() == cfg.read_text()
    mp = load_pt(save / "global_step40" / "mp_rank_00_model_states.pt")
    assert mp["module"] is None and mp["dp_world_size"] == 1 and "args" not in mp
    # the model files hold what the engine trained: the finetune start reproduces the final validation loss
    assert expanded_loss(save, cfg, n_batches=2, device="cpu") == pytest.approx(res.final_valid_loss, abs=1e-6)


def test_first_update_is_neox_adamw(data, tmp_path):
    """One iteration on a dataset of exactly four samples (so the sample order cannot matter),
    two micro batches, clipping active: w1 = w0 (1 - lr wd) - lr c g / (|c g| + eps) per element,
    c = clip / (|g| + 1e-6), and no decay on the norm scales."""
    shape = tiny_shape().replace(padded_vocab_size=512)
    S = shape.seq_length
    tokens = np.asarray(MMapDataset(data["train"]).tokens()[: 4 * S + 1])
    write_dataset(tmp_path / "four", [tokens], vocab_size=512)
    model = init_weights(Transformer(shape), seed=5, std=0.1)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_checkpoint(tmp_path / "start", shape, w0)
    lr, wd, eps, clip = 2e-3, 0.1, 1e-3, 0.05
    cfg = stage_config(data, tmp_path / "ck", train_iters=1, train_data_paths=[str(tmp_path / "four")],
                       train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, warmup=0.0, weight_decay=wd,
                       gradient_clipping=clip, optimizer={"type": "Adam", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": eps}},
                       load=str(tmp_path / "start"), finetune=True, checkpoint_factor=1)
    res = train_stage(write_stage(tmp_path / "s.yml", cfg), device="cpu", quiet=True)

    batch = torch.from_numpy(np.stack([tokens[i * S: i * S + S + 1] for i in range(4)]).astype(np.int64))
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    c = min(1.0, clip / (float(norm) + 1e-6))
    assert c < 1                                                 # clipping did something
    lr0 = lr                                                     # warmup 0, cosine at step 0
    got = CheckpointReader(res.save_dir, shape).state_dict()
    for name, p in model.named_parameters():
        g = p.grad * c
        decay = 0.0 if name.endswith("norm.weight") else wd
        want = w0[name] * (1 - lr0 * decay) - lr0 * g / (g.abs() + eps)
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-7, msg=name)
    rec = read_metrics(res.metrics_path, "train")[0]
    assert rec["lr"] == lr0 and rec["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert rec["grad_norm"] == pytest.approx(float(norm), rel=1e-5)


def test_resume_equals_uninterrupted(trained, data, tmp_path):
    cfg, res = trained
    over = dict(train_iters=40)
    write_stage(tmp_path / "a.yml", stage_config(data, tmp_path / "ck", exit_interval=20, **over))
    first = train_stage(tmp_path / "a.yml", device="cpu", quiet=True)
    assert not first.completed and first.iterations == 20
    second = train_stage(write_stage(tmp_path / "b.yml", stage_config(data, tmp_path / "ck", **over)), device="cpu",
                         quiet=True)
    assert second.started_from.startswith("resume:") and second.completed
    assert checksums(second.checkpoint) == checksums(res.checkpoint)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in recs]  # noqa: E731
    assert strip(read_metrics(second.metrics_path)) == strip(read_metrics(res.metrics_path))
    again = train_stage(tmp_path / "b.yml", device="cpu", quiet=True)      # done already: nothing changes
    assert checksums(again.checkpoint) == checksums(res.checkpoint) and again.final_valid_loss == res.final_valid_loss


def test_finetune_starts_at_the_checkpoint_loss(trained, data, tmp_path):
    cfg, res = trained
    cfg2 = stage_config(data, tmp_path / "ck2", load=str(res.save_dir), finetune=True, seed=11, train_iters=5)
    res2 = train_stage(write_stage(tmp_path / "s2.yml", cfg2), device="cpu", quiet=True)
    start = expanded_loss(res.save_dir, tmp_path / "s2.yml", n_batches=2, device="cpu")
    assert res2.start_valid_loss == pytest.approx(start, abs=1e-6)
    assert res2.start_valid_loss == pytest.approx(res.final_valid_loss, abs=1e-6)
    first = read_metrics(res2.metrics_path, "train")[0]
    assert first["iteration"] == 1 and abs(first["loss"] - start) < 0.5 and first["loss"] < math.log(512) - 1
    assert first["lr"] == pytest.approx(0.01 / (0.1 * 5))     # a fresh warmup: lr(0) = lr / warmup_iter


def test_same_seed_same_bits_other_seed_other_bits(data, tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = write_stage(tmp_path / f"{name}.yml", stage_config(data, tmp_path / name, train_iters=3, seed=seed,
                                                                 checkpoint_factor=3))
        runs[name] = checksums(train_stage(cfg, device="cpu", quiet=True).checkpoint)
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


@pytest.mark.parametrize("tp,pp,precision", [(2, 0, "fp32"), (1, 1, "bfloat16")])
def test_other_layouts_and_bf16_resume_exactly(data, tmp_path, tp, pp, precision):
    shape = tiny_shape(tp=tp, pp=pp)
    over = dict(train_iters=6, checkpoint_factor=3, precision=precision)
    full = train_stage(write_stage(tmp_path / "f.yml", stage_config(data, tmp_path / "full", shape, **over)),
                       device="cpu", quiet=True)
    write_stage(tmp_path / "p1.yml", stage_config(data, tmp_path / "part", shape, exit_interval=3, **over))
    train_stage(tmp_path / "p1.yml", device="cpu", quiet=True)
    part = train_stage(write_stage(tmp_path / "p2.yml", stage_config(data, tmp_path / "part", shape, **over)),
                       device="cpu", quiet=True)
    assert checksums(part.checkpoint) == checksums(full.checkpoint)
    reader = CheckpointReader(full.save_dir, shape.replace(padded_vocab_size=512))
    assert reader.tp == tp and reader.format == ("sequential" if pp == 0 else "pipeline")
    want = torch.bfloat16 if precision == "bfloat16" else torch.float32
    assert reader.embed().dtype == want
    assert cli_main(["inspect", str(full.save_dir), "--config", str(tmp_path / "f.yml"), "--quiet"]) == 0


def test_gradient_accumulation_matches_one_big_micro_batch(data, tmp_path):
    # eps 1e-3: with eps 1e-8 Adam turns the last-bit differences of near-zero gradients into lr-sized steps
    outs = []
    opt = {"type": "Adam", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-3}}
    for name, micro, gas in (("one", 4, 1), ("acc", 2, 2)):
        cfg = stage_config(data, tmp_path / name, train_iters=4, checkpoint_factor=4, optimizer=opt,
                           train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)
        res = train_stage(write_stage(tmp_path / f"{name}.yml", cfg), device="cpu", quiet=True)
        outs.append(CheckpointReader(res.save_dir, tiny_shape().replace(padded_vocab_size=512)).state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_data_path_split_is_neox_split(data, tmp_path):
    # NeoX's get_train_valid_test_split_, worked by hand: 1000 items, "969, 30, 1" -> 969 / 30 / 1
    assert split_items("969, 30, 1", 1000) == [0, 969, 999, 1000]
    assert split_items("8/2", 7) == [0, 6, 7, 7]           # round(5.6) = 6, round(1.4) = 1, the rest to test
    assert split_items("1", 10) == [0, 10, 10, 10]
    cfg = stage_config(data, None, train_iters=2, data_path=data["train"], split="90,10,0",
                       train_data_paths=None, valid_data_paths=None)
    res = train_stage(write_stage(tmp_path / "s.yml", cfg), device="cpu", quiet=True, log_path=tmp_path / "m.jsonl")
    assert res.completed and res.start_valid_loss is not None


BAD = [
    (dict(train_batch_size=16), "gradient_accumulation_steps: 4"),
    (dict(train_data_paths=["a", "b"]), "reads one"),
    (dict(optimizer={"type": "lion", "params": {"lr": 1e-3}}), "not supported"),
    (dict(optimizer={"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1}}), "top-level weight_decay"),
    (dict(eod_mask_loss=True), "eod_mask_loss"),
    (dict(load="/nonexistent/dir", finetune=True), "no `latest`"),
    (dict(vocab_file=None), "vocab size is unknown"),
    (dict(init_method="orthogonal"), "not implemented"),
    (dict(save="/nonexistent/save", checkpoint_factor=None), "checkpoint_factor"),
    (dict(train_iters=None), "train_iters"),
]


@pytest.mark.parametrize("over,match", BAD)
def test_bad_configs_are_refused(data, tmp_path, over, match):
    over = dict(over)
    cfg = write_stage(tmp_path / "s.yml", stage_config(data, over.pop("save", None), **over))
    with pytest.raises(UserError, match=match):
        train_stage(cfg, device="cpu", quiet=True, log_path=tmp_path / "m.jsonl")


def test_resume_refuses_other_runs(trained, data, tmp_path):
    _, res = trained
    # resuming the trained run's save dir with another seed would not continue that run
    with pytest.raises(UserError, match="different seed"):
        train_stage(write_stage(tmp_path / "a.yml", stage_config(data, res.save_dir, train_iters=40, seed=99)),
                    device="cpu", quiet=True)
    with pytest.raises(UserError, match="override_lr_scheduler"):
        train_stage(write_stage(tmp_path / "b.yml", stage_config(data, res.save_dir, train_iters=80)),
                    device="cpu", quiet=True)
    # a checkpoint without the engine's state (written by NeoX or `expand`) cannot be resumed
    write_checkpoint(tmp_path / "ext", tiny_shape().replace(padded_vocab_size=512),
                     CheckpointReader(res.save_dir, tiny_shape().replace(padded_vocab_size=512)).state_dict())
    with pytest.raises(UserError, match="set finetune: true"):
        train_stage(write_stage(tmp_path / "c.yml", stage_config(data, None, load=str(tmp_path / "ext"))),
                    device="cpu", quiet=True, log_path=tmp_path / "m.jsonl")


def test_tokens_outside_the_vocab_are_refused(data, tmp_path):
    write_dataset(tmp_path / "big", [list(range(600, 700))], vocab_size=70000)
    cfg = stage_config(data, None, train_data_paths=[str(tmp_path / "big")], train_iters=1)
    with pytest.raises(UserError, match="outside the model's vocab"):
        train_stage(write_stage(tmp_path / "s.yml", cfg), device="cpu", quiet=True, log_path=tmp_path / "m.jsonl")


def test_result_is_json_and_module_entry_point(trained, tmp_path, capsys):
    from neox_progressive.train.__main__ import main

    cfg, res = trained
    assert main([str(cfg), "--quiet", "--device", "cpu"]) == 0             # finished run: resumes, nothing to do
    out = json.loads(capsys.readouterr().out)
    assert out["iterations"] == 40 and out["checkpoint"].endswith("global_step40")


@pytest.mark.gpu
def test_bf16_autocast_on_gpu(data, tmp_path):
    cfg = write_stage(tmp_path / "s.yml", stage_config(data, tmp_path / "ck", train_iters=30, precision="bfloat16"))
    res = train_stage(cfg, device="cuda", quiet=True)
    assert res.final_valid_loss < res.start_valid_loss - 0.5
    reader = CheckpointReader(res.save_dir, tiny_shape().replace(padded_vocab_size=512))
    assert reader.embed().dtype == torch.bfloat16
    assert expanded_loss(res.save_dir, cfg, n_batches=2, device="cuda") == pytest.approx(res.final_valid_loss, abs=0.05)
