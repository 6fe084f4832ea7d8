"""How the training stages generate: one sampling-settings type and one engine factory.

GRPO's rollouts, the distillation teacher's answers, the on-policy student's answers and the
speedrun's pass@k all sample with the same four settings. `Sampling` is that one type, nested in
every stage config that samples (`[grpo.sampling]`, `[distill.teacher_sampling]`,
`[distill.student_sampling]`, `[speedrun.eval_sampling]`), and `Sampling.params` is the one place
where it becomes the engine's `SamplingParams`. `make_engine` builds the inference engine a stage
generates with, sized for its batch and its longest sequence.

Nothing here imports torch until an engine is made, so that configs load fast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Sampling:
    """How a model samples an answer (a config sub-table: `grpo.sampling.temperature=0.8`)."""

    temperature: float = 1.0  # 0: greedy; otherwise logits / temperature before top-k and top-p
    top_p: float = 1.0  # keep the smallest set of likeliest tokens whose probability reaches top_p (1: off)
    top_k: int = 0  # keep the k likeliest tokens (0: off)
    max_tokens: int = 256  # answer length limit; an answer cut there finishes with "length"

    def __post_init__(self):
        def need(ok, name, why):
            if not ok:
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: {why}")

        need(0 <= self.temperature <= 100, "temperature", "must be between 0 and 100")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.top_k >= 0, "top_k", "must not be negative")
        need(self.max_tokens >= 1, "max_tokens", "must be at least 1")

    def params(self, *, n: int = 1, seed: int | None = None, max_tokens: int | None = None):
        """The engine's SamplingParams: `n` samples sharing one prefill, a per-request `seed`, and at
        most `max_tokens` new tokens (default: this type's; a caller lowers it to fit a context)."""
        from daulat.infer import SamplingParams

        return SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_tokens=self.max_tokens if max_tokens is None else max_tokens, seed=seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleRequest:
    """What a teacher is asked for: `n` answers per prompt drawn with `sampling`, prompt i seeded with
    seed + i (so the answers do not depend on batching); recorded with every dataset it yields."""

    sampling: Sampling
    n: int = 1
    seed: int = 0

    def to_dict(self) -> dict:
        return {"n": self.n, **self.sampling.to_dict(), "seed": self.seed}


def make_engine(model, tokenizer, *, sequences: int, context: int):
    """An inference `Engine` over `model` for `sequences` sequences in flight, each at most `context`
    tokens long (prompt + answer; capped at the model's max_position_embeddings).

    On a GPU the [B, V] logits of each step are handed to the sampler on the CPU, where the sampler
    keeps its per-request generators and per-row settings (it builds those on the CPU, so sampling at
    temperature > 0 from a model on a GPU would mix devices); the copy is small next to the step, and
    the sampled ids go back to the CPU anyway.
    """
    from daulat.infer import Engine

    size = {"max_num_seqs": max(1, sequences), "max_model_len": min(model.config.max_position_embeddings, context)}
    if next(model.parameters()).device.type == "cpu":
        return Engine(model, tokenizer, **size)

    class HostSamplingEngine(Engine):
        def _sample(self, logits, sequences, deltas):
            return super()._sample(logits.float().cpu(), sequences, deltas)

    return HostSamplingEngine(model, tokenizer, **size)
