"""Reshaping attention heads, for the initializations of every family (dense and hybrid)."""

from __future__ import annotations

import torch

from puzzle.errors import PuzzleError


def mean_pool_kv_heads(weight: torch.Tensor, heads: int, new_heads: int, head_dim: int) -> torch.Tensor:
    """[heads·head_dim, …] → [new_heads·head_dim, …]: consecutive heads averaged in groups.

    Consecutive grouping keeps each query head with the merged head of its old KV head, since query
    head h uses KV head h // (num_attention_heads / num_key_value_heads).
    """
    if heads % new_heads:
        raise PuzzleError(f"{new_heads} KV heads do not divide the parent's {heads}")
    rest = weight.shape[1:]
    return weight.reshape(new_heads, heads // new_heads, head_dim, *rest).mean(1).reshape(new_heads * head_dim, *rest)


def expand_kv_heads(weight: torch.Tensor, kv_heads: int, query_heads: int, head_dim: int) -> torch.Tensor:
    """[kv·head_dim, …] → [query_heads·head_dim, …], each KV head repeated for the queries that use it."""
    rest = weight.shape[1:]
    per = query_heads // kv_heads
    return weight.reshape(kv_heads, 1, head_dim, *rest).expand(kv_heads, per, head_dim, *rest).reshape(-1, *rest)
