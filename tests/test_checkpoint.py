"""Loading a Qwen3 from a local safetensors checkpoint that the test writes (tiny model):
weights and logits equal, single-file and sharded, tied embeddings, dtype conversion as
transformers' from_pretrained does it, and a clear error for each way a directory can be wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from paiton.models.checkpoint import CheckpointError, load_qwen3_checkpoint
from paiton.models.qwen3 import build_qwen3


def saved(tmp_path, shard=None, **overrides):
    model = build_qwen3("tiny", dtype=torch.float32, **overrides)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    return model


@pytest.mark.parametrize("shard", [None, "50KB"])
@pytest.mark.parametrize("tied", [False, True])
def test_weights_and_logits_equal(tmp_path, shard, tied):
    model = saved(tmp_path, shard, tie_word_embeddings=tied)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    loaded, tokenizer = load_qwen3_checkpoint(tmp_path)
    assert tokenizer is None  # the directory has no tokenizer files
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[name], reloaded[name]) for name in original)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_dtype_as_transformers_loads_it(tmp_path):
    from transformers import Qwen3ForCausalLM

    saved(tmp_path)
    loaded, _ = load_qwen3_checkpoint(tmp_path, dtype=torch.bfloat16)
    reference = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ids = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_qwen3_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_qwen3_checkpoint(tmp_path)


def test_not_a_qwen3(tmp_path):
    saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama', not 'qwen3'"):
        load_qwen3_checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    model = saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        load_qwen3_checkpoint(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    saved(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensors missing from the safetensors files: {name}"):
        load_qwen3_checkpoint(tmp_path)
    save_file({**tensors, name: tensors[name][:, :3].contiguous()}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' has shape \(96, 3\), config.json implies \(96, 160\)"):
        load_qwen3_checkpoint(tmp_path)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'extra.weight' is not a parameter of Qwen3ForCausalLM"):
        load_qwen3_checkpoint(tmp_path)


def test_a_shard_listed_in_the_index_but_missing(tmp_path):
    saved(tmp_path, "50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing}: listed in model.safetensors.index.json but missing"):
        load_qwen3_checkpoint(tmp_path)


def test_a_local_tokenizer_is_loaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    saved(tmp_path)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path)
    _, tokenizer = load_qwen3_checkpoint(tmp_path)
    assert tokenizer("hello world").input_ids == [1, 2]
    assert load_qwen3_checkpoint(tmp_path, tokenizer=False)[1] is None
