"""Conversations to token ids with a loss mask that covers what the model should learn.

The text is the chat template's rendering of the whole conversation, tokenized once
(exactly what the model sees at inference). Which characters are the assistant's is
found, per assistant message, by the first method that applies:

1. ``{% generation %}`` tags in the template (transformers' assistant-mask markup):
   exact by construction.
2. Prefix differences: the conversation up to the message with the generation prompt,
   and up to and including the message, both prefixes of the full rendering; the
   assistant's span is what the message added, so it includes the end-of-turn tokens
   the template writes (``<|im_end|>``, ``<|eot_id|>``, ``</s>``), and the model learns
   to stop.
3. Templates that render earlier turns differently from the last one (Qwen3 drops
   earlier turns' reasoning) fail 2 for those turns; then the message's content is
   located verbatim in the rendering, plus a stop token that directly follows it.

A token is trained when it starts inside a span. Without a chat template (a base model),
prompt and completion are plain text: ``prompt + completion`` plus EOS, loss on the
completion and EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetrain_trainer.hf.tokenizer import HFTokenizer, Message

Span = tuple[int, int]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and, per token, whether predicting it counts in the loss."""

    ids: list[int]
    loss_mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class PreferenceExample:
    """A DPO pair: the same prompt with the chosen and with the rejected response; the
    masks cover the responses only."""

    chosen: TokenizedExample
    rejected: TokenizedExample


@dataclass(frozen=True)
class HeldOut:
    """A Hugging Face stage's evaluation data: ``examples`` for the loss on their
    trained tokens (and, with ``generate``, exact match of a greedy answer to the last
    trained span), ``pairs`` for preference accuracy."""

    examples: list[TokenizedExample]
    pairs: list[PreferenceExample]
    generate: bool


def answer_split(example: TokenizedExample) -> tuple[list[int], list[int]]:
    """The prompt (every token before the last run of trained tokens) and that run: what
    a model is asked and should answer, for exact-match evaluation."""
    mask = example.loss_mask
    end = max((i + 1 for i, on in enumerate(mask) if on), default=0)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return example.ids[:start], example.ids[start:end]


def conversation_example(
    tok: HFTokenizer, messages: Sequence[Message], *, trained_from: int = 0
) -> TokenizedExample:
    """The conversation through the chat template; loss on the assistant messages at
    index ``trained_from`` or later (earlier ones are context, such as a prompt's
    few-shot answers)."""
    text = tok.render(messages)
    trained = [
        i for i, m in enumerate(messages) if m.get("role") == "assistant" and i >= trained_from
    ]
    spans = _spans(tok, messages, text, trained)
    return _tokenize(tok, text, spans, add_special_tokens=False)


def plain_example(tok: HFTokenizer, prompt: str, completion: str) -> TokenizedExample:
    """``prompt + completion`` with the tokenizer's own framing, then EOS; loss on the
    completion and EOS."""
    text = prompt + completion
    example = _tokenize(tok, text, [(len(prompt), len(text))], add_special_tokens=True)
    if tok.eos_id is None:
        return example
    return TokenizedExample([*example.ids, tok.eos_id], [*example.loss_mask, True])


def text_example(tok: HFTokenizer, text: str) -> TokenizedExample:
    """A pretraining document: framed by the tokenizer, ended with EOS, all in the loss."""
    ids = tok.encode(text, add_special_tokens=True)
    if tok.eos_id is not None:
        ids.append(tok.eos_id)
    return TokenizedExample(ids, [True] * len(ids))


def _tokenize(
    tok: HFTokenizer, text: str, spans: list[Span], *, add_special_tokens: bool
) -> TokenizedExample:
    enc = tok.encode_with_offsets(text, add_special_tokens=add_special_tokens)
    spans = sorted(spans)
    mask, k = [], 0
    for start, end in enc.offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        # Special tokens the tokenizer adds (BOS) have an empty (0, 0) offset.
        mask.append(k < len(spans) and spans[k][0] <= start and end > start)
    return TokenizedExample(enc.ids, mask)


def _spans(
    tok: HFTokenizer, messages: Sequence[Message], text: str, trained: list[int]
) -> list[Span]:
    tagged = _tagged_spans(tok, messages)
    if tagged is not None:
        return [tagged[i] for i in trained]
    spans, cursor = [], 0
    for i in trained:
        before, through = _renderings(tok, messages, i)
        if text.startswith(through) and through.startswith(before) and len(through) > len(before):
            span: Span | None = (len(before), len(through))
        else:
            # The content comes after everything before the message, where that much of
            # the rendering is stable.
            floor = len(before) if before and text.startswith(before) else 0
            span = _searched_span(tok, text, messages[i], max(cursor, floor))
        if span is None or span[0] < cursor:
            raise ValueError(
                f"cannot tell which tokens are assistant message {i + 1}: the chat template "
                "does not write its content verbatim"
            )
        spans.append(span)
        cursor = span[1]
    return spans


def _tagged_spans(tok: HFTokenizer, messages: Sequence[Message]) -> dict[int, Span] | None:
    """The ``{% generation %}`` spans by assistant message index; None when the template
    has no such blocks or they do not pair one to one with the assistant messages."""
    spans = tok.generation_spans(messages)
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if spans is None or len(spans) != len(assistants):
        return None
    return dict(zip(assistants, spans, strict=True))


def _renderings(tok: HFTokenizer, messages: Sequence[Message], i: int) -> tuple[str, str]:
    """The conversation before message ``i`` with the generation prompt, and through
    message ``i``; empty strings when the template refuses such a cut."""
    try:
        return (
            tok.render(messages[:i], add_generation_prompt=True),
            tok.render(messages[: i + 1]),
        )
    except ValueError:  # some templates refuse a conversation that does not end a turn
        return "", ""


def _searched_span(tok: HFTokenizer, text: str, message: Message, cursor: int) -> Span | None:
    content = str(message.get("content") or "").strip()
    start = text.find(content, cursor) if content else -1
    if start < 0:
        return None
    end = start + len(content)
    for stop in tok.stop_strings:
        if text.startswith(stop, end):
            end += len(stop)
            break
    return start, end
