"""A model's own tokenizer and chat template, without transformers.

Decision: the trainer reads ``tokenizer.json`` with the ``tokenizers`` library (the Rust
tokenizer transformers' fast tokenizers wrap, so ids are identical) and renders chat
templates with jinja2 configured as transformers configures it (sandboxed, trim_blocks,
lstrip_blocks, loop controls, ``raise_exception``, ``strftime_now``, a non-escaping
``tojson``). transformers does not become a trainer dependency: it would add a large,
fast-moving dependency tree to the image for two files' worth of behaviour. The cost: a
model that ships only a slow SentencePiece tokenizer (``tokenizer.model`` without
``tokenizer.json``) is refused with a message saying how to convert it.

Special tokens come from ``tokenizer_config.json`` (else ``special_tokens_map.json``);
the chat template from ``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json``, in the order transformers prefers them; extra stop tokens
(Llama 3's ``<|eot_id|>``, say) from ``generation_config.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from kubetrain.core.hf_config import ModelFormatError

Message = dict[str, Any]
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Private-use characters that bracket {% generation %} blocks while spans are tracked.
_OPEN, _CLOSE = "\ue000", "\ue001"


class _GenerationTags(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tags):
    the body is rendered as is, bracketed by sentinels when ``track_generation`` is set
    so the assistant's spans can be cut out exactly."""

    tags = {"generation"}  # noqa: RUF012 - jinja's extension API

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_mark", [jinja2.nodes.Name("track_generation", "load")])
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    @staticmethod
    def _mark(track: Any, caller: Any) -> str:
        body = caller()
        return f"{_OPEN}{body}{_CLOSE}" if track is True else body


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled the way transformers compiles it."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTags, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    # (start, end) character offsets of each token in the text.
    offsets: list[tuple[int, int]]


class HFTokenizer:
    """A Hugging Face tokenizer folder: ids, special tokens, chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        special_tokens: dict[str, str],
        chat_template: str | None,
        extra_stop_ids: Sequence[int] = (),
        where: str = "tokenizer",
    ):
        self._tok, self.where = tokenizer, where
        self.special_tokens = special_tokens
        self.chat_template = chat_template
        self._template = compile_template(chat_template) if chat_template else None
        self.has_generation_tags = bool(chat_template and _GENERATION_TAG.search(chat_template))
        self.bos_id = self._id_of("bos_token")
        self.eos_id = self._id_of("eos_token")
        pad = self._id_of("pad_token")
        # Padding never reaches the loss or attention of real tokens; EOS is the usual
        # stand-in for models that define no pad token.
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.stop_ids = frozenset(
            [*([self.eos_id] if self.eos_id is not None else []), *extra_stop_ids]
        )

    def _id_of(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ModelFormatError(
                f"{self.where}: {role} {token!r} is not in the tokenizer's vocabulary"
            )
        return token_id

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFTokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            hint = (
                " (it has tokenizer.model: convert it once with transformers: "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
                if (folder / "tokenizer.model").exists()
                else ""
            )
            raise ModelFormatError(f"{folder}: no tokenizer.json{hint}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ModelFormatError(f"{path}: not a tokenizers file ({exc})") from None
        config = _json(folder / "tokenizer_config.json")
        specials = _special_tokens(config) or _special_tokens(
            _json(folder / "special_tokens_map.json")
        )
        generation = _json(folder / "generation_config.json")
        stop = generation.get("eos_token_id")
        stop_ids = stop if isinstance(stop, list) else [stop] if isinstance(stop, int) else []
        return cls(
            tokenizer,
            special_tokens=specials,
            chat_template=_chat_template(folder, config),
            extra_stop_ids=stop_ids,
            where=str(folder),
        )

    @property
    def stop_strings(self) -> list[str]:
        """The text of each stop token (what a chat template writes to end a turn)."""
        tokens = (self._tok.id_to_token(i) for i in sorted(self.stop_ids))
        return [t for t in tokens if t]

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids; ``add_special_tokens`` applies the tokenizer's own framing (Llama
        adds BOS), as transformers does for plain text."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, *, add_special_tokens: bool = False) -> Encoding:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return Encoding(list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = False,
        track_generation: bool = False,
    ) -> str:
        """The conversation as the model's chat template writes it."""
        if self._template is None:
            raise ModelFormatError(f"{self.where}: the tokenizer has no chat template")
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                track_generation=track_generation,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"the chat template refused the conversation: {exc}") from None

    def generation_spans(self, messages: Sequence[Message]) -> list[tuple[int, int]] | None:
        """Character spans, in :meth:`render`'s text, of the template's
        ``{% generation %}`` blocks; None when the template has none."""
        if not self.has_generation_tags:
            return None
        if any(_OPEN in str(m.get("content")) or _CLOSE in str(m.get("content")) for m in messages):
            return None  # the sentinels would be ambiguous
        marked = self.render(messages, track_generation=True)
        spans, plain, pos = [], 0, 0
        while (start := marked.find(_OPEN, pos)) >= 0:
            end = marked.find(_CLOSE, start)
            if end < 0:
                return None
            plain += start - pos
            length = end - start - 1
            spans.append((plain, plain + length))
            plain += length
            pos = end + 1
        return spans


def _json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    return obj if isinstance(obj, dict) else {}


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(role)
        # Either the token itself or a serialised AddedToken ({"content": ...}).
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[role] = value
    return out


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    template = _json(folder / "chat_template.json").get("chat_template") or config.get(
        "chat_template"
    )
    if isinstance(template, list):  # named templates: the default one is for chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
