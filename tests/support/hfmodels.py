"""Tiny Hugging Face model folders made in the test (nothing is downloaded): a byte-level
BPE tokenizer trained on a few sentences and arithmetic, written by transformers, and a
random Llama written by transformers' save_pretrained, so the folders have the layout
real ones have."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SENTENCES = [
    "What is two plus two? The answer is four.",
    "Hello there, how are you today? I am fine, thank you.",
    "You are a helpful assistant. Answer briefly.",
    "Say yes. Yes. Say no. No.",
    *(f"Q: {a}+{b}\nA: {a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11)),
]


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def write_tokenizer(
    folder: Path, template: str | None = CHATML, *, eos: str = "<|im_end|>", vocab: int = 320
) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer folder as transformers writes it (pad token ``<|endoftext|>``)."""
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab), eos_token=eos, pad_token="<|endoftext|>"
    )
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(folder)
    return hf


def tiny_llama(
    folder: Path,
    *,
    template: str | None = CHATML,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> transformers.PreTrainedModel:
    """A random Llama (GQA, untied head) with its tokenizer in ``folder``."""
    tok = write_tokenizer(folder, template)
    cfg = transformers.LlamaConfig(
        **{
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,
            **config,
        }
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    return model


def perturbed(source: Path, dest: Path, seed: int = 1) -> Path:
    """A copy of the model folder ``source`` (tokenizer included) with every weight
    moved a little: a policy that differs from its reference."""
    shutil.copytree(source, dest)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(dest)
    return dest
