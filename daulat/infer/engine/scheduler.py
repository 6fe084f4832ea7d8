"""The scheduler: which requests wait, which sequences run, and which cache slot each one holds.

Continuous batching: between two decode steps, finished sequences give their slots back and
waiting requests are admitted as long as there are free slots for all `n` of their samples and the
padded prefill stays within `max_prefill_tokens`.

Fair between groups (a group is one API request, which may hold many prompts, or one
`Engine.generate` call), as max-min fairness over the cache slots:
- admission: the group holding the fewest slots goes first, ties to the group that came first;
  within a group, requests keep their order. A group alone still fills every slot.
- preemption: when a group with work holds no slot at all and waiting for free slots would mean
  waiting for another group's long generations, sequences of groups holding more than their fair
  share (max_num_seqs / active groups) give their slots up, fewest generated tokens first. A
  preempted sequence keeps its tokens and is resumed later by prefilling them again (vLLM's
  recompute preemption), so it produces the same tokens as if it had never been stopped.
So a one-prompt request that arrives while another request's 4,096 sequences run is admitted at the
next step, not after them.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque

from daulat.infer.engine.sequence import Request, Sequence

Unit = Request | Sequence  # what waits for slots: a new request (n slots) or a preempted sequence (1)


def _size(unit: Unit) -> int:
    return len(unit.sequences) if isinstance(unit, Request) else 1


def _prefill_length(unit: Unit) -> int:
    """Tokens to prefill: the prompt, or a preempted sequence's prompt and all its tokens but the last."""
    return len(unit.prompt_token_ids) if isinstance(unit, Request) else unit.length - 1


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int):
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.free_slots = list(range(max_num_seqs))  # a heap: the lowest free slot is used first
        self.waiting: dict[int, deque[Unit]] = {}  # group -> what it waits to run, groups in arrival order
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.setdefault(request.group, deque()).append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> tuple[list[Request], list[Sequence]]:
        """(requests to prefill now, preempted sequences to prefill again), all given their slots
        and counted as running."""
        held = Counter(seq.request.group for seq in self.running)
        self._preempt_for_starving(held)
        requests: list[Request] = []
        resumed: list[Sequence] = []
        longest = 0
        while self.waiting:
            # min() keeps the first of equals, and dicts keep insertion order: ties go to the oldest group
            group = min(self.waiting, key=lambda g: held[g])
            unit = self.waiting[group][0]
            if _size(unit) > len(self.free_slots):
                break  # the slots that free up next are this group's turn: nobody overtakes it
            count, length = len(requests) + len(resumed) + 1, _prefill_length(unit)
            if count > 1 and count * max(longest, length) > self.max_prefill_tokens:
                break
            self._pop(group)
            longest = max(longest, length)
            held[group] += _size(unit)
            for seq in unit.sequences if isinstance(unit, Request) else [unit]:
                seq.slot = heapq.heappop(self.free_slots)
                self.running.append(seq)
            (requests if isinstance(unit, Request) else resumed).append(unit)
        return requests, resumed

    def _preempt_for_starving(self, held: Counter) -> None:
        """Free slots, from groups above their fair share, for groups that hold none and cannot fit."""
        if not self.waiting:
            return
        share = max(1, self.max_num_seqs // len(set(held) | set(self.waiting)))
        for group, queue in list(self.waiting.items()):  # preempting adds to self.waiting
            need = _size(queue[0]) - len(self.free_slots)
            if held[group] or need <= 0:
                continue
            left, victims = Counter(held), []
            for seq in sorted(self.running, key=lambda s: len(s.token_ids)):
                if len(victims) == need:
                    break
                if left[seq.request.group] > share:
                    left[seq.request.group] -= 1
                    victims.append(seq)
            if len(victims) < need:
                continue  # it waits for slots to free up: preempting others cannot seat it now
            for seq in victims:
                self._preempt(seq)
            held.clear()
            held.update(left)

    def _preempt(self, seq: Sequence) -> None:
        self.release([seq])
        self.waiting.setdefault(seq.request.group, deque()).appendleft(seq)
        self.preemptions += 1

    def _pop(self, group: int) -> None:
        queue = self.waiting[group]
        queue.popleft()
        if not queue:
            del self.waiting[group]

    def release(self, finished: list[Sequence]) -> None:
        """Give the slots of finished (or preempted) sequences back."""
        if not finished:
            return
        done = {id(s) for s in finished}
        self.running = [s for s in self.running if id(s) not in done]
        for seq in finished:
            if seq.slot is not None:
                heapq.heappush(self.free_slots, seq.slot)
                seq.slot = None

    def remove(self, request_id: int) -> Request | None:
        """Take a request out (to abort it), waiting, preempted or running; its slots are released."""
        found = None
        for group, queue in list(self.waiting.items()):
            mine = [u for u in queue if (u.id if isinstance(u, Request) else u.request.id) == request_id]
            if mine:
                found = mine[0] if isinstance(mine[0], Request) else mine[0].request
                self.waiting[group] = deque(u for u in queue if all(u is not m for m in mine))
                if not self.waiting[group]:
                    del self.waiting[group]
        running = [s for s in self.running if s.request.id == request_id]
        if running:
            self.release(running)
            found = running[0].request
        return found

    def clear_waiting(self) -> None:
        """Forget every waiting request and preempted sequence (the engine fails them after an error)."""
        self.waiting.clear()
