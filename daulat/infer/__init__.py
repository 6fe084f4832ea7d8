"""Inference: the generation engine (a library first: GRPO rollouts, distillation samples), the
terminal chat (`daulat chat`) and the OpenAI-compatible server with its web page (`daulat serve`).

    from daulat.infer import Engine, SamplingParams
    engine = Engine.from_checkpoint("runs/sft")
    [result] = engine.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=64))
"""

from daulat.infer.engine import Completion, Delta, Engine, InvalidParameter, RequestHandle, Result, SamplingParams

__all__ = ["Engine", "SamplingParams", "Result", "Completion", "Delta", "RequestHandle", "InvalidParameter"]
