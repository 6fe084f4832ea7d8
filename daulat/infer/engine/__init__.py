"""The generation engine, cut along its seams:

    sampling.py   SamplingParams and the batched sampler (per-request seeds, raw log-probs)
    sequence.py   a request's state, its samples, incremental detokenising, stop strings; result types
    scheduler.py  waiting requests, running sequences, cache slots (continuous batching, fair between
                  requests, with recompute preemption)
    runner.py     the model and its latent cache: batched prefill, batched absorbed decode
    engine.py     Engine: generate / stream / submit, stepping inline or on a background thread
"""

from daulat.infer.engine.engine import Engine, RequestHandle
from daulat.infer.engine.sampling import InvalidParameter, SamplingParams
from daulat.infer.engine.sequence import Completion, Delta, Result

__all__ = ["Engine", "RequestHandle", "SamplingParams", "InvalidParameter", "Result", "Completion", "Delta"]
