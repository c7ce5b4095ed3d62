"""Hugging Face models in and out: the families kubetrain fine-tunes, their tokenizers
and chat data.

- ``kubetrain.core.hf_config`` (shared with the estimate): ``config.json`` ->
  ``ModelConfig``; parameter count and FLOPs (no torch).
- ``model``: native PyTorch Llama-family and GPT-2 models (why native: that module's
  docstring), packed-sequence attention, KV cache.
- ``rope``: rotary embeddings with Llama 3, linear, dynamic and YaRN scaling.
- ``weights``: safetensors folders in (single or sharded) and out.
- ``tokenizer``: ``tokenizer.json`` and the chat template, without transformers.
- ``examples``, ``records``: rows of JSONL/Parquet to token ids with loss masks.
- ``packing``: examples into packed rows (document ids, restarting positions) and DPO pairs.
- ``generate``: greedy generation with the KV cache.
- ``source``, ``stage``, ``datasets``, ``evaluation``: what a training stage uses: where
  the model comes from and its local copy, the model and tokenizer loaded, the stage's
  batches and held-out set, held-out metrics.
"""
