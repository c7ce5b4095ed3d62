"""Hugging Face models in and out: the families kubetrain fine-tunes, their tokenizers
and chat data.

- ``config``: ``config.json`` -> :class:`ModelConfig`; parameter count and FLOPs (no torch).
- ``tokenizer``: ``tokenizer.json`` and the chat template, without transformers.
- ``examples``, ``records``: rows of JSONL/Parquet to token ids with loss masks.
"""
