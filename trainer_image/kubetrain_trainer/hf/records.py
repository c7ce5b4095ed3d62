"""Training rows from JSONL or Parquet files, checked and tokenized with the model's
tokenizer.

Accepted rows (the formats TRL and the Hugging Face hub use):
- pretrain: ``{"text": "..."}``;
- sft: ``{"messages": [{"role", "content"}, ...]}`` (loss on every assistant message) or
  ``{"prompt": ..., "completion": ...}`` (loss on the completion), where prompt and
  completion are strings or lists of messages;
- dpo: ``{"prompt": ..., "chosen": ..., "rejected": ...}``, strings or lists of messages.

With a chat template, strings become a user message (prompt) and an assistant message
(completion, chosen, rejected) and everything is rendered by the template; without one
(a base model) strings are plain text and lists of messages are refused.

A file's format is its suffix: ``.parquet`` is Parquet, anything else JSON Lines (one
object per line; blank lines are not rows). A row that does not fit stops the load
with the file, the line (or Parquet row) and what was expected: a silently skipped row
is a silently different dataset.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kubetrain_trainer.hf.examples import (
    PreferenceExample,
    TokenizedExample,
    conversation_example,
    plain_example,
    text_example,
)
from kubetrain_trainer.hf.tokenizer import HFTokenizer, Message

T = TypeVar("T")
SFT_FORMS = '{"messages": [...]} or {"prompt": ..., "completion": ...}'
DPO_FORM = '{"prompt": ..., "chosen": ..., "rejected": ...}'


class DataFormatError(ValueError):
    """A data file that does not fit the stage; the message names the file and row."""


def read_rows(uri: str, data: bytes) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of a JSONL or Parquet file; ``where`` is
    ``"<uri> line N"`` (``row N`` for Parquet), for error messages."""
    if uri.lower().endswith(".parquet"):
        yield from _parquet_rows(uri, data)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"data.source {uri}: not UTF-8 text ({exc})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"data.source {uri} line {n}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where}: not valid JSON ({exc.msg})") from None


def _parquet_rows(uri: str, data: bytes) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa  # only Parquet sources pay for pyarrow's import
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataFormatError(f"data.source {uri}: not a Parquet file ({exc})") from None
    for n, row in enumerate(table.to_pylist(), 1):
        yield f"data.source {uri} row {n}", row


def load(
    uri: str, data: bytes, build: Callable[[HFTokenizer, Any, str], T], tok: HFTokenizer
) -> list[T]:
    """Every row of the file through ``build`` (:func:`sft_example`, :func:`dpo_example`
    or :func:`pretrain_example`)."""
    out = [build(tok, row, where) for where, row in read_rows(uri, data)]
    if not out:
        raise DataFormatError(f"data.source {uri}: no rows")
    return out


def pretrain_example(tok: HFTokenizer, row: Any, where: str) -> TokenizedExample:
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise DataFormatError(f'{where}: expected {{"text": "..."}}, got {_shape(row)}')
    return text_example(tok, row["text"])


def sft_example(tok: HFTokenizer, row: Any, where: str) -> TokenizedExample:
    if isinstance(row, dict) and "messages" in row:
        messages = _messages(row["messages"], "messages", where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataFormatError(f"{where}: messages has no assistant message to learn from")
        return _checked(where, lambda: conversation_example(_chat(tok, where), messages))
    if isinstance(row, dict) and "prompt" in row and "completion" in row:
        return _response_example(tok, row["prompt"], row["completion"], "completion", where)
    raise DataFormatError(f"{where}: expected {SFT_FORMS}, got {_shape(row)}")


def dpo_example(tok: HFTokenizer, row: Any, where: str) -> PreferenceExample:
    if not (isinstance(row, dict) and all(k in row for k in ("prompt", "chosen", "rejected"))):
        raise DataFormatError(f"{where}: expected {DPO_FORM}, got {_shape(row)}")
    return PreferenceExample(
        _response_example(tok, row["prompt"], row["chosen"], "chosen", where),
        _response_example(tok, row["prompt"], row["rejected"], "rejected", where),
    )


def _response_example(
    tok: HFTokenizer, prompt: Any, response: Any, key: str, where: str
) -> TokenizedExample:
    if tok.chat_template is None:
        if not (isinstance(prompt, str) and isinstance(response, str)):
            raise DataFormatError(
                f"{where}: prompt and {key} must be strings: the model's tokenizer has no chat "
                "template to render messages with"
            )
        return _checked(where, lambda: plain_example(tok, prompt, response))
    before = _turns(prompt, "prompt", "user", where)
    after = _turns(response, key, "assistant", where)
    if not any(m["role"] == "assistant" for m in after):
        raise DataFormatError(f"{where}: {key} has no assistant message to learn from")
    return _checked(
        where, lambda: conversation_example(tok, before + after, trained_from=len(before))
    )


def _turns(value: Any, key: str, role: str, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, key, where)


def _messages(value: Any, key: str, where: str) -> list[Message]:
    expected = f'{key} must be a string or a list of {{"role": ..., "content": "..."}} objects'
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: {expected}, got {_shape(value)}")
    for n, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise DataFormatError(f"{where}: {expected}; message {n} is {_shape(m)}")
        for field in ("role", "content"):
            if not isinstance(m.get(field), str):
                raise DataFormatError(
                    f"{where}: {expected}; message {n} has {field}={m.get(field)!r} "
                    "(accepted: a string)"
                )
    return value


def _chat(tok: HFTokenizer, where: str) -> HFTokenizer:
    if tok.chat_template is None:
        raise DataFormatError(
            f"{where}: conversational rows need a chat template and the model's tokenizer has "
            'none (accepted: {"prompt": "...", "completion": "..."} as plain strings)'
        )
    return tok


def _checked(where: str, make: Callable[[], TokenizedExample]) -> TokenizedExample:
    try:
        example = make()
    except DataFormatError:
        raise
    except ValueError as exc:  # the template refused, or its output hides the answer
        raise DataFormatError(f"{where}: {exc}") from None
    if not example.trained_tokens:
        raise DataFormatError(f"{where}: the response is empty: no tokens to learn from")
    return example


def _shape(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {value!r:.40}"
