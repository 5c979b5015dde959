"""NeoX checkpoint reading/writing: on-disk layouts, round trips, bad input, safety, atomicity."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tiny import random_sd, tiny_shape

from neox_progressive import arch
from neox_progressive.errors import UserError
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.safe import load_pt
from neox_progressive.io.writer import CheckpointWriter, write_checkpoint


def labelled_layer(shape):
    """Logical tensors whose every row says where it came from (row r of q -> 1000 + r, ...)."""
    h, f, d = shape.hidden_size, shape.ffn_size, shape.head_dim
    def rows(base, n, cols):
        return (base + torch.arange(n, dtype=torch.float32))[:, None].expand(n, cols).clone()
    return {
        "attn_norm.weight": torch.arange(h, dtype=torch.float32),
        "attn.q.weight": rows(1000, shape.num_heads * d, h),
        "attn.k.weight": rows(2000, shape.num_kv_heads * d, h),
        "attn.v.weight": rows(3000, shape.num_kv_heads * d, h),
        "attn.o.weight": torch.arange(shape.num_heads * d, dtype=torch.float32)[None].expand(h, -1).clone(),
        "mlp_norm.weight": -torch.arange(h, dtype=torch.float32),
        "mlp.gate.weight": rows(5000, f, h),
        "mlp.up.weight": rows(6000, f, h),
        "mlp.down.weight": torch.arange(f, dtype=torch.float32)[None].expand(h, -1).clone(),
    }


def expected_qkv_rows(shape, rank):
    """NEOX_FACTS 2/3, written out: row labels of one TP rank's query_key_value."""
    d, tp = shape.head_dim, shape.tp
    np_, kvp = shape.num_heads // tp, shape.num_kv_heads // tp
    if not shape.gqa:  # per head interleaved: head j -> q_j, k_j, v_j
        out = []
        for head in range(rank * np_, (rank + 1) * np_):
            for base in (1000, 2000, 3000):
                out += [base + head * d + j for j in range(d)]
        return out
    q = [1000 + r for r in range(rank * np_ * d, (rank + 1) * np_ * d)]
    k = [2000 + r for r in range(rank * kvp * d, (rank + 1) * kvp * d)]
    v = [3000 + r for r in range(rank * kvp * d, (rank + 1) * kvp * d)]
    return q + k + v


@pytest.mark.parametrize("kv", [4, 2])
def test_tp2_files_have_neox_layouts(tmp_path, kv):
    shape = tiny_shape(num_kv_heads=kv, tp=2)
    sd = random_sd(shape)
    layer = labelled_layer(shape)
    sd.update({f"layers.0.{k}": v for k, v in layer.items()})
    write_checkpoint(tmp_path / "ck", shape, sd)
    f = shape.ffn_size // 2
    for r in range(2):
        disk = load_pt(tmp_path / "ck" / "global_step0" / arch.layer_file_name(2, r))
        assert disk[arch.QKV_WEIGHT][:, 0].tolist() == expected_qkv_rows(shape, r)
        up_gate = disk[arch.LINEAR1_WEIGHT][:, 0].tolist()
        assert up_gate == [6000 + r * f + j for j in range(f)] + [5000 + r * f + j for j in range(f)]
        # row parallel: columns of this rank's heads / FFN slice
        assert disk[arch.DENSE_WEIGHT][0].tolist() == list(range(r * 16, (r + 1) * 16))
        assert disk[arch.LINEAR2_WEIGHT][0].tolist() == list(range(r * f, (r + 1) * f))
        assert torch.equal(disk["input_layernorm.scale"], layer["attn_norm.weight"])
        emb = load_pt(tmp_path / "ck" / "global_step0" / arch.layer_file_name(0, r))[arch.EMBED_KEY]
        assert torch.equal(emb, sd["embed.weight"][r * 32:(r + 1) * 32])
        assert set(disk) == set(arch.neox_layer_shapes(shape))  # no inv_freq, no biases


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 0])
@pytest.mark.parametrize("kv,bias", [(4, False), (2, True)])
def test_round_trip_is_bit_identical(tmp_path, tp, pp, kv, bias):
    shape = tiny_shape(tp=tp, pp=pp, num_kv_heads=kv if kv % tp == 0 else tp, attn_bias=bias, mlp_bias=bias)
    sd = random_sd(shape, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "ck", shape, sd)
    reader = CheckpointReader(tmp_path / "ck", shape.replace(padded_vocab_size=None))
    assert reader.format == ("sequential" if pp == 0 else "pipeline") and reader.tp == tp
    back = reader.state_dict()
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == torch.bfloat16
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("pp,tp,n_mp", [(1, 2, 2), (2, 2, 4), (0, 2, 2), (1, 1, 1)])
def test_mp_rank_files_are_what_neox_finetune_loads(tmp_path, pp, tp, n_mp):
    shape = tiny_shape(tp=tp, pp=pp)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    assert (tmp_path / "ck" / "latest").read_text() == "global_step0"
    tag = tmp_path / "ck" / "global_step0"
    mp = sorted(p.name for p in tag.glob("mp_rank_*"))
    assert mp == [f"mp_rank_{i:02d}_model_states.pt" for i in range(n_mp)]
    for name in mp:
        state = load_pt(tag / name)
        assert state["mp_world_size"] == n_mp and state["dp_world_size"] == 1
        assert state["iteration"] == 0 and "args" not in state
        if pp == 0:
            assert all(k.startswith("sequential.") for k in state["module"])
        else:
            assert state["module"] is None
    layer_files = sorted(p.name for p in tag.glob("layer_*"))
    assert len(layer_files) == (0 if pp == 0 else (shape.num_layers + 3) * tp)


