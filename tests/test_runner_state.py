"""The runner's state file: a step is done only while its outputs are unchanged."""

from neox_progressive.runner.state import RunState, digest


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
