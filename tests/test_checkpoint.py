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


def fp8_checkpoint(tmp_path, layout):
    """A tiny Qwen3 saved as public FP8 checkpoints hold it: every decoder linear's weight in
    float8_e4m3fn with `weight_scale` [N, 1] (per channel, compressed-tensors) or
    `weight_scale_inv` [ceil(N / 128), ceil(K / 128)] (per block, Qwen's *-FP8 and DeepSeek's);
    the rest in fp32. Returns (directory, the fp32 model whose weights are the dequantized ones)."""
    from paiton.fusion.fp8_linear import dequantize, quantize_weight

    model = build_qwen3("tiny", dtype=torch.float32, seed=4)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name in [n for n in state if ".layers." in n and n.endswith("_proj.weight")]:
        w8, scales = quantize_weight(state[name])
        if layout == "block":
            scales = torch.rand(-(-w8.shape[0] // 128), -(-w8.shape[1] // 128), generator=generator) * 1e-3 + 1e-4
            state[name.removesuffix("weight") + "weight_scale_inv"] = scales
        else:
            state[name.removesuffix("weight") + "weight_scale"] = scales[:, None].contiguous()
            state[name.removesuffix("weight") + "input_scale"] = torch.tensor(1.0)  # static activation scale: unused
        state[name] = w8
        model.get_parameter(name).data = dequantize(w8, scales, torch.float32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]} if layout == "block" else
                                     {"quant_method": "compressed-tensors", "format": "float-quantized"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, model


@pytest.mark.parametrize("layout", ["channel", "block"])
def test_fp8_checkpoints_load_as_fp8_linears(tmp_path, layout):
    from paiton.models.fp8 import Fp8Linear

    directory, reference = fp8_checkpoint(tmp_path, layout)
    loaded, _ = load_qwen3_checkpoint(directory)
    fp8 = {name: m for name, m in loaded.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == 7 * loaded.config.num_hidden_layers
    q = fp8["model.layers.0.self_attn.q_proj"]
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale.dim() == (2 if layout == "block" else 1)
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():  # several rows: the FP8 linear dequantizes as the reference's weights were made
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_errors_name_the_tensor(tmp_path):
    directory, _ = fp8_checkpoint(tmp_path, "channel")
    state = load_file(directory / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj.weight is FP8 but has no weight_scale"):
        load_qwen3_checkpoint(directory)
    state["model.layers.0.mlp.up_proj.weight_scale"] = torch.ones(7, 1)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"up_proj: paiton gemv: scales for W \[160, 96\]"):
        load_qwen3_checkpoint(directory)


def test_e4m3fn_to_e4m3fnuz_keeps_the_values():
    """The MI300X's format: the same bits worth half, the scales doubled; negative zero to zero."""
    from paiton.fusion.fp8_linear import dequantize, quantize_weight
    from paiton.models.checkpoint import convert_fp8

    w8, scales = quantize_weight(torch.randn(64, 96) * 0.1)
    w8.view(torch.uint8)[0, 0] = 0x80  # e4m3fn's -0
    fnuz, fnuz_scales = convert_fp8(w8, scales, torch.float8_e4m3fnuz)
    assert fnuz.dtype == torch.float8_e4m3fnuz and not torch.isnan(fnuz.float()).any()
    assert torch.equal(dequantize(fnuz, fnuz_scales, torch.float32), dequantize(w8, scales, torch.float32))
