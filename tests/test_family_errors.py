"""Bad family files: each problem is one UserError line that names the key and says how to fix it."""

from __future__ import annotations

import pytest
from family_util import CONFIGS, changed, paper_family, write_family

from neox_progressive.errors import UserError
from neox_progressive.family import load_family, plan_family


def _error(tmp_path, data) -> str:
    with pytest.raises(UserError) as info:
        plan_family(load_family(write_family(tmp_path, data)))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_sizes_not_increasing(tmp_path):
    data = paper_family(params="computed")
    data["members"][1], data["members"][2] = data["members"][2], data["members"][1]
    msg = _error(tmp_path, data)
    assert "hidden_size 2560 < 3200" in msg and "smallest first" in msg
    nominal = changed(paper_family(), **{"members.3.nominal_params": 3.0e9})
    msg = _error(tmp_path, nominal)
    assert "members must grow" in msg and "8B" in msg


def test_eq4_budget_not_positive(tmp_path):
    data = changed(paper_family(), budget={"params": "nominal"})
    for m, tokens in zip(data["members"], (100e9, 40e9, 160e9, 320e9)):
        m["scratch_tokens"] = int(tokens)
    msg = _error(tmp_path, data)
    assert "2B" in msg and "<= 0" in msg


def test_heads_must_divide_hidden(tmp_path):
    msg = _error(tmp_path, changed(paper_family(), **{"members.2.num_heads": 24}))
    assert "members[2]" in msg and "3200" in msg and "24" in msg


def test_ffn_width_neox_cannot_build(tmp_path):
    msg = _error(tmp_path, changed(paper_family(), **{"model.mlp_multiple_of": 256}))
    assert "11200" in msg and "mlp_multiple_of" in msg and "64" in msg


@pytest.mark.parametrize("where, key, suggestion", [
    ("", "tokens_per_parm", None),
    ("budget", "tokens_per_parm", "tokens_per_param"),
    ("members.0", "hiden_size", "hidden_size"),
    ("training.lr", "warmpu", "warmup"),
    ("model", "seq_len", "seq_length"),
    ("expansion", "metod", "method"),
    ("eval", "taks", "tasks"),
    ("wandb", "grup", "group"),
    ("data.prepare", "vocab_sise", "vocab_size"),
])
def test_unknown_keys_did_you_mean(tmp_path, where, key, suggestion):
    data = paper_family()
    node = data
    for part in where.split(".") if where else []:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[key] = 1
    msg = _error(tmp_path, data)
    assert ("unknown key" in msg or "unknown expansion option" in msg) and key in msg
    if suggestion:
        assert f"did you mean {suggestion!r}" in msg


def test_shared_block_checked(tmp_path):
    assert "did you mean 'tokenizer_type'" in _error(tmp_path, changed(paper_family(), shared={"tokenizer_typ": "x"}))
    msg = _error(tmp_path, changed(paper_family(), shared={"train_iters": 5}))
    assert "shared.train_iters" in msg and "budget" in msg
    assert "hidden_size" in _error(tmp_path, changed(paper_family(), shared={"hidden_size": 5}))
    assert "integer" in _error(tmp_path, changed(paper_family(), shared={"checkpoint_num_layers": 2.5}))


@pytest.mark.parametrize("change, words", [
    ({"budget": {}}, ["tokens_per_param", "scratch_tokens"]),
    ({"training.lr": {"rule": "size_scaled", "smallest": 1.0e-3}}, ["largest"]),
    ({"training.lr": {"rule": "fixed", "max": 1.0e-3, "smallest": 1.0e-3}}, ["smallest", "not used"]),
    ({"training.lr": {"rule": "fixed", "max": 1.0e-3, "warmup": 1.5}}, ["warmup"]),
    ({"training.lr": {"rule": "fixed", "max": 1.0e-3, "warmup": 1.0e-5}}, ["warmup", "< 1"]),
    ({"training.micro_batch": 7}, ["global_batch", "micro_batch 7"]),
    ({"training.num_gpus": "many"}, ["training.num_gpus", "integer"]),
    ({"mode": "progresive"}, ["did you mean 'progressive'"]),
    ({"budget.params": "nominal", "members.1.nominal_params": None}, ["nominal_params", "2B"]),
    ({"members.0.name": "1B/x"}, ["members[0].name"]),
    ({"members.1.name": "1B"}, ["unique"]),
    ({"budget.keep": "update"}, ["budget.keep", "'batch', 'updates'", "did you mean 'updates'"]),
    ({"budget.fixed_data_order": "epochs"}, ["budget.fixed_data_order", "fixed_data: true"]),
    ({"budget.fixed_data": True, "budget.fixed_data_order": "mixed"}, ["fixed_data_order", "'epochs', 'shuffled'"]),
    ({"training.lr": {"rule": "fixed", "max": 1.0e-3, "by": "stage"}}, ["training.lr.by", "size_scaled"]),
    ({"training.lr": {"rule": "size_scaled", "smallest": 1.0e-3, "largest": 5.0e-4, "by": "index"}},
     ["training.lr.by", "'params', 'stage'"]),
])
def test_bad_values(tmp_path, change, words):
    msg = _error(tmp_path, changed(paper_family(), **change))
    for w in words:
        assert w in msg, msg


def test_epoch_order_refuses_keys_that_change_neox_index_maps(tmp_path):
    """The fixed-data epoch order works through NeoX's cached index maps of a packed dataset: shared keys that make
    NeoX build or name them otherwise are refused when the stages are generated, naming the key and the way out."""
    from neox_progressive.family import generate_configs

    for key, value in (("pack_impl", "unpacked"), ("weight_by_num_documents", True)):
        data = changed(paper_family(), **{"budget.fixed_data": True}, shared={key: value})
        fam = load_family(write_family(tmp_path, data))
        with pytest.raises(UserError, match=f"shared.{key} .*fixed_data_order: shuffled"):
            generate_configs(fam, tmp_path / "cfg", plot=False)
        assert not (tmp_path / "cfg").exists()
        data["budget"]["fixed_data_order"] = "shuffled"
        generate_configs(load_family(write_family(tmp_path, data)), tmp_path / "ok", plot=False)


def test_missing_blocks_and_bad_yaml(tmp_path):
    data = paper_family()
    del data["training"]
    assert "training" in _error(tmp_path, data)
    (tmp_path / "bad.yml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_family(tmp_path / "bad.yml")
    with pytest.raises(UserError, match="does not exist"):
        load_family(tmp_path / "missing.yml")


def test_generate_configs_refuses_a_pair_the_expansion_cannot_grow(tmp_path):
    """head_dim 8 (m) -> 4 (l): caught when the progressive configs are generated, before anything trains."""
    from neox_progressive.family import generate_configs, load_family

    fam = load_family(CONFIGS / "tiny_family.yml", {"members": [
        {"name": "s", "hidden_size": 32, "ffn_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "global_batch": 8},
        {"name": "l", "hidden_size": 64, "ffn_size": 128, "num_layers": 4, "num_heads": 16, "num_kv_heads": 8,
         "global_batch": 16}]})
    with pytest.raises(UserError, match="member l cannot be expanded from s: .*head_dim"):
        generate_configs(fam, tmp_path / "cfg", "progressive", plot=False)
    assert not (tmp_path / "cfg").exists()
    generate_configs(fam, tmp_path / "ind", "independent", plot=False)  # from scratch: no expansion, fine
