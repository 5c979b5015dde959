"""The NeoX patches: the exact applier on synthetic files (always), and on a copy of $NEOX_DIR (marked neox):
apply / check / revert with and without git, refusal of a tree they do not fit, the patched arguments and
end-of-text id, and the eval hook logging KL(previous || current) while real NeoX trains on CPU."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from neox_progressive import neox_patches as np_
from neox_progressive.cli import main
from neox_progressive.errors import UserError

PATCH = """\
header text is ignored
diff --git a/pkg/mod.py b/pkg/mod.py
--- a/pkg/mod.py
+++ b/pkg/mod.py
@@ -2,3 +2,4 @@ def f():
 a = 1
-b = 2
+b = 3
+c = 4
 d = 5
@@ -9,2 +10,2 @@ def g():
 x = 1
-y = 2
+y = 20
"""
ORIGINAL = "def f():\n a = 1\n b = 2\n d = 5\n\n\n\n\ndef g():\n x = 1\n y = 2\n".replace("\n ", "\n")


def test_exact_applier_apply_check_revert_offset_and_conflict(tmp_path):
    (tmp_path / "pkg").mkdir()
    target = tmp_path / "pkg" / "mod.py"
    (tmp_path / "p.patch").write_text(PATCH)
    patch = np_.parse_patch(tmp_path / "p.patch")
    assert [f.path for f in patch.files] == ["pkg/mod.py"] and len(patch.files[0].hunks) == 2
    target.write_text("# moved down by one line\n" + ORIGINAL)  # hunks found at an offset
    assert np_.state(tmp_path, patch)[0] == np_.NOT_APPLIED
    np_.change(tmp_path, patch, reverse=False)
    assert target.read_text() == "# moved down by one line\n" + ORIGINAL.replace("b = 2\n", "b = 3\nc = 4\n").replace(
        "y = 2\n", "y = 20\n")
    assert np_.state(tmp_path, patch)[0] == np_.APPLIED
    np_.change(tmp_path, patch, reverse=True)
    assert target.read_text() == "# moved down by one line\n" + ORIGINAL
    target.write_text(ORIGINAL.replace("b = 2", "b = 7"))
    st, detail = np_.state(tmp_path, patch)
    assert st == np_.CONFLICT and detail.startswith("pkg/mod.py: hunk 1")
    with pytest.raises(UserError, match="does not apply cleanly.*pkg/mod.py: hunk 1"):
        np_.change(tmp_path, patch, reverse=False)
    assert target.read_text() == ORIGINAL.replace("b = 2", "b = 7")  # untouched


def test_shipped_patches_parse_and_name_the_neox_commit():
    patches = np_.load_patches()
    assert [p.title for p in patches] == ["0001-eval-tasks-limit", "0002-eval-adapter-eot", "0003-eval-hook",
                                          "0004-wandb-group-exact"]
    touched = {f.path for p in patches for f in p.files}
    assert touched == {"eval_tasks/eval_adapter.py", "megatron/neox_arguments/neox_args.py", "megatron/training.py",
                       "megatron/neox_arguments/arguments.py"}
    readme = (np_.patches_dir() / "README.md").read_text()
    assert np_.NEOX_COMMIT in readme and all(p.title in readme for p in patches)


def test_not_a_neox_dir(tmp_path, capsys):
    assert main(["neox-patch", "--neox-dir", str(tmp_path)]) == 2
    assert "is not a GPT-NeoX checkout" in capsys.readouterr().err


# ---- with a real NeoX tree ----------------------------------------------------------------------------------
neox = pytest.mark.neox


@pytest.fixture
def neox_copy(tmp_path):
    from neox_run import neox_dir

    dst = tmp_path / "neox"
    shutil.copytree(neox_dir(), dst, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and ".git" not in p.parts}


@neox
def test_patches_apply_check_and_revert_cleanly(neox_copy, capsys):
    before = snapshot(neox_copy)
    assert main(["neox-patch", "--neox-dir", str(neox_copy), "--check"]) == 1
    assert "not applied" in capsys.readouterr().out
    assert main(["neox-patch", "--neox-dir", str(neox_copy), "--dry-run"]) == 0
    assert snapshot(neox_copy) == before
    capsys.readouterr()
    assert main(["neox-patch", "--neox-dir", str(neox_copy), "--dry-run", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and len(report["changes"]) == len(report["patches"]) >= 3
    assert {c["action"] for c in report["changes"]} == {"apply"} and snapshot(neox_copy) == before
    assert main(["neox-patch", "--neox-dir", str(neox_copy)]) == 0
    changed = {k for k, v in snapshot(neox_copy).items() if before.get(k) != v}
    assert changed == {"eval_tasks/eval_adapter.py", "megatron/neox_arguments/neox_args.py", "megatron/training.py",
                       "megatron/neox_arguments/arguments.py"}
    assert main(["neox-patch", "--neox-dir", str(neox_copy), "--check"]) == 0
    assert main(["neox-patch", "--neox-dir", str(neox_copy)]) == 0  # again: nothing to do
    assert "nothing to apply" in capsys.readouterr().out
    assert main(["neox-patch", "--neox-dir", str(neox_copy), "--revert"]) == 0
    assert snapshot(neox_copy) == before


@neox
def test_patches_with_git_apply_in_a_git_checkout(neox_copy):
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=neox_copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=neox_copy, check=True)
    subprocess.run([*git, "commit", "-qm", "neox"], cwd=neox_copy, check=True)
    assert np_.is_git_checkout(neox_copy)
    assert main(["neox-patch", "--neox-dir", str(neox_copy)]) == 0
    diff = subprocess.run(["git", "diff", "--stat"], cwd=neox_copy, capture_output=True, text=True).stdout
    assert "4 files changed" in diff
    assert main(["neox-patch", "--neox-dir", str(neox_copy), "--check"]) == 0
    assert main(["neox-patch", "--neox-dir", str(neox_copy), "--revert"]) == 0
    assert subprocess.run(["git", "diff", "--quiet"], cwd=neox_copy).returncode == 0


@neox
def test_a_tree_the_patches_do_not_fit_is_refused_untouched(neox_copy, capsys):
    adapter = neox_copy / "eval_tasks" / "eval_adapter.py"
    adapter.write_text(adapter.read_text().replace("limit=10,  # limit,", "limit=5,"))
    before = snapshot(neox_copy)
    assert main(["neox-patch", "--neox-dir", str(neox_copy)]) == 2
    err = capsys.readouterr().err
    assert "0001-eval-tasks-limit.patch: eval_tasks/eval_adapter.py: hunk 1" in err and "ea7aefd8" in err
    assert snapshot(neox_copy) == before


@neox
@pytest.mark.slow
def test_patched_arguments_and_end_of_text_id(neox_copy, tmp_path):
    """In NeoX's own python: the new keys parse (eval_tasks_limit null / int, eval_hook), and the eval adapter
    finds </s> for a Llama-style HF tokenizer (no <|endoftext|>) and for SentencePiece (eos id)."""
    from neox_run import neox_python, shim_dir

    assert main(["neox-patch", "--neox-dir", str(neox_copy)]) == 0
    script = tmp_path / "probe.py"
    script.write_text('''
import json, sys, types
from tokenizers import Tokenizer, models
from megatron.neox_arguments import NeoXArgs
base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "max_position_embeddings": 32,
        "global_num_gpus": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "train_micro_batch_size_per_gpu": 1}
out = {}
for limit in (None, 25):
    a = NeoXArgs.from_dict(dict(base, eval_tasks_limit=limit, eval_hook="m:f", eval_hook_args={"k": 1}))
    out[str(limit)] = [a.eval_tasks_limit, a.eval_hook, a.eval_hook_args]
out["default"] = NeoXArgs.from_dict(dict(base)).eval_tasks_limit
from eval_tasks.eval_adapter import end_of_text_id
hf = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
out["hf"] = end_of_text_id(types.SimpleNamespace(eod_id=hf.token_to_id("<|endoftext|>"), tokenizer=hf))
spm = types.SimpleNamespace(id_to_piece=lambda i: ["<unk>", "<s>", "</s>"][i], eos_id=lambda: 2)
out["spm"] = end_of_text_id(types.SimpleNamespace(eod_id=0, tokenizer=spm))  # piece_to_id gave <unk>
out["gpt2"] = end_of_text_id(types.SimpleNamespace(eod_id=50256, tokenizer=object()))
print("RESULT" + json.dumps(out))
''')
    env = {"PYTHONPATH": f"{shim_dir()}:{neox_copy}", "NEOX_CPU_SHIM": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([neox_python(), str(script)], cwd=neox_copy, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])
    assert out["None"] == [None, "m:f", {"k": 1}] and out["25"][0] == 25 and out["default"] == 10
    assert (out["hf"], out["spm"], out["gpt2"]) == (2, 2, 50256)


@neox
@pytest.mark.slow
def test_eval_hook_logs_kl_to_the_previous_member_while_neox_trains(neox_copy, tmp_path):
    from eval_util import bpe_tokenizer_for_neox, make_member, neox_preprocess, run_neox_with_plugin
    from neox_run import CPU_KEYS
    from tiny import tiny_shape

    from neox_progressive.eval.neox_hook import hook_config
    from neox_progressive.eval.tasks import stdlib_paragraphs
    from neox_progressive.io.reader import read_checkpoint
    from neox_progressive.model import Transformer

    assert main(["neox-patch", "--neox-dir", str(neox_copy)]) == 0
    tok = bpe_tokenizer_for_neox(tmp_path / "tok.json")
    prev = make_member(tmp_path, "prev", tok, seed=3, std=0.08)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": p}) + "\n" for p in stdlib_paragraphs()[:200]))
    data = neox_preprocess(neox_copy, docs, tok, tmp_path / "data")
    shape = tiny_shape(hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=6, ffn_size=64, padded_vocab_size=None,
                       make_vocab_size_divisible_by=64, seq_length=32, max_position_embeddings=32, pp=0)
    cfg = shape.to_neox() | CPU_KEYS | {
        "tokenizer_type": "HFTokenizer", "vocab_file": str(tok), "data_impl": "mmap",
        "train_data_paths": [str(data)], "valid_data_paths": [str(data)], "test_data_paths": [str(data)],
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": 4, "eval_interval": 2,
        "eval_iters": 1, "log_interval": 1, "optimizer": {"type": "lion", "params": {"lr": 1.0e-3}},
        "lr_decay_style": "constant", "warmup": 0.0, "save": str(tmp_path / "ck"), "checkpoint_factor": 2,
    }
    cfg |= hook_config(prev.checkpoint, prev.configs, num_sequences=3, log_file=tmp_path / "kl.jsonl")
    cfg["eval_hook_args"]["batch_size"] = 2
    (tmp_path / "train.yml").write_text(yaml.safe_dump(cfg))
    log = run_neox_with_plugin(neox_copy, "train.py", tmp_path / "train.yml")
    assert "validation results at iteration 2 |" in log and "kl_previous_member value:" in log
    rows = [json.loads(x) for x in (tmp_path / "kl.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows][:2] == [2, 4]  # each eval_interval (then the final val/test evaluations)

    # the logged value is App. F KL(p_prev || p_current) with the weights NeoX saved at that iteration
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok))
    stream = []
    for line in docs.read_text().splitlines():
        stream += t.encode(json.loads(line)["text"]).ids + [t.token_to_id("<|endoftext|>")]
    x = torch_tensor([stream[i * 32: i * 32 + 33] for i in range(3)])
    prev_model = Transformer.from_state_dict(*read_checkpoint(prev.checkpoint, prev.configs))
    for row in rows[:2]:
        cur = Transformer.from_state_dict(*read_checkpoint(tmp_path / "ck" / f"global_step{row['iteration']}",
                                                           [tmp_path / "train.yml"]))
        assert row["kl_previous_member"] == pytest.approx(dense_kl(prev_model, cur, x, t.get_vocab_size()), rel=1e-4)
    assert rows[0]["kl_previous_member"] != rows[1]["kl_previous_member"]  # it follows training


def torch_tensor(rows):
    import torch

    return torch.tensor(rows)


def dense_kl(p_model, q_model, x, vocab):
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(p_model(x[:, :-1])[..., :vocab].double(), -1)
        lq = torch.log_softmax(q_model(x[:, :-1])[..., :vocab].double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean(-1).mean().item()


@neox
def test_wandb_group_exact_keeps_the_configured_group(neox_copy, tmp_path):
    """deepy's argument parsing in NeoX's python: the group gets NeoX's random suffix unless
    wandb_group_exact (patch 0004) is set; the family's neox_exact_group writes that key."""
    from neox_run import neox_python, shim_dir

    assert main(["neox-patch", "--neox-dir", str(neox_copy)]) == 0
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "max_position_embeddings": 32,
            "global_num_gpus": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.001}},
            "train_micro_batch_size_per_gpu": 1, "use_wandb": True, "wandb_group": "tiny-progressive"}
    for name, extra in (("plain", {}), ("exact", {"wandb_group_exact": True})):
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump({**base, **extra}))
    script = tmp_path / "probe.py"
    script.write_text(f'''
import json, sys, types
ids = iter(["r1", "r2", "r3", "r4"])
wandb = types.ModuleType("wandb")  # NeoX's env needs no real wandb for the naming logic
wandb.util = types.SimpleNamespace(generate_id=lambda: next(ids))
wandb.sdk = types.SimpleNamespace(lib=types.SimpleNamespace(runid=types.SimpleNamespace(generate_id=lambda: next(ids))))
sys.modules["wandb"] = wandb
from megatron.neox_arguments import NeoXArgs
out = {{}}
for name in ("plain", "exact"):
    a = NeoXArgs.consume_deepy_args(input_args=["train.py", {str(tmp_path)!r} + f"/{{name}}.yml"])
    out[name] = a.wandb_group
print("RESULT" + json.dumps(out))
''')
    env = {"PYTHONPATH": f"{shim_dir()}:{neox_copy}", "NEOX_CPU_SHIM": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([neox_python(), str(script)], cwd=neox_copy, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[6:])
    assert out == {"plain": "tiny-progressive_r1_r2", "exact": "tiny-progressive"}
