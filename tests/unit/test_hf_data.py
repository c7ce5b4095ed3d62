"""Tokenizers, chat templates, SFT/DPO rows and packing for Hugging Face models.

The tokenizer is trained in the test (byte-level BPE on a few sentences) and written by
transformers, so the files have the layout real model folders have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kubetrain.core.hf_config import ModelFormatError
from kubetrain_trainer.data import IGNORE
from kubetrain_trainer.hf import records
from kubetrain_trainer.hf.examples import TokenizedExample
from kubetrain_trainer.hf.packing import pack_rows, pad_batch, pair_batch, plan_rows
from kubetrain_trainer.hf.records import DataFormatError, dpo_example, sft_example
from kubetrain_trainer.hf.tokenizer import HFTokenizer

transformers.logging.set_verbosity_error()

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# transformers' assistant-mask markup: the newline after each turn is not the assistant's.
TAGGED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Like Qwen3's: the last assistant turn gets an (empty) reasoning block, earlier ones do
# not, so the rendering of a conversation's prefix is not a prefix of the whole.
LAST_TURN_DIFFERS = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SENTENCES = [
    "What is two plus two? The answer is four.",
    "Hello there, how are you today? I am fine, thank you.",
    "You are a helpful assistant. Answer briefly.",
    "Say yes. Yes. Say no. No.",
]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say yes."},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "Now say no, not yes."},
    {"role": "assistant", "content": "No."},
]


def _train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    return tok


def write_tokenizer(folder: Path, template: str | None, eos: str = "<|im_end|>") -> Path:
    """A tokenizer folder as transformers writes it."""
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(), eos_token=eos, pad_token="<|endoftext|>"
    )
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("chatml"), CHATML)


@pytest.fixture(scope="module")
def chat(chat_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_folder(chat_dir)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """A base model's tokenizer: no chat template, <|endoftext|> ends documents."""
    folder = write_tokenizer(tmp_path_factory.mktemp("base"), None, eos="<|endoftext|>")
    return HFTokenizer.from_folder(folder)


def trained_runs(tok: HFTokenizer, ex: TokenizedExample) -> list[str]:
    """The text of each maximal run of tokens in the loss."""
    runs: list[list[int]] = []
    for i, (token, on) in enumerate(zip(ex.ids, ex.loss_mask, strict=True)):
        if on:
            if i == 0 or not ex.loss_mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_rendering_and_ids_equal_transformers_apply_chat_template(
    chat_dir: Path, chat: HFTokenizer
) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(chat_dir)
    for gen in (False, True):
        text = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert chat.render(CONVERSATION, add_generation_prompt=gen) == text
        assert chat.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert chat.eos_id == hf.eos_token_id and chat.pad_id == hf.pad_token_id
    assert chat.vocab_size == len(hf)


def test_loss_covers_exactly_the_assistant_turns(chat: HFTokenizer) -> None:
    ex = sft_example(chat, {"messages": CONVERSATION}, "f line 1")
    assert chat.decode(ex.ids, skip_special_tokens=False) == chat.render(CONVERSATION)
    # Each answer with the end-of-turn token the model must learn to emit.
    assert trained_runs(chat, ex) == ["Yes.<|im_end|>\n", "No.<|im_end|>\n"]


def test_generation_tags_give_transformers_assistant_mask(tmp_path: Path) -> None:
    folder = write_tokenizer(tmp_path, TAGGED)
    tok = HFTokenizer.from_folder(folder)
    ex = sft_example(tok, {"messages": CONVERSATION}, "f line 1")
    assert trained_runs(tok, ex) == ["Yes.<|im_end|>", "No.<|im_end|>"]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    out = hf.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ex.ids == out["input_ids"]
    assert [int(m) for m in ex.loss_mask] == out["assistant_masks"]


