"""The built-in model, tokenizer and objectives: what the trainer's numbers rest on."""

from __future__ import annotations

import math

import pytest
import torch

from kubetrain.core.accounting import parameter_count
from kubetrain.core.api import ModelSpec
from kubetrain.core.architecture import builtin
from kubetrain_trainer import tokenizer as tok
from kubetrain_trainer.data import IGNORE, ArithmeticSFT, collate
from kubetrain_trainer.model import build_model
from kubetrain_trainer.objectives import dpo_loss, lm_loss, sequence_logprobs

torch.set_num_threads(1)


@pytest.mark.parametrize("text", ["", "12+34=46", "naïve café ☕", "line\nbreak\ttab"])
def test_tokenizer_round_trips_any_text(text: str) -> None:
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert all(0 <= i < tok.VOCAB_SIZE for i in ids)
    assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_survives_invalid_utf8() -> None:
    assert tok.decode([ord("4"), ord("6"), tok.EOS, ord("9")]) == "46"
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"


def test_tokenizer_fits_the_smallest_vocabulary_the_api_allows() -> None:
    assert tok.VOCAB_SIZE == builtin(ModelSpec()).vocab_size == 260


@pytest.mark.parametrize(
    "layers,heads,dim,context,vocab",
    [
        (1, 1, 8, 8, 260),
        (2, 2, 64, 64, 260),
        (3, 4, 96, 128, 512),
        (4, 8, 128, 32, 300),
    ],
)
def test_parameter_count_matches_accounting(
    layers: int, heads: int, dim: int, context: int, vocab: int
) -> None:
    spec = ModelSpec(layers=layers, heads=heads, dim=dim, contextLength=context, vocabSize=vocab)
    assert build_model(spec).num_parameters() == parameter_count(spec)


def test_model_is_causal_and_rejects_too_long_input() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(layers=2, heads=2, dim=16, contextLength=8)).eval()
    x = torch.randint(0, 256, (1, 8))
    y = x.clone()
    y[0, 5:] = (y[0, 5:] + 1) % 256
    with torch.no_grad():
        # Changing later tokens must not change earlier predictions.
        assert torch.allclose(model(x)[0, :5], model(y)[0, :5], atol=1e-6)
        with pytest.raises(ValueError, match="contextLength=8"):
            model(torch.zeros(1, 9, dtype=torch.long))


def test_sft_loss_counts_response_tokens_only() -> None:
    batch = ArithmeticSFT(seed=0, seq_len=32, eval_examples=0).batch(0, 4)
    _, answer = ArithmeticSFT(0, 32, 0).example(0)
    counted = int((batch.targets[0] != IGNORE).sum())
    # The answer's bytes and EOS, none of the prompt (nor BOS, nor padding).
    assert counted == len(answer) + 1
    tgt = batch.targets[0][batch.targets[0] != IGNORE].tolist()
    assert tok.decode(tgt) == answer and tgt[-1] == tok.EOS
    # A model whose logits change only on prompt positions has the same loss.
    torch.manual_seed(0)
    model = build_model(ModelSpec(layers=1, heads=1, dim=16, contextLength=32))
    base = lm_loss(model, batch)

    class PromptNoise(torch.nn.Module):
        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            logits = model(idx).clone()
            logits[batch.targets == IGNORE] += 100 * torch.randn_like(
                logits[batch.targets == IGNORE]
            )
            return logits

    assert torch.allclose(lm_loss(PromptNoise(), batch), base)


def test_collate_pads_and_masks() -> None:
    b = collate([([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7, 8], [0, 0, 1, 1, 1])])
    assert b.inputs.tolist() == [[1, 2, tok.PAD, tok.PAD], [4, 5, 6, 7]]
    assert b.targets.tolist() == [[2, 3, IGNORE, IGNORE], [IGNORE, 6, 7, 8]]


def test_sequence_logprobs_sum_only_unmasked_positions() -> None:
    logits = torch.zeros(1, 3, 4)  # uniform: log p = -log 4 everywhere
    targets = torch.tensor([[1, IGNORE, 2]])
    assert torch.allclose(sequence_logprobs(logits, targets), torch.tensor([-2 * math.log(4)]))


def test_dpo_loss_is_log2_with_zero_margins_when_policy_is_reference() -> None:
    logps = torch.tensor([-3.0, -5.0, -1.5])
    rejected = torch.tensor([-4.0, -2.0, -7.0])
    loss, m = dpo_loss(logps, rejected, logps, rejected, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/margins"].item() == 0.0
    assert m["rewards/chosen"].item() == 0.0 and m["rewards/rejected"].item() == 0.0
    assert m["rewards/accuracies"].item() == 0.0


def test_dpo_rewards_have_the_right_signs() -> None:
    ref_c, ref_r = torch.tensor([-4.0, -4.0]), torch.tensor([-4.0, -4.0])
    # The policy raised the chosen response's probability and lowered the rejected one's.
    pol_c, pol_r = torch.tensor([-3.0, -2.0]), torch.tensor([-6.0, -5.0])
    loss, m = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.5)
    assert m["rewards/chosen"].item() > 0 > m["rewards/rejected"].item()
    # chosen rewards 0.5·[1, 2], rejected 0.5·[-2, -1]: margins [1.5, 1.5].
    assert m["rewards/margins"].item() == pytest.approx(1.5)
    assert m["rewards/accuracies"].item() == 1.0
    assert loss.item() < math.log(2)
    # Preferring the rejected response costs more than log 2.
    worse, _ = dpo_loss(pol_r, pol_c, ref_c, ref_r, beta=0.5)
    assert worse.item() > math.log(2)


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected() -> None:
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.item() < 0 < pr.grad.item()
