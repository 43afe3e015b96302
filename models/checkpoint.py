"""Load a Qwen3 from a local Hugging Face-format directory: config.json plus one or several
`.safetensors` files (with `model.safetensors.index.json` when sharded), onto a device, in a
dtype. No network: nothing is downloaded, a tokenizer is used only when the directory has one.

    model, tokenizer = load_qwen3_checkpoint("/models/Qwen3-8B", device="cuda", dtype=torch.bfloat16)

The model is built on the meta device (no memory, no random init) and each tensor is read
straight to the target device by safetensors, so a 32B checkpoint needs no CPU copy of the
weights. Only safetensors are read: pickle checkpoints (`pytorch_model.bin`, `*.pt`) can run
code when loaded and are refused. Every problem is an error that names the file or tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A local checkpoint that cannot be loaded as a Qwen3; the message names the file or tensor."""


def read_qwen3_config(directory: str | Path):
    from transformers import Qwen3Config

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (a Hugging Face checkpoint directory has a config.json)")
    try:
        fields = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error})") from None
    model_type = fields.get("model_type")
    if model_type != "qwen3":
        raise CheckpointError(
            f"{config_path}: model_type is {model_type!r}, not 'qwen3'; Paiton loads Qwen3 dense checkpoints"
        )
    config = Qwen3Config.from_dict(fields)
    config._attn_implementation = "sdpa"
    return config


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: from the index when sharded, else model.safetensors."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map: {error})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / SINGLE_FILE).is_file():
        files = [directory / SINGLE_FILE]
    else:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{directory}: only pickle weights ({', '.join(pickles)}); Paiton reads safetensors only, because "
                "loading a pickle can run arbitrary code. Convert them once in a trusted environment, e.g. "
                "Qwen3ForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{directory}: no {SINGLE_FILE} and no {INDEX_FILE}")
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
    return files


def load_qwen3_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                          tokenizer: bool = True):
    """(model in eval mode, tokenizer or None). `dtype` None keeps the checkpoint's dtype."""
    from safetensors import safe_open
    from transformers import Qwen3ForCausalLM

    directory = Path(directory)
    config = read_qwen3_config(directory)
    files = safetensors_files(directory)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    expected = {name: tensor for name, tensor in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state, origin = {}, {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device=str(torch.device(device)))
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        with handle:
            for name in handle.keys():
                if name not in expected:
                    raise CheckpointError(f"{path}: tensor {name!r} is not a parameter of Qwen3ForCausalLM")
                if name in state:
                    raise CheckpointError(f"{path}: tensor {name!r} also in {origin[name]}")
                tensor = handle.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                        f"{tuple(expected[name].shape)}"
                    )
                state[name] = tensor.to(dtype) if dtype is not None else tensor
                origin[name] = path.name
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if tied else set()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: tensors missing from the safetensors files: {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    # The rotary module's buffers are not in checkpoints and are still on meta: build it anew
    # on the device (its constructor computes inv_freq from the config).
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    with torch.device(device):  # (its constructor takes no device in every transformers 5.x)
        model.model.rotary_emb = Qwen3RotaryEmbedding(config)
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{directory}: not loaded, still without values: {leftover[:5]}")
    model.eval()
    return model, (_local_tokenizer(directory) if tokenizer else None)


def _local_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
