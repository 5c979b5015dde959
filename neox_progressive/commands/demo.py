"""Run the built-in tiny example end to end on CPU.

Makes a tiny Llama-style model, writes it as a GPT-NeoX checkpoint (TP=2, pipeline format),
reads it back and checks it, exports it to a transformers LlamaForCausalLM directory and
compares the logits of transformers' model with the plugin's reference model.
"""

from __future__ import annotations

from pathlib import Path

HELP = "run the built-in tiny example on CPU (a few seconds)"
EXAMPLES = """
  neox-progressive demo --out demo_out
  neox-progressive demo --out demo_out --force
"""


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args) -> int:
    import shutil

    import torch
    import yaml

    from neox_progressive.config import ModelShape
    from neox_progressive.errors import UserError
    from neox_progressive.hf import export_hf
    from neox_progressive.io.reader import CheckpointReader
    from neox_progressive.io.writer import write_checkpoint
    from neox_progressive.model import Transformer, init_weights

    out = Path(args.out)
    if out.exists():
        if not args.force:
            raise UserError(f"{out} already exists; pass --force to replace it or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shape = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=128,
                       padded_vocab_size=256, make_vocab_size_divisible_by=128, tp=2, pp=1, rms_norm_eps=1e-5)
    config = out / "tiny.yml"
    config.write_text(yaml.safe_dump(shape.to_neox(), sort_keys=False))
    model = init_weights(Transformer(shape), seed=0, std=0.2)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ckpt = write_checkpoint(out / "checkpoint", shape, sd)
    print(f"1. wrote a GPT-NeoX checkpoint (TP=2, pipeline format) to {ckpt}")
    reader = CheckpointReader(ckpt, ModelShape.from_yamls([config]))
    back = reader.state_dict()
    assert all(torch.equal(back[k], sd[k]) for k in sd), "round trip changed a tensor"
    print(f"2. read it back with {config}: {len(back)} tensors, bit-identical")
    hf_dir = export_hf(reader, out / "hf")
    print(f"3. exported a transformers LlamaForCausalLM to {hf_dir}")
    try:
        import transformers
    except ImportError:
        print("4. transformers is not installed (pip install 'neox-progressive[eval]'); skipping the logit check")
        return 0
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, shape.padded_vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(tokens).logits - model(tokens)).abs().max().item()
    print(f"4. transformers' logits vs the reference model's: max abs difference {diff:.2e}")
    if diff > 1e-4:
        raise UserError(f"the exported model disagrees with the reference model (max abs diff {diff:.2e})")
    print("demo OK")
    return 0
