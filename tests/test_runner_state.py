"""The runner's state file: a step is done only while its outputs are unchanged."""

from neox_progressive.runner.state import RunState, config_digest, digest, inputs_match, raw_digest


def test_digest_depends_on_names_and_contents_not_times(tmp_path):
    d = tmp_path / "ck"
    (d / "sub").mkdir(parents=True)
    (d / "a.pt").write_bytes(b"abc")
    (d / "sub" / "b.pt").write_bytes(b"xyz")
    first = digest(d)
    (d / "a.pt").touch()
    assert digest(d) == first
    (d / ".ck.tmp-1").mkdir()  # hidden temporaries do not count
    assert digest(d) == first
    (d / "sub" / "b.pt").write_bytes(b"xyZ")
    assert digest(d) != first
    (d / "sub" / "b.pt").write_bytes(b"xyz")
    (d / "sub" / "b.pt").rename(d / "sub" / "c.pt")
    assert digest(d) != first
    assert digest(tmp_path / "missing") is None


def test_steps_are_redone_when_outputs_change_or_vanish(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"1")
    state = RunState(tmp_path / "state.json")
    assert not state.done("1B/train")
    state.record("1B/train", [out], {"loss": 2.5})
    again = RunState(tmp_path / "state.json")  # survives a restart
    assert again.done("1B/train") and again.info("1B/train") == {"loss": 2.5}
    out.write_bytes(b"2")
    assert not again.done("1B/train")
    out.unlink()
    assert not again.done("1B/train")
    again.forget("1B/train")
    assert "1B/train" not in RunState(tmp_path / "state.json").steps
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_save_dir_is_digested_as_its_latest_checkpoint(tmp_path):
    """A NeoX save dir counts by `latest` and the model files of the tag it names: earlier checkpoints and optimizer
    states do not change it (and are not re-read); the final model files and `latest` do."""
    save = tmp_path / "ck"
    for step in (10, 20):
        (save / f"global_step{step}").mkdir(parents=True)
        (save / f"global_step{step}" / "layer_02-model_00-model_states.pt").write_bytes(b"w%d" % step)
        (save / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"m%d" % step)
    (save / "latest").write_text("global_step20")
    first = digest(save)
    (save / "global_step10" / "layer_02-model_00-model_states.pt").write_bytes(b"changed")
    (save / "global_step20" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer")
    assert digest(save) == first
    (save / "global_step20" / "layer_02-model_00-model_states.pt").write_bytes(b"changed")
    assert digest(save) != first
    (save / "global_step20" / "layer_02-model_00-model_states.pt").write_bytes(b"w20")
    assert digest(save) == first
    (save / "latest").write_text("global_step10")
    assert digest(save) != first


def test_a_config_is_digested_by_its_values_not_its_comments(tmp_path):
    text = "# generated from a.yml\nhidden_size: 64\nnum_layers: 2\n"
    same = "# generated from b.yml (renamed)\nnum_layers: 2   # reordered\nhidden_size:   64\n"
    assert config_digest(text) == config_digest(same) is not None
    assert config_digest(text) != config_digest(text.replace("64", "65"))
    assert config_digest(None) is None
    f = tmp_path / "stage.yml"
    f.write_text(text)
    assert raw_digest(f.name, text) == digest(f)  # what earlier versions recorded


def test_inputs_recorded_by_earlier_versions_still_match_while_the_file_is_unchanged():
    text = "# header\nhidden_size: 64\n"
    now = {"config": config_digest(text), "init": "scratch"}
    old = {"config": raw_digest("stage_s.yml", text), "init": "scratch"}  # a record from before config_digest
    assert inputs_match(old, now, {"config": raw_digest("stage_s.yml", text)})
    changed = "# header\nhidden_size: 65\n"
    assert not inputs_match(old, {"config": config_digest(changed), "init": "scratch"},
                            {"config": raw_digest("stage_s.yml", changed)})
    assert not inputs_match({**old, "init": "other"}, now, {"config": raw_digest("stage_s.yml", text)})
    assert not inputs_match(None, now, {})