def test_templates_that_rewrite_earlier_turns_still_mask_each_answer(tmp_path: Path) -> None:
    tok = HFTokenizer.from_folder(write_tokenizer(tmp_path, LAST_TURN_DIFFERS))
    ex = sft_example(tok, {"messages": CONVERSATION}, "f line 1")
    # The user's "Say yes." holds "yes" too: the answer is found after the question.
    assert trained_runs(tok, ex) == ["Yes.<|im_end|>", "<think>\n\n</think>\n\nNo.<|im_end|>\n"]


def test_prompt_completion_trains_on_the_completion_only(chat: HFTokenizer) -> None:
    ex = sft_example(chat, {"prompt": "Say yes.", "completion": "Yes."}, "f line 1")
    assert trained_runs(chat, ex) == ["Yes.<|im_end|>\n"]
    few_shot = [
        {"role": "user", "content": "Say no."},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Say yes."},
    ]
    ex = sft_example(
        chat,
        {"prompt": few_shot, "completion": [{"role": "assistant", "content": "Yes."}]},
        "f line 1",
    )
    assert trained_runs(chat, ex) == ["Yes.<|im_end|>\n"]


def test_base_models_train_on_plain_completion_and_eos(base: HFTokenizer) -> None:
    ex = sft_example(base, {"prompt": "What is two plus two?", "completion": " four"}, "f")
    assert base.decode(ex.ids, skip_special_tokens=False).startswith("What is two plus two?")
    assert trained_runs(base, ex) == [" four<|endoftext|>"]


def test_dpo_pairs_share_the_prompt_and_train_on_the_responses(chat: HFTokenizer) -> None:
    pair = dpo_example(chat, {"prompt": "Say yes.", "chosen": "Yes.", "rejected": "No."}, "f")
    assert trained_runs(chat, pair.chosen) == ["Yes.<|im_end|>\n"]
    assert trained_runs(chat, pair.rejected) == ["No.<|im_end|>\n"]
    prompt_len = pair.chosen.loss_mask.index(True)
    assert pair.chosen.ids[:prompt_len] == pair.rejected.ids[:prompt_len]
    conversational = dpo_example(
        chat,
        {
            "prompt": [{"role": "user", "content": "Say yes."}],
            "chosen": [{"role": "assistant", "content": "Yes."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        "f",
    )
    assert conversational == pair


def test_pretraining_documents_end_with_eos(base: HFTokenizer) -> None:
    ex = records.pretrain_example(base, {"text": "Hello there."}, "f")
    assert ex.ids[-1] == base.eos_id and all(ex.loss_mask)


def test_stop_tokens_include_the_generation_configs(tmp_path: Path) -> None:
    folder = write_tokenizer(tmp_path, CHATML)
    ids = HFTokenizer.from_folder(folder)
    end_of_text = ids.encode("<|endoftext|>")[0]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text]}))
    tok = HFTokenizer.from_folder(folder)
    assert tok.stop_ids == {tok.eos_id, end_of_text}


def test_a_slow_only_tokenizer_is_refused_with_how_to_convert(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(ModelFormatError, match=r"no tokenizer\.json .*save_pretrained"):
        HFTokenizer.from_folder(tmp_path)


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_parquet_and_jsonl_rows_give_the_same_examples(chat: HFTokenizer, tmp_path: Path) -> None:
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    from_parquet = records.load(
        "s3://b/chat.parquet", buf.getvalue().to_pybytes(), sft_example, chat
    )
    from_jsonl = records.load("s3://b/chat.jsonl", _jsonl(rows), sft_example, chat)
    assert from_parquet == from_jsonl and len(from_jsonl) == 2


MALFORMED = [
    (b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"', "line 3: not valid JSON"),
    (_jsonl([{"prompt": "a", "response": "b"}]), 'line 1: expected {"messages": [...]} or'),
    (_jsonl([["a", "b"]]), "line 1: expected"),
    (
        _jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}]),
        "line 1: messages must be a string or a list of",
    ),
    (
        _jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}]),
        "message 2 has content=None (accepted: a string)",
    ),
    (_jsonl([{"messages": [{"role": "user", "content": "a"}]}]), "no assistant message"),
    (_jsonl([{"prompt": "a", "completion": 3}]), "completion must be a string or a list"),
    (b"", "no rows"),
]


