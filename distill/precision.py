"""Mixed precision for training against a low-precision parent (docs/design.md §4, §9).

What is trained (BLD candidates, the KD child) keeps fp32 master weights and fp32 AdamW state; its
forward runs under autocast to the parent's dtype, so its matrix products take the parent's bf16/fp16
path and it reads the parent's activations as they are. Losses are reduced in fp32. With an fp32 parent
autocast is off and nothing changes.
"""

from __future__ import annotations

import torch


def compute(dtype: torch.dtype, device: torch.device):
    """The autocast context for a parent of `dtype` on `device` (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))
