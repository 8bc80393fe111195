"""Retrieval metrics over a whole pool: every query ranked against every code of the split."""

from __future__ import annotations

from typing import Sequence

import torch

from .model import collate, embed


@torch.no_grad()
def embed_all(model, ids: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
    """Embeddings in the order of ids; batches are formed by length so little is padding."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = embed(model, collate([ids[i] for i in chunk])).float()
    return out


def ranks(queries: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """1-based rank of query i's own code i among all codes (ties count against it)."""
    sims = queries @ codes.T
    own = sims.diagonal().unsqueeze(1)
    return (sims >= own).sum(1)


def retrieval_metrics(rank: torch.Tensor, k: int = 10) -> dict[str, float]:
    rank = rank.double()
    return {
        f"mrr@{k}": torch.where(rank <= k, 1.0 / rank, torch.zeros_like(rank)).mean().item(),
        "recall@1": (rank == 1).double().mean().item(),
    }


def evaluate(model, query_ids, code_ids, batch_size: int = 64) -> dict[str, float]:
    """MRR@10 and recall@1 of code search over the pool (query i's answer is code i)."""
    was_training = model.training
    model.eval()
    try:
        metrics = retrieval_metrics(ranks(embed_all(model, query_ids, batch_size), embed_all(model, code_ids, batch_size)))
    finally:
        model.train(was_training)
    return {**metrics, "pool": len(query_ids)}
