"""Hugging Face folders in and out: what transformers writes loads here, and what is
written here loads in transformers with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kubetrain.core.hf_config import ModelFormatError
from kubetrain_trainer.hf import weights
from kubetrain_trainer.hf.weights import load_pretrained, local_folder, save_pretrained
from tests.unit.test_hf_model import FAMILIES, reference, tokens

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

TOLERANCE = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _saved(name: str, folder: Path, **kwargs: object) -> transformers.PreTrainedModel:
    ref = reference(name)
    ref.save_pretrained(folder, **kwargs)
    return ref


@pytest.mark.parametrize("name", ["llama3-rope-llama3-tied-gqa", "qwen2-bias-tied", "gpt2-tied"])
def test_loads_sharded_safetensors_with_their_index(tmp_path: Path, name: str) -> None:
    ref = _saved(name, tmp_path, max_shard_size="20KB")
    assert (tmp_path / weights.INDEX_FILE).exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    x = tokens(1, 10)
    with torch.no_grad():
        assert _max_diff(load_pretrained(tmp_path)(x), ref(x).logits) <= TOLERANCE


@pytest.mark.parametrize("shard_bytes", [weights.DEFAULT_MAX_SHARD_BYTES, 16 * 1024])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_saved_folder_reloads_in_transformers_with_the_same_logits(
    tmp_path: Path, name: str, shard_bytes: int
) -> None:
    _saved(name, tmp_path / "in")
    model = load_pretrained(tmp_path / "in")
    with torch.no_grad():
        # Change the weights, as training would, so the test sees what was saved.
        for p in model.parameters():
            p.add_(0.01)
    save_pretrained(
        model.config,
        model.state_dict(),
        tmp_path / "out",
        source=tmp_path / "in",
        max_shard_bytes=shard_bytes,
    )
    assert (tmp_path / "out" / weights.INDEX_FILE).exists() == (shard_bytes < 1024**2)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = tokens(2, FAMILIES[name][2])
    with torch.no_grad():
        assert _max_diff(again(x).logits, model(x)) <= TOLERANCE
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [type(again).__name__]


def test_a_bfloat16_model_is_saved_as_bfloat16(tmp_path: Path) -> None:
    reference("qwen3-qk-norm-head-dim").to(torch.bfloat16).save_pretrained(tmp_path / "in")
    model = load_pretrained(tmp_path / "in")  # float32 for training on the CPU
    assert next(model.parameters()).dtype == torch.float32
    save_pretrained(model.config, model.state_dict(), tmp_path / "out")
    tensors = load_file(tmp_path / "out" / weights.SINGLE_FILE)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_and_generation_config_travel_with_the_model(tmp_path: Path) -> None:
    _saved("qwen2-bias-tied", tmp_path / "in")
    files = {
        "tokenizer.json": "{}",
        "tokenizer_config.json": '{"eos_token": "x"}',
        "chat_template.jinja": "{{ x }}",
    }
    for name, text in files.items():
        (tmp_path / "in" / name).write_text(text)
    generation = json.loads((tmp_path / "in" / "generation_config.json").read_text())
    model = load_pretrained(tmp_path / "in")
    save_pretrained(model.config, model.state_dict(), tmp_path / "out", source=tmp_path / "in")
    for name, text in files.items():
        assert (tmp_path / "out" / name).read_text() == text
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == generation


def test_saving_replaces_a_folder_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    _saved("gpt2-tied", tmp_path / "in")
    model = load_pretrained(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier save")
    save_pretrained(model.config, model.state_dict(), out)
    assert not (out / "stale.txt").exists() and (out / weights.SINGLE_FILE).exists()
    before = sorted(p.name for p in out.iterdir())

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model.config, model.state_dict(), out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    _saved("llama2", tmp_path)
    path = tmp_path / weights.SINGLE_FILE
    tensors = load_file(path)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ModelFormatError) as err:
        load_pretrained(tmp_path)
    message = str(err.value)
    assert "missing tensors model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors model.layers.0.self_attn.extra.weight" in message


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path: Path) -> None:
    _saved("qwen2-bias-tied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelFormatError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), config.json implies"
    ):
        load_pretrained(tmp_path)


def test_original_gpt2_checkpoints_load_without_prefix_and_with_mask_buffers(
    tmp_path: Path,
) -> None:
    ref = _saved("gpt2-untied-layer-scaled", tmp_path)
    path = tmp_path / weights.SINGLE_FILE
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    x = tokens(1, 10)
    with torch.no_grad():
        assert _max_diff(load_pretrained(tmp_path)(x), ref(x).logits) <= TOLERANCE


def test_pytorch_bin_weights_are_refused_with_how_to_convert(tmp_path: Path) -> None:
    _saved("llama2", tmp_path)
    (tmp_path / weights.SINGLE_FILE).rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="must be safetensors") as err:
        load_pretrained(tmp_path)
    assert "pytorch_model.bin" in str(err.value)


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match=r"no config\.json"):
        load_pretrained(tmp_path)


def test_model_folders_come_from_file_and_s3_uris(tmp_path: Path, monkeypatch) -> None:
    import boto3
    from moto import mock_aws

    _saved("gpt2-tied", tmp_path / "model")
    assert local_folder(f"file://{tmp_path / 'model'}", tmp_path / "unused") == tmp_path / "model"
    with pytest.raises(FileNotFoundError, match="no such folder"):
        local_folder(f"file://{tmp_path / 'absent'}", tmp_path / "unused")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    for var in ("AWS_ENDPOINT_URL", "KUBETRAIN_S3_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        for f in (tmp_path / "model").iterdir():
            s3.upload_file(str(f), "models", f"tiny/{f.name}")
        got = local_folder("s3://models/tiny", tmp_path / "download")
        assert sorted(p.name for p in got.iterdir()) == sorted(
            p.name for p in (tmp_path / "model").iterdir()
        )
    with safe_open(got / weights.SINGLE_FILE, framework="pt") as fh:
        assert "transformer.wte.weight" in set(fh.keys())
