"""Initial weights and optimizer parameter groups, as NeoX makes them.

Initialization (megatron/model/init_functions.py, gpt2_model.py, transformer.py): `init_method`
for the embedding, QKV, linear1 and the output head; `output_layer_init_method` for the two
residual writers (attention dense = `attn.o`, linear2 = `mlp.down`); biases 0, norm scales 1.

    normal                          N(0, init_method_std)
    scaled_normal                   N(0, init_method_std / sqrt(2 L))
    single_residual_scaled_normal   N(0, init_method_std / sqrt(L))
    small_init                      N(0, sqrt(2 / (5 h)))
    wang_init                       N(0, 2 / L / sqrt(h))

Values are drawn from one torch generator seeded with `seed`, parameter by parameter in the
model's order (NeoX draws per TP shard on the GPU, so the numbers differ; the distribution does not).

Weight decay (megatron/model/utils.py get_params_for_weight_decay_optimization): none for norm
scales and biases, `weight_decay` for everything else; one group when weight_decay is 0.
"""

from __future__ import annotations

import math

import torch

from neox_progressive.model import Transformer

RESIDUAL_WRITERS = ("attn.o.weight", "mlp.down.weight")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_std(method: str, std: float, num_layers: int, hidden: int) -> float:
    return {
        "normal": std,
        "scaled_normal": std / math.sqrt(2 * num_layers),
        "single_residual_scaled_normal": std / math.sqrt(num_layers),
        "small_init": math.sqrt(2 / (5 * hidden)),
        "wang_init": 2 / num_layers / math.sqrt(hidden),
    }[method]


@torch.no_grad()
def init_neox(model: Transformer, seed: int, init_method: str = "normal", output_method: str = "scaled_normal",
              std: float = 0.02) -> Transformer:
    """Initialize `model` in place as NeoX's init methods would (see the module docstring)."""
    shape = model.shape
    g = torch.Generator().manual_seed(seed)
    main = init_std(init_method, std, shape.num_layers, shape.hidden_size)
    out = init_std(output_method, std, shape.num_layers, shape.hidden_size)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            s = out if name.endswith(RESIDUAL_WRITERS) else main
            p.copy_(torch.randn(p.shape, generator=g) * s)
    return model


def param_groups(model: Transformer, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("norm.weight") or name.endswith(".bias") else decay).append(p)
    if weight_decay == 0:
        return [{"params": decay + no_decay, "weight_decay": 0.0}]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
