"""Tensor parallelism for Qwen3 over a torch.distributed process group (NCCL on GPU, gloo on CPU).

    dist.init_process_group("nccl")                 # one process per GPU (torchrun)
    model = build_qwen3("qwen3-32b", device=f"cuda:{rank}", dtype=torch.bfloat16)   # the same seed on every rank
    shard_qwen3(model)                              # in place: this rank's shard of every layer
    compiled = torch.compile(model, backend="paiton")

Megatron-style, per decoder layer, with TP ranks:
* q/k/v and gate/up are column-parallel: rank r keeps its rows (its query heads and KV heads,
  its slice of the intermediate size), so attention and SwiGLU run on local heads and columns
  with no communication. KV heads are split too (Qwen3-32B has 8: TP up to 8), so each rank's
  KV cache holds its heads only.
* o_proj and down_proj are row-parallel: rank r keeps the input columns that match its heads
  (its intermediate slice) and its product is a partial sum, summed over the ranks by an
  all-reduce (`torch.distributed._functional_collectives.all_reduce`: a node of the compiled
  graph, `_c10d_functional.all_reduce` + `wait_tensor`, which Inductor can schedule and
  Paiton's passes see).
* The lm_head is vocab-parallel: rank r computes the logits of its vocab slice and an
  all-gather joins them, so each rank reads 1/TP of the largest weight; replicated it would
  read all of it every step (Qwen3-32B: 1.5 GB, as much as 12 of a rank's layers at TP 8).
* The embedding table is replicated: a decode step reads only the batch's rows, and a
  vocab-parallel embedding would add a collective per step to save memory a rank has.
The model's config is changed to the per-rank head counts and intermediate size (what
transformers' StaticCache and the bundled loop size their caches from); `config.tp_size`
records the degree.

Every rank must build the same weights (the same seed, or the same checkpoint) before
sharding: each keeps its slices of the full tensors.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist


def init_tensor_parallel(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and return
    (rank, world size). `backend`: "nccl" on GPUs (the default where CUDA is present), "gloo" on
    CPU. `timeout_s` bounds how long a collective waits for a rank that died or hangs: past it,
    the collective raises on the ranks still alive (which then exit with that error) instead of
    every rank waiting forever. NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 unless
    already set (it can take a shared host's GPUs out of service)."""
    import datetime
    import os

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


class RowParallelLinear(torch.nn.Module):
    """y = all_reduce(x_local @ W_local.T): the rank's input columns of a linear, summed over the group."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.group = group
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(torch.nn.functional.linear(x, self.weight), "sum", self.group)


class VocabParallelHead(torch.nn.Module):
    """logits = all_gather(x @ W_vocab_slice.T) along the vocabulary: the rank's rows of the lm_head."""

    def __init__(self, weight: torch.Tensor, group, parts: int):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.group, self.parts = group, parts

    def forward(self, x):
        import torch.distributed._functional_collectives as funcol

        local = torch.nn.functional.linear(x, self.weight)
        # Gathered along dim 0, then the ranks' blocks side by side: torch 2.11's all_gather_tensor
        # does that rearranging itself for another gather_dim, in a helper Dynamo refuses to trace
        # (`_maybe_view_chunk_cat`, "marked as skipped"), so a compiled TP model failed there.
        gathered = funcol.all_gather_tensor(local.contiguous(), gather_dim=0, group=self.group)
        return torch.cat(torch.chunk(gathered, self.parts, dim=0), dim=-1)


def _rows(weight: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    size = weight.shape[0] // parts
    return weight[rank * size:(rank + 1) * size].clone()


def _columns(weight: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    size = weight.shape[1] // parts
    return weight[:, rank * size:(rank + 1) * size].contiguous()


def check_divisible(config, tp: int) -> None:
    """A ValueError naming what TP `tp` cannot split evenly."""
    needs = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}
    if bad := {name: value for name, value in needs.items() if value % tp}:
        raise ValueError(f"tensor parallel degree {tp} must divide {', '.join(f'{k}={v}' for k, v in bad.items())}")


@torch.no_grad()
def shard_qwen3(model: torch.nn.Module, group=None) -> torch.nn.Module:
    """Shard `model` (a transformers Qwen3ForCausalLM, the same weights on every rank) in place
    over `group` (default: the world); see the module docstring. Returns `model`."""
    group = group if group is not None else dist.group.WORLD  # the functional collectives take a group, not None
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    config = model.config
    if getattr(config, "tp_size", 1) != 1:
        raise ValueError(f"the model is sharded already (tp_size {config.tp_size})")
    check_divisible(config, tp)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(attention, name)
            if linear.bias is not None:
                raise ValueError("shard_qwen3 takes Qwen3's bias-free projections")
            linear.weight = torch.nn.Parameter(_rows(linear.weight, rank, tp), requires_grad=False)
            linear.out_features = linear.weight.shape[0]
        attention.o_proj = RowParallelLinear(_columns(attention.o_proj.weight, rank, tp), group)
        for name in ("gate_proj", "up_proj"):
            linear = getattr(mlp, name)
            linear.weight = torch.nn.Parameter(_rows(linear.weight, rank, tp), requires_grad=False)
            linear.out_features = linear.weight.shape[0]
        mlp.down_proj = RowParallelLinear(_columns(mlp.down_proj.weight, rank, tp), group)
    head = model.lm_head.weight
    if head is model.model.embed_tokens.weight:  # tied: the embedding keeps the whole table
        head = head.detach()
    model.lm_head = VocabParallelHead(_rows(head, rank, tp), group, tp)
    sharded = copy.copy(config)  # the per-rank sizes (caches are sized from them)
    sharded.num_attention_heads = config.num_attention_heads // tp
    sharded.num_key_value_heads = config.num_key_value_heads // tp
    sharded.intermediate_size = config.intermediate_size // tp
    sharded.head_dim = head_dim
    sharded.tp_size, sharded.tp_rank = tp, rank
    model.config = sharded
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = sharded
    return model
