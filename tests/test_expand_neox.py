"""Real GPT-NeoX (NEOX_DIR) in the loop: NeoX trains a tiny source model and saves it; we expand NeoX's own
checkpoint; NeoX loads the expansion with `finetune: true` and trains, and its first logged loss equals the
reference model's loss on the expanded weights (on NeoX's own first batch). For FPI that is also the source
model's loss; for AKI it is a trained model's loss, far below a random init's ln(V)."""

import math

import pytest
import yaml
from neox_run import run_neox
from test_train_neox import B, neox_batch, neox_config, reference_loss
from train_util import make_data, tiny_shape

from neox_progressive.expand import ExpandOptions, expand_checkpoint
from neox_progressive.train import check_stage_start, parse_neox_losses

pytestmark = [pytest.mark.neox, pytest.mark.slow]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A NeoX-trained tiny model (pipeline format, GQA 4/2), saved by NeoX itself."""
    root = tmp_path_factory.mktemp("expand_neox")
    data = make_data(root / "data", n_chars=60_000)
    shape = tiny_shape(pp=1)
    cfg = neox_config(data, shape, data_path=data["train"], split="1000,0,0", train_iters=150, save=str(root / "src"),
                      checkpoint_factor=150, eval_interval=1000,
                      optimizer={"type": "lion", "params": {"lr": 3e-3, "betas": [0.9, 0.99]}}, min_lr=3e-4)
    (root / "src.yml").write_text(yaml.safe_dump(cfg))
    run_neox("train.py", root / "src.yml", log=root / "src.log")
    for f in (root / "data").glob("*_indexmap_*"):  # NeoX's sample index cache of this run; the tests read theirs
        f.unlink()
    return root, data, shape


@pytest.mark.parametrize("method,pp", [("aki", 1), ("fpi", 0)])
def test_neox_finetunes_from_the_expansion(source, tmp_path, method, pp):
    root, data, src = source
    dst = src.replace(hidden_size=48, num_heads=6, num_kv_heads=3, ffn_size=96, num_layers=3, pp=pp)
    base = dict(data_path=data["train"], split="1000,0,0", eval_interval=1000)
    (tmp_path / "dst_arch.yml").write_text(yaml.safe_dump(neox_config(data, dst, **base, train_iters=3)))
    opts = ExpandOptions(method=method, new_layer_init="zero_out" if method == "fpi" else "copy")
    rec = expand_checkpoint(root / "src", [root / "src.yml"], [tmp_path / "dst_arch.yml"], tmp_path / "exp", opts,
                            quiet=True, stage="neox-test")
    assert rec["source_iteration"] == 150
    cfg = neox_config(data, dst, **base, train_iters=3, load=str(tmp_path / "exp"), finetune=True)
    (tmp_path / "dst.yml").write_text(yaml.safe_dump(cfg))
    log = run_neox("train.py", tmp_path / "dst.yml", log=tmp_path / "dst.log")
    assert "Unable to load checkpoint" not in log
    losses = [loss for _, loss in parse_neox_losses(log)]
    batch = neox_batch(data["train"], "train", 0, B)
    expanded = reference_loss(tmp_path / "exp", dst, batch)
    source_loss = reference_loss(root / "src", src, batch)
    print(f"{method}: NeoX first losses {losses}, reference on expanded {expanded:.6f}, source {source_loss:.6f}, "
          f"ln V {math.log(512):.3f}")
    assert losses[0] == pytest.approx(expanded, abs=2e-5)
    check = check_stage_start(expanded, losses, 512)  # later steps stay near it (no master-weight trap)
    assert check.verdict == "expanded", check.message
    if method == "fpi":
        assert expanded == pytest.approx(source_loss, abs=1e-4)
