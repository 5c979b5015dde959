"""The `expand` verb: --dry-run of the paper's family shapes, one-line errors that write nothing, kill mid-write."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from expand_util import shape, wider, write_source
from tiny import write_yaml

from neox_progressive.cli import main
from neox_progressive.config import neox_intermediate_size
from neox_progressive.errors import UserError
from neox_progressive.expand import ExpandOptions

ROOT = Path(__file__).resolve().parents[1]
# Yano et al. 2025, App. A: hidden, FFN, layers, heads of the 1B, 2B, 4B, 8B members
FAMILY = {"1B": (2048, 7168, 18, 16), "2B": (2560, 8960, 22, 20), "4B": (3200, 11200, 27, 25), "8B": (4096, 14336, 33, 32)}
GPT2_VOCAB = 50257


def family_yaml(tmp: Path, name: str, vocab: Path) -> Path:
    h, f, layers, heads = FAMILY[name]
    cfg = {"pipe-parallel-size": 1, "model-parallel-size": 1, "num_layers": layers, "hidden_size": h,
           "num_attention_heads": heads, "intermediate_size": neox_intermediate_size(f, 64), "mlp_multiple_of": 64,
           "seq_length": 2048, "max_position_embeddings": 2048, "pos_emb": "rotary", "norm": "rmsnorm",
           "rms_norm_epsilon": 1e-5, "activation": "swiglu", "no_weight_tying": True, "use_bias_in_attn_linear": False,
           "use_bias_in_mlp": False, "make_vocab_size_divisible_by": 128, "tokenizer_type": "GPT2BPETokenizer",
           "vocab_file": str(vocab), "bf16": {"enabled": True}}
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def params(h, f, layers, v=50304):
    """App. A shapes, counted here from scratch: MHA attention 4h^2, SwiGLU 3hF, two norms, final norm, E and head."""
    return layers * (4 * h * h + 3 * h * f + 2 * h) + h + 2 * v * h


def test_dry_run_of_the_paper_family(tmp_path, capsys):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({f"t{i}": i for i in range(GPT2_VOCAB)}))
    names = list(FAMILY)
    tracemalloc.start()
    for a, b in zip(names, names[1:]):
        argv = ["expand", "--src", str(tmp_path / f"{a}_ckpt"), "--src-config", str(family_yaml(tmp_path, a, vocab)),
                "--dst-config", str(family_yaml(tmp_path, b, vocab)), "--out", str(tmp_path / f"{b}_expanded"),
                "--dry-run", "--format", "json", "--stage", b]
        assert main(argv) == 0
        plan = json.loads(capsys.readouterr().out)
        h, f, layers, heads = FAMILY[b]
        t = plan["target"]
        assert (t["hidden_size"], t["ffn_size"], t["num_layers"], t["num_heads"], t["padded_vocab_size"]) == \
            (h, f, layers, heads, 50304)
        assert t["hidden_size"] // t["num_heads"] == 128 == plan["source"]["hidden_size"] // plan["source"]["num_heads"]
        assert plan["target_params"] == params(h, f, layers)
        assert plan["target_bytes"] == 2 * params(h, f, layers)  # bf16
        assert plan["largest_layer_file_bytes"] == 2 * (4 * h * h + 3 * h * f + 2 * h)
        assert len(plan["depth_order"]) == layers
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20, peak  # no weights (the 8B target alone is 16 GB)
    assert not any(p.name.endswith("_expanded") for p in tmp_path.iterdir())


def test_dry_run_text_names_options(tmp_path, capsys):
    src = shape()
    src_dir, src_yml, _ = write_source(tmp_path, src)
    dst_yml = write_yaml(tmp_path / "dst.yml", wider(src, 5, ffn=60))
    assert main(["expand", "--src", str(src_dir), "--src-config", str(src_yml), "--dst-config", str(dst_yml),
                 "--out", str(tmp_path / "o"), "--dry-run", "--method", "fpi"]) == 0
    text = capsys.readouterr().out
    assert "rms_comp=exact" in text and "depth order: [0, 1]" in text and not (tmp_path / "o").exists()


def _err(tmp_path, capsys, src, dst, extra=(), dst_extra=None, out="o"):
    if not (tmp_path / "src").exists():
        write_source(tmp_path, src)
    src_dir, src_yml = tmp_path / "src", tmp_path / "src.yml"
    dst_yml = write_yaml(tmp_path / "dst.yml", dst, **(dst_extra or {}))
    code = main(["expand", "--src", str(src_dir), "--src-config", str(src_yml), "--dst-config", str(dst_yml),
                 "--out", str(tmp_path / out), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


BAD = {
    "smaller": (lambda s: s.replace(hidden_size=24, num_heads=3, num_kv_heads=3, padded_vocab_size=None), {},
                "hidden_size: the target's 24 is smaller than the source's 32"),
    "fewer_layers": (lambda s: s.replace(num_layers=1, padded_vocab_size=None), {}, "num_layers: the target's 1"),
    "head_dim": (lambda s: s.replace(hidden_size=48, padded_vocab_size=None), {}, "head_dim: source 32/4 = 8"),
    "bias": (lambda s: wider(s, 5, attn_bias=True), {}, "use_bias_in_attn_linear: source False, target True"),
    "rotary": (lambda s: wider(s, 5, rotary_pct=0.5), {}, "rotary_pct: source 1.0, target 0.5"),
    "norm": (lambda s: wider(s, 5), {"norm": "layernorm"}, "config key norm: 'layernorm' is not supported"),
    "gqa": (lambda s: wider(s.replace(num_kv_heads=2), 6, 6), {}, "use num_kv_heads in [2, 3]"),
    "tp_heads": (lambda s: wider(s, 5), {"model_parallel_size": 2}, "model_parallel_size 2 must divide num_attention_heads 5"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, capsys, case):
    make, extra_keys, msg = BAD[case]
    src = shape(num_kv_heads=2) if case == "gqa" else shape()
    code, err = _err(tmp_path, capsys, src, make(src), dst_extra=extra_keys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert msg in err, err
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o")]


def test_other_bad_inputs(tmp_path, capsys):
    src = shape()
    (tmp_path / "o").mkdir()
    code, err = _err(tmp_path, capsys, src, wider(src, 5))
    assert code == 2 and "already exists" in err and "--force" in err and not any((tmp_path / "o").iterdir())
    code, err = _err(tmp_path, capsys, src, wider(src, 5), out="o2", extra=["--src-config", str(tmp_path / "nope.yml")])
    assert code == 2 and "nope.yml" in err and not (tmp_path / "o2").exists()
    dst_yml = write_yaml(tmp_path / "d.yml", wider(src, 5))
    code = main(["expand", "--src", str(tmp_path / "missing"), "--src-config", str(tmp_path / "src.yml"),
                 "--dst-config", str(dst_yml), "--out", str(tmp_path / "o3")])
    assert code == 2 and "does not exist" in capsys.readouterr().err and not (tmp_path / "o3").exists()
    wrong = write_yaml(tmp_path / "wrong.yml", src.replace(num_layers=3))
    code = main(["expand", "--src", str(tmp_path / "src"), "--src-config", str(wrong), "--dst-config", str(dst_yml),
                 "--out", str(tmp_path / "o4")])
    assert code == 2 and "num_layers=3" in capsys.readouterr().err and not (tmp_path / "o4").exists()
    with pytest.raises(UserError, match="did you mean 'depth_rule'"):
        ExpandOptions.from_dict({"depth_rul": "b2b"})
    with pytest.raises(UserError, match="method: 'akl' is not one of aki, fpi"):
        ExpandOptions.from_dict({"method": "akl"})


def test_vocab_mismatch(tmp_path, capsys):
    for n, size in (("a", 60), ("b", 61)):
        (tmp_path / f"{n}.json").write_text(json.dumps({f"t{i}": i for i in range(size)}))
    src = shape()
    src_dir, _, _ = write_source(tmp_path, src)
    sy = write_yaml(tmp_path / "s.yml", src, tokenizer_type="GPT2BPETokenizer", vocab_file=str(tmp_path / "a.json"))
    dy = write_yaml(tmp_path / "d.yml", wider(src, 5), tokenizer_type="GPT2BPETokenizer", vocab_file=str(tmp_path / "b.json"))
    code = main(["expand", "--src", str(src_dir), "--src-config", str(sy), "--dst-config", str(dy), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "60 tokens but the target's has 61" in err and not (tmp_path / "o").exists()


def test_kill_mid_write_leaves_no_checkpoint(tmp_path):
    src = shape(hidden_size=384, num_heads=12, num_kv_heads=12, ffn_size=1024, num_layers=4)
    src_dir, src_yml, _ = write_source(tmp_path, src, std=0.02)
    dst_yml = write_yaml(tmp_path / "dst.yml", wider(src, 24, ffn=2048, num_layers=12))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools" / "expand_neox_ckpt.py"), "--src", str(src_dir), "--src-config", str(src_yml),
           "--dst-config", str(dst_yml), "--out", str(tmp_path / "big"), "--quiet"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if list(tmp_path.glob(".big*/global_step0/layer_0[3-9]*")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "finished before it could be killed; make the model bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "big").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".big")]
    assert leftovers and not any((p / "latest").exists() for p in leftovers)
    # the next run removes the dead run's leftovers and succeeds
    assert subprocess.run(cmd, env=env).returncode == 0
    assert (tmp_path / "big" / "latest").read_text() == "global_step0"
    rec = json.loads((tmp_path / "big" / "expansion.json").read_text())
    assert "expand_neox_ckpt.py --src" in rec["command_line"] and rec["target"]["num_layers"] == 12
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".big")]


def test_help_and_thin_script(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "expand_neox_ckpt.py"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0
    for text in ("--method", "--depth-rule", "--new-layer-init", "--rms-comp", "--map-sampling", "--gqa-layout",
                 "--aki-second", "--aki-hidden", "--dry-run", "bert2BERT Algorithm 1", "none for aki, exact for fpi"):
        assert text in " ".join(out.stdout.split()), text


def test_manifest_inside_out(tmp_path, capsys):
    import hashlib

    import numpy as np

    src = shape()
    src_dir, src_yml, _ = write_source(tmp_path, src)
    dst_yml = write_yaml(tmp_path / "dst.yml", wider(src, 5, ffn=60, num_layers=3))
    assert main(["expand", "--src", str(src_dir), "--src-config", str(src_yml), "--dst-config", str(dst_yml),
                 "--out", str(tmp_path / "o"), "--quiet", "--seed", "4", "--stage", "s2"]) == 0
    rec = json.loads((tmp_path / "o" / "expansion.json").read_text())
    files = sorted((src_dir / "global_step0").glob("*.pt"))
    assert rec["source_sha256"] == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert rec["options"]["seed"] == 4 and rec["stage"] == "s2" and rec["options"]["rms_comp"] == "none"
    assert rec["source"]["hidden_size"] == 32 and rec["target"]["num_layers"] == 3 and rec["depth_order"] == [0, 1, 1]
    assert rec["plugin_version"] and rec["command_line"]  # sys.argv: pytest's here; see the kill test for a real one
    npz = (tmp_path / "o" / rec["maps_file"]).read_bytes()
    assert hashlib.sha256(npz).hexdigest() == rec["maps_sha256"]
    with np.load(tmp_path / "o" / rec["maps_file"]) as z:
        assert z["hidden"].shape == (40,) and z["layer1.ffn"].shape == (60,)
    assert (tmp_path / "o" / "latest").read_text() == "global_step0"
