"""The safe loader on both of its paths: torch's scan (torch >= 2.5) and the restricted unpickler that older
torch builds (GPT-NeoX's containers: 2.3, 2.7 pre-releases) use. The second path is forced here by hiding
`get_unsafe_globals_in_checkpoint`, so CI's current torch tests it too.

Both must read what DeepSpeed and GPT-NeoX really write (checked against each other and against torch's own
unpickler), and both must refuse a pickle that would run code without running it."""

import ast
import builtins
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import random_sd, tiny_shape

from neox_progressive import arch
from neox_progressive.errors import UserError
from neox_progressive.io import safe
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint

HAVE_SCAN = hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")


@pytest.fixture(params=["torch_scan", "restricted"])
def path_kind(request, monkeypatch):
    if request.param == "restricted":
        monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    elif not HAVE_SCAN:
        pytest.skip(f"torch {torch.__version__} has no get_unsafe_globals_in_checkpoint (the restricted path covers it)")
    assert safe.use_torch_scan() == (request.param == "torch_scan")
    return request.param


def load_both(path: Path, monkeypatch):
    """(torch scan, restricted unpickler) results of one file."""
    first = safe.load_pt(path) if HAVE_SCAN else None
    with monkeypatch.context() as m:
        m.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
        second = safe.load_pt(path)
    return first, second


def same(a, b, where="") -> None:
    """Equal data: tensors (values, dtype, shape), containers, and stand-ins (by name, arguments and state)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, type) and issubclass(a, safe.Opaque):  # a stand-in class given as an argument
        assert isinstance(b, type) and issubclass(b, safe.Opaque) and a.__name__ == b.__name__, where
    elif isinstance(a, safe.Opaque):
        assert isinstance(b, safe.Opaque) and type(a).__name__ == type(b).__name__, where
        same(a.args, b.args, where + ".args")
        same(a.state, b.state, where + ".state")
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, where


# ---- refusal ------------------------------------------------------------------------------------------
class Payload:
    """Runs `fn(*args)` when unpickled by an unrestricted unpickler."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path):
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.getattr": Payload(builtins.getattr, "", "join"),        # the first step of reaching os.system
        "torch.save": Payload(torch.save, {}, str(marker)),          # torch's namespace is not allowed wholesale
        "numpy.save": Payload(np.save, str(marker), np.zeros(1)),    # stand-ins are never called as numpy
    }


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "builtins.getattr", "torch.save"])
@pytest.mark.parametrize("where", ["layer", "mp_rank"])
def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path, path_kind, attack, where):
    shape = tiny_shape()
    ck = tmp_path / "ck"
    write_checkpoint(ck, shape, random_sd(shape))
    marker = tmp_path / "pwned"
    name = arch.layer_file_name(0, 0) if where == "layer" else "mp_rank_00_model_states.pt"
    torch.save({"word_embeddings.weight": torch.zeros(64, 32), "x": payloads(marker)[attack]}, ck / "global_step0" / name)
    with pytest.raises(UserError, match=r"refers to .*(system|exec|getattr|save).*refusing"):
        CheckpointReader(ck, shape).embed()
    assert not marker.exists()


def test_a_stand_in_is_never_called(tmp_path, path_kind):
    marker = tmp_path / "pwned.npy"
    torch.save({"x": payloads(marker)["numpy.save"]}, tmp_path / "a.pt")
    got = safe.load_pt(tmp_path / "a.pt")["x"]
    assert isinstance(got, safe.Opaque) and "numpy" in type(got).__name__
    assert not marker.exists()


def test_a_torchscript_archive_is_refused(tmp_path, path_kind):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "m.pt"))
    with pytest.raises(UserError, match="TorchScript archive"):
        safe.load_pt(tmp_path / "m.pt")


def test_bytes_decoding_is_latin1_only(tmp_path, monkeypatch):
    """Protocol 2 pickles bytes as `_codecs.encode(text, 'latin1')`; the restricted unpickler looks up no other codec."""
    import codecs
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    torch.save({"b": b"\x00\xffab"}, tmp_path / "ok.pt")
    assert safe.load_pt(tmp_path / "ok.pt") == {"b": b"\x00\xffab"}
    torch.save({"b": Payload(codecs.encode, "abc", "rot13")}, tmp_path / "bad.pt")
    with pytest.raises(UserError):
        safe.load_pt(tmp_path / "bad.pt")


def test_the_forced_path_is_the_restricted_unpickler(tmp_path, monkeypatch):
    """Hiding the API really switches paths: the restricted unpickler is what refuses."""
    torch.save({"x": Payload(os.system, "true")}, tmp_path / "a.pt")
    seen = []
    original = safe.RestrictedUnpickler.find_class
    monkeypatch.setattr(safe.RestrictedUnpickler, "find_class",
                        lambda self, m, n: seen.append(f"{m}.{n}") or original(self, m, n))
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    with pytest.raises(UserError, match="posix.system"):
        safe.load_pt(tmp_path / "a.pt")
    assert seen == ["posix.system"]


