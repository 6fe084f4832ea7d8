"""The state of a request and of each of its samples, and the results the engine hands out.

A `Request` is one prompt with its `SamplingParams`; it owns `n` `Sequence`s (its samples), which
share the prompt's prefill. A sequence turns each sampled token into a `Delta`: the new token ids,
their log-probs, and the new text, which is held back while it could still be the start of a stop
string or ends inside a multi-byte UTF-8 character, so that the deltas of a stream always add up to
the final text.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch

from daulat.infer.engine.sampling import SamplingParams, sample_seed

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"


@dataclass
class Completion:
    """One sample of a prompt.

    token_ids: the generated tokens, including the stop token or the tokens of a stop string that
        ended the sample (so that RL sees every token the policy chose);
    text: their text, without the stop token or stop string;
    logprobs: log p(token) of each generated token under the model (raw logits, no temperature);
    finish_reason: "stop" (a stop token or string), "length" (max_tokens or the context limit),
        "abort" (cancelled) or "error";
    stop_reason: the stop token id or stop string that ended it, if any;
    top_logprobs: per token, {token_id: logprob} of the most likely tokens when params.logprobs > 0.
    """

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None
    stop_reason: int | str | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class Result:
    """What `Engine.generate` returns for one prompt: its n samples (shortcuts to the first one)."""

    prompt_token_ids: list[int]
    samples: list[Completion]

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason

    @property
    def logprobs(self) -> list[float]:
        return self.samples[0].logprobs


@dataclass
class Delta:
    """An increment of one sample of a streamed request. `finish_reason` is set on its last delta."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class IncrementalDecoder:
    """Text of a growing list of byte-level BPE tokens, released only once it is whole UTF-8.

    Decodes a small window (the tokens since the last whole character) each step rather than the
    whole sequence, so a step costs the same at token 10 and token 10,000.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is already released text, kept as context

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is pending, incomplete characters shown as U+FFFD (the end of a sample)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


class Sequence:
    """One sample: its generated tokens, text, log-probs, random generator and cache slot."""

    def __init__(self, request: "Request", index: int, seed: int):
        self.request, self.index = request, index
        self.params = request.params
        self.generator = torch.Generator().manual_seed(seed)
        self.slot: int | None = None
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[dict[int, float]] | None = [] if self.params.logprobs else None
        self.text = ""
        self.released = 0  # characters of `text` already handed out in deltas
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        tokenizer = request.tokenizer
        self.decoder = IncrementalDecoder(tokenizer, self.params.skip_special_tokens) if tokenizer else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in the sequence so far (prompt + generated)."""
        return len(self.request.prompt_token_ids) + len(self.token_ids)

    @property
    def last_position(self) -> int:
        return self.length - 1

    def append(self, token: int, logprob: float, top: dict[int, float] | None, max_model_len: int) -> Delta:
        """Add a sampled token; decide whether the sample is finished; return what is new."""
        p, request = self.params, self.request
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top or {})
        if token in request.stop_token_ids:
            self._finish(FINISH_STOP, token)
        else:
            if self.decoder is not None:
                searched_to = len(self.text)
                self.text += self.decoder.push(token)
                if p.stop:
                    self._find_stop_string(max(0, searched_to - request.longest_stop + 1))
            if not self.finished and (len(self.token_ids) >= p.max_tokens or self.length >= max_model_len):
                self._finish(FINISH_LENGTH)
        return self._delta(1)

    def _find_stop_string(self, start: int) -> None:
        hits = [(at, s) for s in self.params.stop if (at := self.text.find(s, start)) >= 0]
        if hits:
            at, stop = min(hits)
            self.text = self.text[:at]
            self._finish(FINISH_STOP, stop)

    def _finish(self, reason: str, stop_reason=None) -> None:
        self.finish_reason, self.stop_reason = reason, stop_reason
        if reason != FINISH_STOP or not isinstance(stop_reason, str):
            if self.decoder is not None:
                self.text += self.decoder.flush()

    def abort(self, reason: str = FINISH_ABORT) -> Delta:
        self._finish(reason)
        return self._delta(0)

    def _held_back(self) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        for keep in range(min(self.request.longest_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-keep:]
            if any(s.startswith(tail) for s in self.params.stop):
                return keep
        return 0

    def _delta(self, new_tokens: int) -> Delta:
        upto = len(self.text) if self.finished or not self.params.stop else len(self.text) - self._held_back()
        text, self.released = self.text[self.released : upto], max(self.released, upto)
        top = self.top_logprobs[len(self.top_logprobs) - new_tokens :] if self.top_logprobs is not None else None
        return Delta(self.index, self.token_ids[len(self.token_ids) - new_tokens :], text,
                     self.logprobs[len(self.logprobs) - new_tokens :], top, self.finish_reason, self.stop_reason)

    def completion(self) -> Completion:
        return Completion(self.index, list(self.token_ids), self.text, list(self.logprobs), self.finish_reason,
                          self.stop_reason, None if self.top_logprobs is None else list(self.top_logprobs))


_request_ids = itertools.count()


def new_group() -> int:
    """An id for a group of requests, distinct from every request's own id (its default group)."""
    return next(_request_ids)


class Request:
    """A prompt, its sampling parameters, its samples, and where their deltas go.

    `sink(deltas)` is called from the engine's stepping thread with the deltas of one step; it must
    not block (a queue's put, or `loop.call_soon_threadsafe`). `group` names the requests the
    scheduler shares slots between fairly (one API request's prompts; default: this request alone).
    """

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, tokenizer, eos_token_id: int | None,
                 seed: int, sink=None, group: int | None = None):
        self.id = next(_request_ids)
        self.group = self.id if group is None else group
        self.prompt_token_ids = prompt_token_ids
        self.params, self.tokenizer, self.sink = params, tokenizer, sink
        stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            stop_ids.add(eos_token_id)
        if tokenizer is not None and params.stop:  # special tokens decode to nothing: stop on their ids
            stop_ids |= tokenizer.stop_token_ids_for(params.stop)
        self.stop_token_ids = frozenset(stop_ids)
        self.longest_stop = max((len(s) for s in params.stop), default=0)
        base = params.seed if params.seed is not None else seed
        self.sequences = [Sequence(self, i, sample_seed(base, i)) for i in range(params.n)]
        self.done = threading.Event()
        self.error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    def result(self) -> Result:
        return Result(list(self.prompt_token_ids), [s.completion() for s in self.sequences])