def test_layer_file_names_get_three_digits_from_100():
    assert arch.layer_file_name(7, 0) == "layer_07-model_00-model_states.pt"
    assert arch.layer_file_name(103, 1) == "layer_103-model_01-model_states.pt"


def test_reader_reads_one_layer_file_at_a_time(tmp_path, monkeypatch):
    shape = tiny_shape(num_layers=4, tp=2)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    reader = CheckpointReader(tmp_path / "ck", shape)
    opened = []
    import neox_progressive.io.reader as mod
    monkeypatch.setattr(mod, "load_state_dict", lambda p: opened.append(p.name) or load_pt(p))
    reader.layer(2)
    assert opened == [arch.layer_file_name(4, 0), arch.layer_file_name(4, 1)]


# ---- bad input: one-line errors, nothing written ------------------------------------------------
@pytest.fixture
def ckpt(tmp_path):
    shape = tiny_shape(tp=2)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    return shape, tmp_path / "ck"


def one_line_error(fn, match):
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_missing_latest_and_missing_dir(ckpt, tmp_path):
    shape, ck = ckpt
    (ck / "latest").unlink()
    one_line_error(lambda: CheckpointReader(ck, shape), "no `latest`.*global_step0")
    one_line_error(lambda: CheckpointReader(tmp_path / "nope", shape), "does not exist")
    assert CheckpointReader(ck / "global_step0", shape).tag == "global_step0"  # a tag dir works


def test_latest_naming_a_missing_tag(ckpt):
    shape, ck = ckpt
    (ck / "latest").write_text("global_step9")
    one_line_error(lambda: CheckpointReader(ck, shape), "global_step9")


def test_missing_and_truncated_layer_files(ckpt):
    shape, ck = ckpt
    f = ck / "global_step0" / arch.layer_file_name(3, 1)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    one_line_error(lambda: CheckpointReader(ck, shape).layer(1), "truncated|damaged")
    f.unlink()
    one_line_error(lambda: CheckpointReader(ck, shape), arch.layer_file_name(3, 1))


