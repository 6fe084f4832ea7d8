"""The scheduler: which requests wait, which sequences run, and which cache slot each one holds.

Continuous batching: between two decode steps, finished sequences give their slots back and
waiting requests are admitted (first come, first served) as long as there are free slots for all
`n` of their samples and the padded prefill stays within `max_prefill_tokens`.
"""

from __future__ import annotations

import heapq
from collections import deque

from daulat.infer.engine.sequence import Request, Sequence


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int):
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.free_slots = list(range(max_num_seqs))  # a heap: the lowest free slot is used first
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[Request]:
        """Requests to prefill now, each of their sequences given a slot and counted as running."""
        admitted: list[Request] = []
        longest = 0
        while self.waiting:
            request = self.waiting[0]
            n, length = len(request.sequences), len(request.prompt_token_ids)
            if n > len(self.free_slots):
                break
            padded = (len(admitted) + 1) * max(longest, length)
            if admitted and padded > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            longest = max(longest, length)
            for seq in request.sequences:
                seq.slot = heapq.heappop(self.free_slots)
                self.running.append(seq)
            admitted.append(request)
        return admitted

    def release(self, finished: list[Sequence]) -> None:
        """Give the slots of finished sequences back."""
        if not finished:
            return
        done = {id(s) for s in finished}
        self.running = [s for s in self.running if id(s) not in done]
        for seq in finished:
            if seq.slot is not None:
                heapq.heappush(self.free_slots, seq.slot)
                seq.slot = None

    def remove(self, request_id: int) -> Request | None:
        """Take a request out (to abort it), waiting or running; its slots are released."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return request
        for seq in self.running:
            if seq.request.id == request_id:
                self.release([s for s in self.running if s.request.id == request_id])
                return seq.request
        return None
