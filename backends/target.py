"""The chip Paiton compiles for: one small value read from torch's device properties.

    detect_target("cuda:0")   # Target(vendor='cuda', arch='sm_90', warp_size=32, multiprocessors=132, ...)
    target_named("gfx942")    # the MI300X preset: no hardware needed (tests, ahead-of-time builds)

The lowering tables (lowering.py) are keyed by `arch`; the other fields size launches (the
warp or wavefront width, how many programs fill the chip, how much shared memory a program
may use). A compile can name a target with the backend option `paiton.target` (options.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

VENDORS = ("cuda", "hip", "cpu")


@dataclass(frozen=True)
class Target:
    vendor: str  # "cuda" (NVIDIA), "hip" (AMD ROCm) or "cpu"
    arch: str  # "sm_90", "gfx942", ... ("cpu" for the CPU)
    warp_size: int  # threads per warp (NVIDIA, AMD RDNA: 32) or wavefront (AMD CDNA: 64)
    multiprocessors: int  # SMs (NVIDIA) or compute units (AMD)
    # The most shared memory (NVIDIA) or LDS (AMD) one program may use, in bytes: a kernel
    # that asks for more fails at launch.
    shared_memory_per_block: int
    name: str = ""  # the chip, for messages: torch's device name, or the preset's chips

    def __post_init__(self):
        if self.vendor not in VENDORS:
            raise ValueError(f"Target vendor must be one of {VENDORS}, got {self.vendor!r}")

    @property
    def is_gpu(self) -> bool:
        return self.vendor != "cpu"

    @property
    def compute_capability(self) -> int:
        """NVIDIA's compute capability as one number ("sm_90" -> 90); 0 for other vendors."""
        digits = "".join(c for c in self.arch if c.isdigit())
        return int(digits) if self.vendor == "cuda" and digits else 0

    def triton_target(self):
        """Triton's `GPUTarget` for an ahead-of-time `triton.compile` for this chip."""
        from triton.backends.compiler import GPUTarget

        if self.vendor == "cuda":
            return GPUTarget("cuda", self.compute_capability, self.warp_size)
        if self.vendor == "hip":
            return GPUTarget("hip", self.arch, self.warp_size)
        raise ValueError(f"{self.arch} is not a GPU: Triton compiles its kernels for CUDA and ROCm chips only")


# Published figures of the chips Paiton has lowering tables for. Shared memory: the opt-in
# maximum per block on NVIDIA (the SM's shared memory less 1 KB the driver reserves per block),
# the LDS per workgroup on AMD.
TARGET_PRESETS: dict[str, Target] = {
    "sm_80": Target("cuda", "sm_80", 32, 108, 166_912, "NVIDIA A100"),
    "sm_90": Target("cuda", "sm_90", 32, 132, 232_448, "NVIDIA H100 / H200 (SXM)"),
    "sm_100": Target("cuda", "sm_100", 32, 148, 232_448, "NVIDIA B200"),
    "gfx90a": Target("hip", "gfx90a", 64, 110, 65_536, "AMD Instinct MI250X (one die)"),
    "gfx942": Target("hip", "gfx942", 64, 304, 65_536, "AMD Instinct MI300X"),
    "gfx950": Target("hip", "gfx950", 64, 256, 163_840, "AMD Instinct MI355X"),
    # The CPU runs each op's reference code, or the Triton kernel in Triton's interpreter (CI):
    # the interpreter's launches are sized as for one 32-wide warp scheduler.
    "cpu": Target("cpu", "cpu", 32, 1, 0, "CPU"),
}
CPU = TARGET_PRESETS["cpu"]


def target_named(name: str) -> Target:
    """The preset called `name`; an error that lists the presets otherwise."""
    try:
        return TARGET_PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown target {name!r}; known targets are {sorted(TARGET_PRESETS)}") from None


def detect_target(device: torch.device | str | int | None = None) -> Target:
    """The target of `device` (default: the current GPU if there is one, else the CPU)."""
    if device is None:
        if not torch.cuda.is_available():
            return CPU
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda":  # ROCm GPUs are "cuda" devices in torch too
        return CPU
    if device.index is not None:
        return _gpu_target(device.index)
    return _gpu_target(torch.cuda.current_device() if torch.cuda.is_available() else 0)


@functools.cache
def _gpu_target(device_index: int) -> Target:
    if not torch.cuda.is_available():
        # A GPU device without a GPU: fake tensors (tests), or a compile on a machine without
        # the hardware. An arch no table has, so the lowering gets the vendor's safe defaults.
        hip = torch.version.hip is not None
        return Target("hip" if hip else "cuda", "unknown", 64 if hip else 32, 1, 48 * 1024, "no GPU visible")
    props = torch.cuda.get_device_properties(device_index)
    if torch.version.hip is not None:
        return Target(
            vendor="hip",
            arch=props.gcnArchName.split(":")[0],  # "gfx942:sramecc+:xnack-" -> "gfx942"
            warp_size=getattr(props, "warp_size", 64),
            multiprocessors=props.multi_processor_count,
            shared_memory_per_block=props.shared_memory_per_block,
            name=props.name,
        )
    # torch reports the default 48 KB per block; a kernel may opt in to the SM's shared memory
    # less the 1 KB the driver keeps per block (sm_80 and later), as Triton's launches do.
    per_block = max(props.shared_memory_per_block, props.shared_memory_per_multiprocessor - 1024)
    return Target(
        vendor="cuda",
        arch=f"sm_{props.major}{props.minor}",
        warp_size=getattr(props, "warp_size", 32),
        multiprocessors=props.multi_processor_count,
        shared_memory_per_block=per_block,
        name=props.name,
    )


def target_of_inputs(example_inputs) -> Target:
    """The target a graph with these inputs runs on: the GPU of its first GPU tensor, else the CPU."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return detect_target(value.device)
    return CPU
