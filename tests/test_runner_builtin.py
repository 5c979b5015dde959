"""The runner's BuiltinEngine drives `neox_progressive.train.train_stage`: it returns the stage's save
dir (with `latest`) and the metrics file, and a second call resumes (nothing left to do)."""

from train_util import make_data, stage_config, write_stage

from neox_progressive.runner.engines import BuiltinEngine
from neox_progressive.train import read_metrics


def test_builtin_engine_trains_and_returns_the_save_dir(tmp_path):
    data = make_data(tmp_path / "d", n_chars=40_000)
    stage = write_stage(tmp_path / "stage_1.yml", stage_config(data, tmp_path / "ck", train_iters=4, checkpoint_factor=2))
    engine = BuiltinEngine(device="cpu")
    res = engine.train(stage, tmp_path / "logs", quiet=True)
    assert res.checkpoint == tmp_path / "ck" and (res.checkpoint / "latest").read_text() == "global_step4"
    assert res.metrics == tmp_path / "logs" / "stage_1.metrics.jsonl"
    assert read_metrics(res.metrics, "train")[-1]["iteration"] == 4
    again = engine.train(stage, tmp_path / "logs", quiet=True)
    assert again.checkpoint == res.checkpoint and read_metrics(again.metrics, "train")[-1]["iteration"] == 4
    assert "builtin engine --device cpu" in engine.command(stage)