# ---- acceptance: what NeoX and DeepSpeed write -------------------------------------------------------
def neox_like_client_state(shape) -> dict:
    """What GPT-NeoX's save_checkpoint adds to DeepSpeed's mp_rank file (megatron/checkpointing.py)."""
    return {"iteration": 12, "args": {"num_layers": shape.num_layers, "hidden_size": shape.hidden_size},
            "data_loading": {"train": 24}, "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}


@pytest.mark.deepspeed
def test_both_paths_read_what_deepspeed_saves(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    from neox_pipe import build_pipe, ds_engine, ds_save

    shape = tiny_shape(num_kv_heads=2)
    ds_save(ds_engine(build_pipe(shape, seed=3)), tmp_path / "ds", "global_step12", neox_like_client_state(shape))
    files = sorted((tmp_path / "ds" / "global_step12").glob("*.pt"))
    assert any(p.name == "mp_rank_00_model_states.pt" for p in files) and any(p.name.startswith("layer_") for p in files)
    for path in files:
        scan, restricted = load_both(path, monkeypatch)
        reference = torch.load(str(path), map_location="cpu", weights_only=False)  # trusted: we just wrote it
        if scan is not None:
            same(scan, restricted, path.name)
        check_against_plain_pickle(restricted, reference, path.name)
    with monkeypatch.context() as m:
        m.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
        reader = CheckpointReader(tmp_path / "ds", shape.replace(padded_vocab_size=None))
        assert reader.iteration == 12 and reader.format == "pipeline"
        sd = reader.state_dict()
    if HAVE_SCAN:
        want = CheckpointReader(tmp_path / "ds", shape.replace(padded_vocab_size=None)).state_dict()
        same(sd, want)


def check_against_plain_pickle(ours, reference, where) -> None:
    """Our result equals torch's unrestricted load, with stand-ins where that one built foreign objects."""
    if isinstance(ours, safe.Opaque):
        return  # numpy arrays, DeepSpeed enums, ...: never built by us
    if isinstance(ours, torch.Tensor):
        assert torch.equal(ours, reference) and ours.dtype == reference.dtype, where
    elif isinstance(ours, dict):
        assert list(ours) == list(reference), where
        for k in ours:
            check_against_plain_pickle(ours[k], reference[k], f"{where}.{k}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(reference), where
        for i, (x, y) in enumerate(zip(ours, reference)):
            check_against_plain_pickle(x, y, f"{where}[{i}]")
    else:
        assert ours == reference, where


@pytest.mark.neox
@pytest.mark.slow
def test_both_paths_read_what_neox_saves(tmp_path, monkeypatch):
    """GPT-NeoX (NEOX_DIR) trains two iterations and saves (pipeline format); every file it wrote loads on both paths,
    equal to each other and to torch's unrestricted load, and the reader gives the same weights on both."""
    import yaml
    from neox_run import CPU_KEYS, run_neox
    from train_util import make_data
    from train_util import tiny_shape as train_shape

    data = make_data(tmp_path / "data", n_chars=30_000)
    shape = train_shape(pp=1)
    cfg = shape.to_neox() | CPU_KEYS | {
        "tokenizer_type": "SPMTokenizer", "vocab_file": data["tokenizer"], "data_impl": "mmap", "data_path": data["train"],
        "split": "1000,0,0", "optimizer": {"type": "lion", "params": {"lr": 1e-3}}, "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1, "train_iters": 2, "save": str(tmp_path / "nx"), "checkpoint_factor": 2,
        "eval_interval": 1000, "log_interval": 1, "checkpoint_activations": False, "partition_activations": False}
    (tmp_path / "nx.yml").write_text(yaml.safe_dump(cfg))
    run_neox("train.py", tmp_path / "nx.yml", log=tmp_path / "neox.log")
    files = sorted((tmp_path / "nx" / "global_step2").glob("*.pt"))
    assert any(p.name == "mp_rank_00_model_states.pt" for p in files), files
    for path in files:
        scan, restricted = load_both(path, monkeypatch)
        if scan is not None:
            same(scan, restricted, path.name)
        plain = torch.load(str(path), map_location="cpu", weights_only=False)  # trusted: NeoX wrote it in this test
        check_against_plain_pickle(restricted, plain, path.name)
    mp = load_both(tmp_path / "nx" / "global_step2" / "mp_rank_00_model_states.pt", monkeypatch)[1]
    assert isinstance(mp["np_rng_state"][1], safe.Opaque) and mp["iteration"] == 2
    with monkeypatch.context() as m:
        m.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
        sd = CheckpointReader(tmp_path / "nx", shape).state_dict()
    if HAVE_SCAN:
        same(sd, CheckpointReader(tmp_path / "nx", shape).state_dict())


# ---- the torch requirement admits NeoX's container builds ------------------------------------------
def test_setup_torch_requirement_admits_neox_container_builds():
    """nvcr.io/nvidia/pytorch 24.02 ships torch 2.3.0a0+ebedce2, 25.04 ships 2.7.0a0+79aa17489c.nv25.04: pip must keep
    them (a requirement they do not satisfy makes pip replace the container's CUDA build)."""
    from packaging.requirements import Requirement

    tree = ast.parse((Path(__file__).resolve().parents[1] / "setup.py").read_text())
    core = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "CORE" for t in n.targets))
    torch_req = Requirement(next(r for r in core if re.match(r"torch\b", r)))
    for version in ("2.3.0a0+ebedce2", "2.7.0a0+79aa17489c.nv25.04", "2.3.0", "2.13.0+cpu"):
        assert torch_req.specifier.contains(version, prereleases=True), version
        assert torch_req.specifier.contains(version), version
    for version in ("2.2.2", "2.1.0a0+32f93b1"):
        assert not torch_req.specifier.contains(version, prereleases=True), version
