"""Our speculative decoding against transformers' assisted generation on our HF exports (independent code):
the same greedy tokens and, round by round, the same number of drafted and accepted tokens."""

import pytest
import torch
from tiny import random_sd, tiny_shape

from neox_progressive.eval.specdec import speculative_generate
from neox_progressive.hf import export_hf
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

transformers = pytest.importorskip("transformers")
from transformers.generation import candidate_generator  # noqa: E402

TARGET = tiny_shape(hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, ffn_size=64, padded_vocab_size=64,
                    rms_norm_eps=1e-6)
PROMPTS = [[1, 5, 9, 13, 2], [3, 3, 3, 8, 40, 41, 42, 2, 9, 10, 11]]


def exported(tmp_path, name, shape, sd):
    write_checkpoint(tmp_path / name, shape, sd)
    reader = CheckpointReader(tmp_path / name, shape)
    export_hf(reader, tmp_path / f"{name}-hf")
    ours = Transformer.from_state_dict(reader.shape, reader.state_dict())
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / f"{name}-hf", torch_dtype=torch.float32).eval()
    return ours, hf


@pytest.mark.parametrize("draft_len", [8, 3])
def test_acceptance_equals_transformers_assisted_generation(tmp_path, monkeypatch, draft_len):
    target_sd = random_sd(TARGET, seed=0, std=0.2)
    g = torch.Generator().manual_seed(9)
    draft_sd = {k: v + 0.04 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in target_sd.items()}
    t_ours, t_hf = exported(tmp_path, "target", TARGET, target_sd)
    d_ours, d_hf = exported(tmp_path, "draft", TARGET, draft_sd)
    d_hf.generation_config.num_assistant_tokens = draft_len
    d_hf.generation_config.num_assistant_tokens_schedule = "constant"
    d_hf.generation_config.assistant_confidence_threshold = 0.0  # no early stop of the draft

    rounds = []
    original = candidate_generator.AssistedCandidateGenerator.update_candidate_strategy

    def record(self, input_ids, scores, num_matches):
        rounds.append((scores.shape[1] - 1, int(num_matches)))
        return original(self, input_ids, scores, num_matches)

    monkeypatch.setattr(candidate_generator.AssistedCandidateGenerator, "update_candidate_strategy", record)
    for prompt in PROMPTS:
        rounds.clear()
        ids = torch.tensor([prompt])
        # eos: an id outside the vocabulary (never generated); transformers 4.38 (NeoX's pin) needs one for assisted generation
        out = t_hf.generate(ids, assistant_model=d_hf, max_new_tokens=30, do_sample=False, pad_token_id=0,
                            eos_token_id=TARGET.padded_vocab_size)
        hf_tokens = out[0, len(prompt):].tolist()
        ours = speculative_generate(d_ours, t_ours, prompt, 30, draft_len=draft_len)
        assert ours.tokens == hf_tokens
        assert (ours.drafted, ours.accepted) == (sum(r[0] for r in rounds), sum(r[1] for r in rounds))
        assert ours.rounds == len(rounds)
        assert 0 < ours.accepted < ours.drafted  # partial acceptance: the comparison means something
