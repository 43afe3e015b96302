"""Load a Qwen3 from a local Hugging Face-format directory: config.json plus one or several
`.safetensors` files (with `model.safetensors.index.json` when sharded), onto a device, in a
dtype. No network: nothing is downloaded, a tokenizer is used only when the directory has one.
FP8 checkpoints (float8_e4m3fn weights with `weight_scale` per channel or `weight_scale_inv` per
128 x 128 block) load as FP8: their linears become models/fp8.Fp8Linear.

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
    fp8_scales: dict[str, torch.Tensor] = {}  # linear's prefix -> its weight's scales (FP8 checkpoints)
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device=str(torch.device(device)))
        except Exception as error:  # safetensors raises its own error types for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        with handle:
            for name in handle.keys():
                prefix, _, leaf = name.rpartition(".")
                if leaf in FP8_SCALE_NAMES and f"{prefix}.weight" in expected:
                    if prefix in fp8_scales:
                        raise CheckpointError(f"{path}: two scale tensors for {prefix}.weight")
                    scale = handle.get_tensor(name).to(torch.float32)
                    if leaf == "weight_scale" and scale.dim() == 2 and scale.shape[1] == 1:
                        scale = scale.reshape(-1)  # [N, 1]: per channel ("weight_scale_inv" is per block)
                    fp8_scales[prefix] = scale
                    origin[name] = path.name
                    continue
                if leaf in FP8_IGNORED_NAMES and f"{prefix}.weight" in expected:
                    continue  # a static activation scale: Paiton's FP8 is weight-only (activations stay bf16)
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
                fp8 = tensor.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
                state[name] = tensor.to(dtype) if dtype is not None and not fp8 else tensor
                origin[name] = path.name
    missing = sorted(set(expected) - set(state) - ({"lm_head.weight"} if tied else set()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: tensors missing from the safetensors files: {shown}")
    _fp8_linears(model, state, fp8_scales, directory, device)
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


# FP8 checkpoints (Qwen's own *-FP8 releases, DeepSeek's layout): `<linear>.weight` in
# float8_e4m3fn with `<linear>.weight_scale_inv` [ceil(N / 128), ceil(K / 128)], the factor of
# each 128 x 128 block (W = W8 * scale_inv, despite the name); compressed-tensors releases:
# `<linear>.weight_scale` [N, 1] (per channel) and, with static activation scales,
# `<linear>.input_scale`, which weight-only FP8 does not use.
FP8_SCALE_NAMES = ("weight_scale_inv", "weight_scale")
FP8_IGNORED_NAMES = ("input_scale",)


def _fp8_linears(model, state: dict, scales: dict, directory: Path, device) -> None:
    """Replace each linear whose checkpoint weight is FP8 by an Fp8Linear of that weight and its
    scales (converted to e4m3fnuz where the chip computes in it: the MI300X)."""
    from paiton.fusion.gemv import scales_kind
    from paiton.models.fp8 import Fp8Linear, fp8_format

    fp8_names = [name for name, t in state.items() if t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz)]
    for name in fp8_names:
        prefix = name.removesuffix(".weight")
        if prefix not in scales:
            raise CheckpointError(f"{directory}: {name} is FP8 but has no weight_scale or weight_scale_inv")
    if stray := sorted(set(scales) - {name.removesuffix(".weight") for name in fp8_names}):
        raise CheckpointError(f"{directory}: scales for weights that are not FP8: {stray[:3]}")
    if not fp8_names:
        return
    chip_format = fp8_format(device)
    for name in fp8_names:
        prefix = name.removesuffix(".weight")
        weight, scale = state.pop(name), scales[prefix]
        if weight.dtype != chip_format:
            weight, scale = convert_fp8(weight, scale, chip_format)
        parent, _, attribute = prefix.rpartition(".")
        module = model.get_submodule(parent) if parent else model
        if not isinstance(getattr(module, attribute, None), torch.nn.Linear):
            raise CheckpointError(f"{directory}: {name} is FP8 but {prefix} is not a linear layer")
        try:
            scales_kind(weight, scale)  # per channel [N] or per 128 x 128 block: what the op takes
        except ValueError as error:
            raise CheckpointError(f"{directory}: {prefix}: {error}") from None
        setattr(module, attribute, Fp8Linear(weight, scale.contiguous()))


def convert_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An e4m3fn weight as e4m3fnuz with the same dequantized values: the same bits are worth half
    as much in e4m3fnuz (its exponent bias is one more), so the scales double; e4m3fn's negative
    zero (0x80) is e4m3fnuz's NaN and becomes zero. (And e4m3fnuz to e4m3fn, by value.)"""
    if weight.dtype == dtype:
        return weight, scale
    bits = weight.view(torch.uint8)
    if dtype == torch.float8_e4m3fnuz and weight.dtype == torch.float8_e4m3fn:
        bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
        return bits.view(dtype), scale * 2
    if dtype == torch.float8_e4m3fn and weight.dtype == torch.float8_e4m3fnuz:
        # By value: every e4m3fnuz value (up to 240) is an e4m3fn value, but its bits would
        # read as NaN at the top (0x7F), and its smallest subnormal rounds.
        return weight.float().to(dtype), scale
    raise ValueError(f"no conversion from {weight.dtype} to {dtype}")


def _local_tokenizer(directory: Path):
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
