"""The next-token objectives, `objective(model, batch) -> (loss, stats)` for the Trainer: pretraining's,
and the one on assistant tokens only (SFT, and sequence-level distillation on teacher answers)."""

from __future__ import annotations

from daulat.data.conversations import IGNORE_INDEX


def next_token_objective(model, batch):
    """Pretraining's objective: (inputs, targets) [B, T] -> model.training_loss (CE + MTP + balance)."""
    inputs, targets = batch
    return model.training_loss(inputs, targets)


def sft_objective(model, batch):
    """(inputs, targets) [B, T], targets -100 off the assistant's tokens -> model.training_loss."""
    inputs, targets = batch
    return model.training_loss(inputs, targets, ignore_index=IGNORE_INDEX)
