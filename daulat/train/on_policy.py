"""On-policy batches: the student answers prompts as it is now, for on-policy (reverse-KL) distillation.

Each batch: `batch_size` prompts, walked by the resumable `EpochCursor` of daulat/data/conversations.py,
answered by the live student with the engine, as {"input_ids" [B, L], "mask" [B, L-1], "stopped" [B],
("correct" [B] where the task has a checker)}. The source binds to the Trainer (`bind(trainer)`) and
samples with `trainer.model`, the very model being trained.
"""

from __future__ import annotations

import torch

from daulat.data.conversations import EpochCursor
from daulat.errors import DaulatError
from daulat.generation import Sampling, make_engine
from daulat.infer.engine.sequence import FINISH_STOP


class OnPolicyBatches:
    """prompts: daulat.train.teacher_data.Prompt each (their messages are rendered with a generation
    prompt); sampling: how the student answers; max_len: the context the answers must fit in."""

    def __init__(self, prompts: list, tokenizer, batch_size: int, sampling: Sampling, *, max_len: int = 1024,
                 task=None, seed: int = 0):
        if not prompts:
            raise DaulatError("no prompts for the student to answer")
        self.prompts, self.tokenizer, self.batch_size, self.task = prompts, tokenizer, batch_size, task
        self.ids = [tokenizer.render_chat(p.messages, add_generation_prompt=True)[0] for p in prompts]
        longest = max(len(i) for i in self.ids)
        if longest >= max_len:
            raise DaulatError(f"a prompt has {longest} tokens, which leaves no room for an answer in the "
                              f"{max_len}-token context")
        self.sampling = sampling
        self.max_len = min(max_len, longest + sampling.max_tokens + 1)
        self.cursor = EpochCursor(len(prompts), seed, what="prompts")
        self.model, self._engine = None, None

    def bind(self, trainer) -> None:
        """The Trainer's seam: answer with its live model."""
        self.model, self._engine = trainer.model, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.model is None:
            raise RuntimeError("OnPolicyBatches is not bound to a Trainer (bind(trainer)) nor given a model")
        picked = self.cursor.take(self.batch_size)
        was_training = self.model.training  # the engine puts the model in eval mode
        try:
            if self._engine is None:
                self._engine = make_engine(self.model, self.tokenizer, sequences=self.batch_size, context=self.max_len)
            params = [self.sampling.params(seed=draw % 2**62, max_tokens=min(self.sampling.max_tokens,
                                                                              self.max_len - len(self.ids[i])))
                      for i, draw in picked]
            results = self._engine.generate([self.ids[i] for i, _ in picked], params)
        finally:
            self.model.train(was_training)
        return self._batch([i for i, _ in picked], results)

    def _batch(self, picked: list[int], results) -> dict:
        rows = [self.ids[i] + r.token_ids for i, r in zip(picked, results)]
        L = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), L), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L - 1)
        for b, (i, row) in enumerate(zip(picked, rows)):
            input_ids[b, : len(row)] = torch.tensor(row)
            mask[b, len(self.ids[i]) - 1 : len(row) - 1] = 1.0  # positions that predict an answer token
        batch = {"input_ids": input_ids, "mask": mask,
                 "stopped": torch.tensor([float(r.finish_reason == FINISH_STOP) for r in results])}
        if self.task is not None:
            batch["correct"] = torch.tensor([float(self.task.check(r.text, self.prompts[i].example))
                                             for i, r in zip(picked, results)])
        return batch

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)
