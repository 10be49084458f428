"""Datasheet figures of GPUs the analytic (roofline) cost model can target.

Dense tensor-core throughput (no structured sparsity) and HBM/GDDR bandwidth, from the vendors'
public datasheets:
- H100 SXM5, H200 SXM: NVIDIA H100 and H200 Tensor Core GPU datasheets (2023, 2024).
- A100 80GB SXM: NVIDIA A100 Tensor Core GPU datasheet (2021); no FP8 support.
- L40S: NVIDIA L40S datasheet (2023).
- B200: NVIDIA Blackwell/DGX B200 datasheet (2024), per GPU.
- RTX 4090: NVIDIA Ada Lovelace GPU architecture whitepaper v1.0 (2022), GeForce RTX 4090 column.
"""

from __future__ import annotations

from dataclasses import dataclass

from puzzle.errors import PuzzleError


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_tflops: float  # dense
    fp8_tflops: float | None  # dense; None where the GPU has no FP8 tensor cores
    memory_bandwidth_gbs: float
    memory_gib: float

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s for matrix products with weights of `dtype`."""
        if dtype == "fp8":
            if self.fp8_tflops is None:
                raise PuzzleError(f"{self.name} has no FP8 tensor cores; choose profile.weight_dtype bfloat16")
            return self.fp8_tflops * 1e12
        if dtype == "float32":
            return self.bf16_tflops * 1e12 / 2  # TF32 tensor-core rate, half of BF16 on these parts
        return self.bf16_tflops * 1e12

    @property
    def bandwidth(self) -> float:
        return self.memory_bandwidth_gbs * 1e9


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("h100", bf16_tflops=989.0, fp8_tflops=1979.0, memory_bandwidth_gbs=3350.0, memory_gib=80),
        GpuSpec("h200", bf16_tflops=989.0, fp8_tflops=1979.0, memory_bandwidth_gbs=4800.0, memory_gib=141),
        GpuSpec("a100", bf16_tflops=312.0, fp8_tflops=None, memory_bandwidth_gbs=2039.0, memory_gib=80),
        GpuSpec("l40s", bf16_tflops=362.05, fp8_tflops=733.0, memory_bandwidth_gbs=864.0, memory_gib=48),
        GpuSpec("b200", bf16_tflops=2250.0, fp8_tflops=4500.0, memory_bandwidth_gbs=8000.0, memory_gib=180),
        GpuSpec("rtx4090", bf16_tflops=165.2, fp8_tflops=330.3, memory_bandwidth_gbs=1008.0, memory_gib=24),
    )
}
ALIASES = {"h100-sxm": "h100", "h100_sxm": "h100", "a100-80gb": "a100", "a100_80gb": "a100", "4090": "rtx4090"}


def gpu(name: str) -> GpuSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise PuzzleError(f"unknown device {name!r}; known: local, {', '.join(GPUS)}")
    return GPUS[key]
