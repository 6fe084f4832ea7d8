"""The engine: requests in, samples out, the model stepped over a continuously changing batch.

    engine = Engine(model, tokenizer)
    results = engine.generate(prompts, SamplingParams(temperature=0.8, n=4, max_tokens=128))
    for delta in engine.stream(prompt, params): print(delta.text, end="")

Each `step()` admits waiting requests, fairly between groups of requests (scheduler.py; one batched
prefill for all of them; a request with n samples is prefilled once and its latents copied to its
other slots), then runs one batched decode for every running sequence, samples, and hands each
request its deltas. Called from the caller's
thread (`generate`, `stream`) or from a background thread (`start()`), which lets other threads and
an asyncio event loop submit requests and consume their deltas while the batch keeps stepping.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import random
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Iterator

import torch

from daulat.errors import DaulatError
from daulat.infer.engine.runner import ModelRunner
from daulat.infer.engine.sampling import InvalidParameter, SamplingParams, sample
from daulat.infer.engine.scheduler import Scheduler
from daulat.infer.engine.sequence import FINISH_ABORT, FINISH_ERROR, Delta, Request, Result, Sequence, new_group

Prompt = str | list[int]


class Engine:
    """Generation over a DeepseekV3 model with a latent KV cache and continuous batching.

    model: a `daulat.model.DeepseekV3` (eval mode; any device and dtype).
    tokenizer: a `daulat.tokenizer.Tokenizer`, or None when prompts are token ids (then `text` is "").
    max_num_seqs: cache slots = sequences decoded together (a request with n samples takes n).
    max_model_len: tokens per sequence, prompt included (default: the model's max_position_embeddings).
    max_prefill_tokens: padded prompt tokens prefilled in one step (more requests wait a step).
    seed: seeds the engine's own generator, which seeds requests that bring no seed of their own.
    add_bos: text prompts start with <|bos|> (as every training document does) unless they already do.
    """

    def __init__(self, model, tokenizer=None, *, max_num_seqs: int = 64, max_model_len: int | None = None,
                 max_prefill_tokens: int = 4096, seed: int | None = None, add_bos: bool = True):
        config = model.config
        self.tokenizer = tokenizer
        self.max_model_len = int(max_model_len or config.max_position_embeddings)
        if max_num_seqs < 1 or self.max_model_len < 2:
            raise ValueError("max_num_seqs must be at least 1 and max_model_len at least 2")
        self.vocab_size = config.vocab_size
        self.eos_token_id = tokenizer.eos_id if tokenizer is not None else config.eos_token_id
        self.bos_token_id = tokenizer.bos_id if tokenizer is not None else config.bos_token_id
        self.add_bos = add_bos
        self.max_num_seqs = max_num_seqs
        self.model = model
        self.runner = ModelRunner(model, max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(max_num_seqs, max_prefill_tokens)
        self._rng = random.Random(seed)
        self._step_lock = threading.Lock()
        self._inbox: collections.deque = collections.deque()  # ("add", Request) | ("abort", id), from any thread
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._requests: dict[int, Request] = {}  # unfinished, by id (owned by the stepping thread)
        # counters since start-up: prefill/decode steps, prompt and generated tokens, the largest decode batch
        self.stats = {"prefills": 0, "decode_steps": 0, "prompt_tokens": 0, "generated_tokens": 0, "peak_batch": 0,
                      "preemptions": 0}

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype: torch.dtype | None = None, **kwargs) -> "Engine":
        """Load a checkpoint directory (weights and tokenizer) into an engine."""
        from daulat.checkpoint import load_checkpoint

        model, tokenizer, _ = load_checkpoint(path, device=device, dtype=dtype, need_tokenizer=True)
        return cls(model, tokenizer, **kwargs)

    # -- requests --------------------------------------------------------------------------------

    def encode(self, prompt: Prompt, allow_special: bool = False) -> list[int]:
        """Token ids of a prompt (text or ids), checked against the vocabulary and the context limit.
        allow_special: special-token text in a text prompt becomes those tokens (trusted prompts only)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise DaulatError("a text prompt needs a tokenizer: pass token ids or give the engine a tokenizer")
            ids = self.tokenizer.encode(prompt, allow_special=allow_special)
            if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids = [self.bos_token_id] + ids
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidParameter("prompt", f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        else:
            raise InvalidParameter("prompt", f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidParameter("prompt", "the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidParameter("prompt", f"the prompt has {len(ids)} tokens but the context limit is "
                                             f"{self.max_model_len}, which leaves no room to generate")
        return ids

    def _request(self, prompt: Prompt, params: SamplingParams | None, sink=None, group: int | None = None) -> Request:
        params = params if params is not None else SamplingParams()
        if params.n > self.max_num_seqs:
            raise InvalidParameter("n", f"{params.n} samples do not fit in {self.max_num_seqs} sequence slots")
        if params.stop and self.tokenizer is None:
            raise InvalidParameter("stop", "stop strings need a tokenizer")
        return Request(self.encode(prompt), params, self.tokenizer, self.eos_token_id,
                       seed=self._rng.getrandbits(63), sink=sink, group=group)

    def _post(self, message) -> None:
        self._inbox.append(message)
        self._wake.set()

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, asynchronous: bool = False,
               group: int | None = None) -> "RequestHandle":
        """Queue one request and return its handle (iterate it for deltas, or `result()`).

        The request runs on the background thread (started if needed). With asynchronous=True the
        handle is consumed with `async for` from the running event loop, which never blocks.
        group: an id from `new_group()` shared by requests that should share slots fairly with the
        others as one (an API request's prompts); default: the request is a group of its own.
        """
        handle = RequestHandle(self, asyncio.get_running_loop() if asynchronous else None)
        handle.request = self._request(prompt, params, handle._push, group)
        self.start()
        self._post(("add", handle.request))
        return handle

    new_group = staticmethod(new_group)

    def abort(self, request_id: int) -> None:
        """Cancel a request; its samples end with finish_reason "abort"."""
        self._post(("abort", request_id))

    def generate(self, prompts: Iterable[Prompt] | str, params: SamplingParams | list[SamplingParams] | None = None) -> list[Result]:
        """Generate for every prompt (text or token ids); one `Result` per prompt, in order.

        params: one SamplingParams for all prompts, or one per prompt.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            raise InvalidParameter("prompts", "pass a list of prompts: [[token ids...]], not one list of ids")
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InvalidParameter("params", f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        group = new_group()  # one call's prompts share slots fairly with other callers' requests as one
        requests = [self._request(p, sp, group=group) for p, sp in zip(prompts, per_prompt)]  # checked before any runs
        if self.running_in_background:
            for request in requests:
                self._post(("add", request))
            for request in requests:
                request.done.wait()
        else:
            for request in requests:
                self._post(("add", request))
            while not all(r.finished for r in requests):
                self.step()
        for request in requests:
            if request.error:
                raise RuntimeError(f"generation failed: {request.error}")
        return [r.result() for r in requests]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield the deltas of one request as they are generated (all its samples interleaved)."""
        if self.running_in_background:
            handle = self.submit(prompt, params)
            yield from handle
            return
        pending: list[Delta] = []
        request = self._request(prompt, params, pending.extend)
        self._post(("add", request))
        try:
            while not request.finished:
                self.step()
                yield from pending
                pending.clear()
        finally:
            if not request.finished:
                self.abort(request.id)
                self.step()

    def prompt_logprobs(self, prompt_token_ids: list[int], top: int = 0) -> "PromptLogprobs":
        """The model's log-probs of a prompt's own tokens: log p(prompt[t] | prompt[:t]) for t >= 1.

        What /v1/completions' `echo` with `logprobs` returns (lm-evaluation-harness's loglikelihood
        requests). One plain forward `model(ids)` over the whole prompt, apart from the batch and its
        cache, taken between two steps (it holds the step lock); the engine does no arithmetic of its own.
        """
        ids = torch.tensor([prompt_token_ids], dtype=torch.long, device=next(self.model.parameters()).device)
        with self._step_lock, torch.inference_mode():
            logits = self.model(ids)[0].float()  # [T, V]: row t predicts token t + 1
        logprobs = torch.log_softmax(logits[:-1], dim=-1)  # [T - 1, V]
        targets = ids[0, 1:]
        token = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        alternatives = None
        if top:
            values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
            alternatives = [None] + [dict(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        return PromptLogprobs(list(prompt_token_ids), [None] + token, alternatives)

    # -- stepping ----------------------------------------------------------------------------------

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished (waiting or running)."""
        return len(self._requests) + sum(1 for kind, _ in list(self._inbox) if kind == "add")

    @property
    def num_unfinished_sequences(self) -> int:
        """Samples submitted and not yet finished (waiting or running)."""
        requests = list(self._requests.values()) + [item for kind, item in list(self._inbox) if kind == "add"]
        return sum(1 for r in requests for s in r.sequences if not s.finished)

    def has_unfinished(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work

    def step(self) -> None:
        """Admit and prefill waiting requests, then decode one token for every running sequence."""
        with self._step_lock, torch.inference_mode():
            deltas: dict[Request, list[Delta]] = collections.defaultdict(list)
            self._drain_inbox(deltas)
            try:
                admitted, resumed = self.scheduler.admit()
                self.stats["preemptions"] = self.scheduler.preemptions
                if admitted or resumed:
                    self._prefill(admitted, resumed, deltas)
                running = [s for s in self.scheduler.running if not s.finished]
                if running:
                    self._decode(running, deltas)
            except Exception as e:  # fail the requests in flight rather than hang their clients
                message = f"{type(e).__name__}: {e}"
                traceback.print_exc(file=sys.stderr)
                for request in list(self._requests.values()):
                    request.error = message
                    for seq in request.sequences:
                        if not seq.finished:
                            deltas[request].append(seq.abort(FINISH_ERROR))
                self.scheduler.release(list(self.scheduler.running))
                self.scheduler.clear_waiting()
            self.scheduler.release([s for s in self.scheduler.running if s.finished])
            self._dispatch(deltas)

    def _drain_inbox(self, deltas) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._requests[item.id] = item
                self.scheduler.add(item)
            elif kind == "abort":
                request = self.scheduler.remove(item)
                if request is not None:
                    for seq in request.sequences:
                        if not seq.finished:
                            deltas[request].append(seq.abort(FINISH_ABORT))

    def _prefill(self, admitted: list[Request], resumed: list[Sequence], deltas) -> None:
        """Prefill new requests (then sample their first tokens) and preempted sequences coming back
        (their prompt and tokens but the last, which the next decode feeds; nothing is sampled)."""
        prompts = [r.prompt_token_ids for r in admitted]
        prompts += [s.request.prompt_token_ids + s.token_ids[:-1] for s in resumed]
        logits = self.runner.prefill(prompts, [r.sequences[0].slot for r in admitted] + [s.slot for s in resumed])
        self.stats["prefills"] += 1
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        rows, sequences = [], []
        for row, request in enumerate(admitted):
            first, *others = request.sequences
            self.runner.copy_slot(first.slot, [s.slot for s in others], len(request.prompt_token_ids))
            rows += [row] * len(request.sequences)
            sequences += request.sequences
        if sequences:
            self._sample(logits[rows], sequences, deltas)

    def _decode(self, running: list[Sequence], deltas) -> None:
        logits = self.runner.decode([s.token_ids[-1] for s in running], [s.last_position for s in running],
                                    [s.slot for s in running])
        self.stats["decode_steps"] += 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(running))
        self._sample(logits, running, deltas)

    def _sample(self, logits: torch.Tensor, sequences: list[Sequence], deltas) -> None:
        out = sample(logits, [s.params for s in sequences], [s.generator for s in sequences])
        self.stats["generated_tokens"] += len(sequences)
        for i, seq in enumerate(sequences):
            delta = seq.append(out.token_ids[i], out.logprobs[i], out.top_logprobs[i], self.max_model_len)
            deltas[seq.request].append(delta)

    def _dispatch(self, deltas: dict[Request, list[Delta]]) -> None:
        for request, items in deltas.items():
            finished = request.finished
            if finished:
                self._requests.pop(request.id, None)
            if request.sink is not None:
                request.sink(items)
            if finished:
                request.done.set()

    # -- background thread -------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Step on a background thread from now on (idempotent)."""
        if not self.running_in_background:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="daulat-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread after its current step; unfinished requests are aborted."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._thread = None
        for request_id in list(self._requests):
            self._post(("abort", request_id))
        self.step()

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            if self._stopping:
                return
            if not self.has_unfinished():
                self._wake.wait()
                continue
            self.step()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class PromptLogprobs:
    """A prompt's tokens [T], log p of each given the ones before (None for the first, which has no
    context), and per position the `top` most likely tokens {token_id: logprob} (None: not asked)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None] | None = None


class RequestHandle:
    """A request submitted to a running engine.

    `for delta in handle` (blocking) or `async for delta in handle` (in the event loop given at
    submission) yields its deltas until every sample has finished; `result()` waits for the end.
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None):
        self.engine, self.loop = engine, loop
        self.request: Request | None = None
        self._queue = asyncio.Queue() if loop is not None else queue.SimpleQueue()
        self._open = None  # samples not finished yet, as seen by the consumer

    @property
    def request_id(self) -> int:
        return self.request.id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def error(self) -> str | None:
        return self.request.error

    def _push(self, deltas: list[Delta]) -> None:  # called on the engine's thread
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._queue.put_nowait, deltas)
            except RuntimeError:  # the consumer's event loop has closed: nobody is listening any more
                pass
        else:
            self._queue.put(deltas)

    def _count(self, deltas: list[Delta]) -> None:
        if self._open is None:
            self._open = len(self.request.sequences)
        self._open -= sum(1 for d in deltas if d.finish_reason is not None)

    def __iter__(self) -> Iterator[Delta]:
        try:
            while self._open is None or self._open > 0:
                deltas = self._queue.get()
                self._count(deltas)
                yield from deltas
        finally:
            if self._open is None or self._open > 0:
                self.abort()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while self._open is None or self._open > 0:
                deltas = await self._queue.get()
                self._count(deltas)
                for delta in deltas:
                    yield delta
        finally:
            if self._open is None or self._open > 0:
                self.abort()

    def abort(self) -> None:
        self.engine.abort(self.request.id)

    def result(self, timeout: float | None = None) -> Result:
        if not self.request.done.wait(timeout):
            raise TimeoutError(f"request {self.request.id} did not finish within {timeout} s")
        return self.request.result()
