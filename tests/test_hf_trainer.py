"""GMTAdamW under the Hugging Face Trainer (the README's recipe) on a tiny random BERT, no download.

Trainer builds the optimizer from optimizer_cls_and_kwargs, accumulates gradients over 2 micro-batches,
clips them to max_grad_norm, steps GMTAdamW (whose mask is then taken on that accumulated, clipped
gradient) and the cosine schedule, saves checkpoints; a run resumed from the middle checkpoint must
end exactly where the uninterrupted run ends. transformers comes with requirements-dev.txt: missing,
this module fails to import rather than skip.
"""

import os

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from gmt_kernels import GMTAdamW

MASK_RATIO = 0.5  # exact in binary: k = N - N // 2 kept entries


class Synthetic(Dataset):
    def __init__(self, n=64, length=8, vocab=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 1] > self.ids[:, 2]).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=16, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8, max_position_embeddings=8, type_vocab_size=1, num_labels=2)
    return BertForSequenceClassification(config)  # about 300 parameters, dropout 0.1 left on


class CheckMaskInput(TrainerCallback):
    """At each optimizer step: the gradient GMTAdamW receives is already clipped, and the threshold it
    reports is the exact k-th largest |g| of that gradient (computed here with kthvalue)."""

    def __init__(self, max_norm):
        self.max_norm, self.expected, self.checked = max_norm, None, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
        scores = torch.cat(grads).abs()
        assert torch.linalg.vector_norm(scores) <= self.max_norm * (1 + 1e-5)
        k = scores.numel() - scores.numel() // 2
        self.expected = torch.kthvalue(scores, scores.numel() - k + 1).values.item()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        gmt = optimizer.optimizer  # Trainer wraps it in accelerate's AcceleratedOptimizer
        assert gmt.mask_stats()["global"]["threshold"] == self.expected
        self.checked += 1


def make_trainer(out_dir, callbacks=()):
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        max_grad_norm=0.05, learning_rate=3e-2, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
        save_strategy="steps", save_steps=4, logging_steps=1, report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    # Trainer hands GMTAdamW its two param groups (decay / no decay) with weight_decay set per group;
    # lr must be in the kwargs (Trainer's learning_rate is not passed to a class given this way).
    opt = (GMTAdamW, {"lr": args.learning_rate, "mask_ratio": MASK_RATIO, "threshold": "exact"})
    return Trainer(model=tiny_bert(), args=args, train_dataset=Synthetic(), optimizer_cls_and_kwargs=opt,
                   callbacks=list(callbacks))


def test_trainer_accumulates_clips_masks_and_resumes_exactly(tmp_path):
    check = CheckMaskInput(max_norm=0.05)
    full = make_trainer(tmp_path, [check])
    full.train()
    assert isinstance(full.optimizer.optimizer, GMTAdamW) and check.checked == 8
    assert full.lr_scheduler.get_last_lr()[0] == 0.0  # cosine to zero at max_steps
    end = {n: p.detach().clone() for n, p in full.model.named_parameters()}
    assert any(not torch.equal(end[n], p) for n, p in tiny_bert().named_parameters())  # it trained

    checkpoint = tmp_path / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    # GMT's own state travels in the checkpoint, in every param group
    assert all("skipped_steps" in group["gmt"] for group in saved["param_groups"])

    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 8
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, end[n]), f"{n} differs after resuming"
    a, b = full.optimizer.optimizer, resumed.optimizer.optimizer
    for pa, pb in zip(a.param_groups[0]["params"] + a.param_groups[1]["params"],
                      b.param_groups[0]["params"] + b.param_groups[1]["params"]):
        sa, sb = a.state[pa], b.state[pb]
        assert torch.equal(sa["step"], sb["step"]) and sa["step"].item() == 8
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a.mask_stats() == b.mask_stats() and int(a.skipped_steps) == int(b.skipped_steps) == 0
    assert os.path.isdir(tmp_path / "resumed" / "checkpoint-8")