def test_config_that_disagrees_with_the_checkpoint(ckpt):
    shape, ck = ckpt
    one_line_error(lambda: CheckpointReader(ck, shape.replace(num_layers=3)), "num_layers=3")
    one_line_error(lambda: CheckpointReader(ck, shape.replace(tp=1)), "TP=2")
    one_line_error(lambda: CheckpointReader(ck, shape.replace(hidden_size=48, num_heads=4)).layer(0), "shape")
    one_line_error(lambda: CheckpointReader(ck, shape.replace(num_kv_heads=2)).layer(0), "query_key_value")
    one_line_error(lambda: CheckpointReader(ck, shape.replace(mlp_bias=True)).layer(0), "missing")
    one_line_error(lambda: CheckpointReader(ck, shape.replace(padded_vocab_size=128)), "vocab rows")


def test_mp_rank_count_that_disagrees(ckpt):
    shape, ck = ckpt
    (ck / "global_step0" / "mp_rank_01_model_states.pt").unlink()
    one_line_error(lambda: CheckpointReader(ck, shape), "mp_world_size=2.*1 mp_rank")


def test_unknown_format(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"0")
    one_line_error(lambda: CheckpointReader(tmp_path / "x"), "not a NeoX checkpoint")


def test_destination_exists_is_refused_and_force_replaces(ckpt):
    shape, ck = ckpt
    before = (ck / "global_step0" / "mp_rank_00_model_states.pt").stat().st_mtime_ns
    one_line_error(lambda: write_checkpoint(ck, shape, random_sd(shape, seed=1)), "already exists.*--force")
    assert (ck / "global_step0" / "mp_rank_00_model_states.pt").stat().st_mtime_ns == before
    write_checkpoint(ck, shape, random_sd(shape, seed=1), force=True)
    assert torch.equal(CheckpointReader(ck, shape).embed(), random_sd(shape, seed=1)["embed.weight"])
    assert [p.name for p in ck.parent.iterdir()] == ["ck"]  # no temporary leftovers


def test_failure_while_writing_leaves_nothing(tmp_path):
    shape = tiny_shape()
    with pytest.raises(RuntimeError, match="incomplete"):
        with CheckpointWriter(tmp_path / "ck", shape) as w:
            w.write_embed(random_sd(shape)["embed.weight"])
    assert list(tmp_path.iterdir()) == []


# ---- safety ---------------------------------------------------------------------------------------
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["layer", "mp_rank"])
def test_a_pickle_that_runs_code_is_refused_and_does_not_run(ckpt, tmp_path, where):
    shape, ck = ckpt
    marker = tmp_path / "pwned"
    name = arch.layer_file_name(0, 0) if where == "layer" else "mp_rank_00_model_states.pt"
    torch.save({"word_embeddings.weight": torch.zeros(32, 32), "module": None, "x": Payload(marker)},
               ck / "global_step0" / name)
    with pytest.raises(UserError, match="posix.system|refus"):
        CheckpointReader(ck, shape).embed()
    assert not marker.exists()


def test_numpy_rng_state_in_mp_rank_is_read_without_numpy_code(ckpt):
    import numpy as np
    shape, ck = ckpt
    path = ck / "global_step0" / "mp_rank_00_model_states.pt"
    state = load_pt(path)
    state.update(np_rng_state=np.random.get_state(), iteration=7)
    torch.save(dict(state), path)
    reader = CheckpointReader(ck, shape)
    assert reader.iteration == 7 and reader.meta["mp_world_size"] == 2


# ---- a crash leaves no checkpoint-looking directory -----------------------------------------------
def test_killed_writer_leaves_no_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from tiny import random_sd, tiny_shape
        from neox_progressive.io.writer import CheckpointWriter
        shape = tiny_shape(num_layers=6)
        sd = random_sd(shape)
        with CheckpointWriter({str(tmp_path / 'ck')!r}, shape) as w:
            w.write_embed(sd['embed.weight'])
            for i in range(6):
                w.write_layer(i, {{k.split('.', 2)[2]: v for k, v in sd.items() if k.startswith(f'layers.{{i}}.')}})
                print('layer', i, flush=True)
                time.sleep(0.5)
            w.write_final_norm(sd['final_norm.weight']); w.write_head(sd['head.weight'])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("layer 2"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ck").exists()
    assert not list(tmp_path.rglob("latest"))
    time.sleep(0.1)
    shape = tiny_shape(num_layers=6)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))  # the next run cleans the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