@pytest.mark.parametrize("data,message", MALFORMED)
def test_malformed_rows_name_file_line_and_what_was_expected(
    chat: HFTokenizer, data: bytes, message: str
) -> None:
    with pytest.raises(DataFormatError, match=r"data\.source s3://b/sft\.jsonl") as err:
        records.load("s3://b/sft.jsonl", data, sft_example, chat)
    assert message in str(err.value)


def test_malformed_parquet_rows_name_the_row(chat: HFTokenizer, base: HFTokenizer) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "a", "chosen": "b", "rejected": None}] * 2), buf
    )
    with pytest.raises(DataFormatError, match=r"data.source s3://b/p.parquet row 1: prompt and"):
        records.load("s3://b/p.parquet", buf.getvalue().to_pybytes(), dpo_example, base)
    with pytest.raises(DataFormatError, match=r"row 1: rejected must be a string or a list"):
        records.load("s3://b/p.parquet", buf.getvalue().to_pybytes(), dpo_example, chat)
    with pytest.raises(DataFormatError, match="not a Parquet file"):
        records.load("s3://b/p.parquet", b"not parquet", dpo_example, chat)


def test_conversations_need_a_chat_template(base: HFTokenizer) -> None:
    with pytest.raises(DataFormatError, match="line 1: conversational rows need a chat template"):
        records.load("f.jsonl", _jsonl([{"messages": CONVERSATION}]), sft_example, base)
    with pytest.raises(DataFormatError, match=r'line 1: expected \{"prompt": ..., "chosen"'):
        records.load("f.jsonl", _jsonl([{"prompt": "a", "chosen": "b"}]), dpo_example, base)


# --------------------------------------------------------------------------- packing


def test_rows_are_planned_full_and_every_example_is_placed_once() -> None:
    lengths = [7, 3, 5, 2, 8, 1, 4, 6, 2]
    rows = plan_rows(lengths, seq_len=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 4  # 38 tokens: four rows of 10 is the fewest that can hold them
    assert plan_rows(lengths, seq_len=10) == rows
    with pytest.raises(ValueError, match=r"longer than seq_len=6 .*truncate or split"):
        plan_rows(lengths, seq_len=6)


def test_packed_rows_predict_within_each_example_only() -> None:
    a = TokenizedExample([10, 11, 12, 13], [False, False, True, True])
    b = TokenizedExample([20, 21, 22], [True, True, True])
    batch = pack_rows([[a, b]], seq_len=9, pad_id=0)
    assert batch.inputs.tolist() == [[10, 11, 12, 13, 20, 21, 22, 0, 0]]
    # a's last token and b's last token predict nothing; a's prompt tokens are not trained.
    assert batch.targets.tolist() == [[IGNORE, 12, 13, IGNORE, 21, 22, IGNORE, IGNORE, IGNORE]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1, -1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch.tokens == 7


def test_dpo_pairs_pad_to_one_length() -> None:
    chosen = TokenizedExample([1, 2, 3, 4], [False, False, True, True])
    rejected = TokenizedExample([1, 2, 5], [False, False, True])
    from kubetrain_trainer.hf.examples import PreferenceExample

    batch = pair_batch([PreferenceExample(chosen, rejected)], seq_len=8, pad_id=0)
    assert batch.chosen.inputs.tolist() == [[1, 2, 3]]
    assert batch.chosen.targets.tolist() == [[IGNORE, 3, 4]]
    assert batch.rejected.inputs.tolist() == [[1, 2, 0]]
    assert batch.rejected.targets.tolist() == [[IGNORE, 5, IGNORE]]
    cut = pad_batch([chosen], seq_len=2, pad_id=0)
    assert cut.inputs.shape == torch.Size([1, 2]) and cut.targets.tolist() == [[IGNORE, 3]]
