"""Continuous batching: requests join and leave a running batch; each step mixes decode tokens and prefill chunks."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.constrained import Constraint, Constrainer, ConstraintState
from bitsmith.runtime.kv_cache import BlockPool, KVCacheManager, SequenceBlocks
from bitsmith.runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, log_softmax, token_logprob, top_logprobs
from bitsmith.runtime.sampling import SamplingParams, sample_token


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    request_id: str = ""
    constraint: Constraint | None = None  # the output must match it (runtime/constrained.py)
    logprobs: int | None = None  # None: none; 0: each generated token's logprob; k: plus the top k
    echo_logprobs: bool = False  # also score the prompt (Sequence.prompt_logprobs); max_tokens may then be 0


@dataclass(eq=False)
class Sequence:
    """A request in flight: its tokens so far, how many have KV in the cache, its blocks, its output."""

    request: Request
    arrival: int
    tokens: list[int]
    rng: np.random.Generator
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    computed: int = 0  # tokens[:computed] have their KV in the cache
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    preemptions: int = 0
    first_token_time: float | None = None
    detokenize: Callable[[list[int]], str] | None = None  # the engine's tokenizer, when it has one
    stopped_text: str | None = None  # the output cut before a stop string
    ring_slot: int | None = None  # its windowed layers' ring (runner.ring_table), while it holds one
    # per sampled token when request.logprobs is set: the generated ones, then the stop id that ended it (if one did)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)  # [None, logprob of prompt[1] | prompt[:1], ...]
    prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] = field(default_factory=list)  # echo + logprobs k
    constraint_error: str | None = None  # why a constrained sequence stopped early (the grammar rejected a token)
    constraint_state: ConstraintState | None = None
    _text: tuple[int, str] = (0, "")  # (generated tokens covered, their text)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The detokenized output, decoded when read (not per token in the engine loop) and cached."""
        if self.stopped_text is not None:
            return self.stopped_text
        if self.detokenize is None:
            return ""
        if self._text[0] != len(self.generated):
            self._text = (len(self.generated), self.detokenize(self.generated))
        return self._text[1]


@dataclass
class EngineStats:
    steps: int = 0
    rows: int = 0  # token rows computed (padding excluded)
    prefill_rows: int = 0
    preemptions: int = 0


FIT_MIN_ROWS = 16  # steps from this many rows cost about their row count (see Engine._fitted_prefill)


class Engine:
    """Schedules sequences onto a KernelRunner-like `runner` (run(tokens, positions, block_tables, logits_rows)
    -> the logits of the rows it samples).

    Each step has a token budget of `runner.max_rows` rows: first one decode row for every running
    sequence (oldest first), then prefill chunks of waiting sequences. When the pool has no block for
    a sequence, the newest running sequence is preempted: its blocks are freed and it goes back to
    the front of the queue to be recomputed later (its generated tokens are kept), so nothing is lost.
    """

    def __init__(self, runner: Any, tokenizer: Any = None, token_budget: int | None = None) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.budget = min(token_budget or runner.max_rows, runner.max_rows)
        self.pool = BlockPool(runner.num_blocks, runner.block_size)
        self.kv = KVCacheManager(self.pool, runner.max_blocks)
        # windowed layers on rings (passes/kv_plan.py): a running sequence holds one of ring_slots slots, and
        # prefix caching is off (a cached prefix's window would have to be in the new sequence's ring)
        self.rings = int(getattr(runner, "ring_blocks", 0) or 0)
        self.ring_free = list(range(int(getattr(runner, "ring_slots", 0) or 0)))
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        self._arrivals = itertools.count()
        self._constraints: Constrainer | None = None

    # ------------------------------------------------------------------ requests
    def add(self, request: Request) -> Sequence:
        if not request.prompt:
            raise BitsmithError("the prompt has no tokens", where="engine", fix="send a non-empty prompt")
        if request.max_tokens < (0 if request.echo_logprobs else 1):
            raise BitsmithError(f"max_tokens {request.max_tokens} must be at least 1 (0 only to score the prompt "
                                "with echo logprobs)", where="engine")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise BitsmithError(f"logprobs {request.logprobs} is outside [0, {MAX_TOP_LOGPROBS}]", where="engine")
        total = len(request.prompt) + request.max_tokens
        if total > self.runner.max_context:
            raise BitsmithError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.max_tokens}) exceed "
                                f"the context of {self.runner.max_context}", where="engine",
                                fix="shorten the prompt or lower max_tokens")
        seq = Sequence(request, next(self._arrivals), list(request.prompt), np.random.default_rng(request.params.seed),
                       detokenize=None if self.tokenizer is None else self.tokenizer.decode)
        if request.echo_logprobs:
            seq.prompt_logprobs.append(None)  # the first token has no context to be scored in
            seq.prompt_top_logprobs.append(None)
        if request.constraint is not None:
            seq.constraint_state = self._constrainer().start(request.constraint)
        self.waiting.append(seq)
        return seq

    def _constrainer(self) -> Constrainer:
        """The mask machinery, built at the first constrained request (llguidance is imported only then)."""
        if self._constraints is None:
            self._constraints = Constrainer(self.tokenizer)
        return self._constraints

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence (client gone): its blocks go back to the pool."""
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
        self._release(seq)
        if seq.finish_reason is None:
            seq.finish_reason = "abort"

    def _release(self, seq: Sequence) -> None:
        """Its blocks back to the pool and its ring slot (if any) to the free slots."""
        self.kv.free(seq.blocks)
        if seq.ring_slot is not None:
            self.ring_free.append(seq.ring_slot)
            seq.ring_slot = None

    # ------------------------------------------------------------------ scheduling
    def _preempt_newest(self) -> Sequence | None:
        if not self.running:
            return None
        victim = max(self.running, key=lambda s: s.arrival)
        self.running.remove(victim)
        self._release(victim)
        victim.computed = 0
        victim.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.insert(0, victim)
        return victim

    def _schedule(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, first token index, token count) chunks for this step."""
        plan: list[tuple[Sequence, int, int]] = []
        budget = self.budget
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0:
                break
            if seq not in self.running:  # preempted below while making room
                continue
            count = min(len(seq.tokens) - seq.computed, budget)
            while not self.kv.ensure(seq.blocks, seq.computed + count):
                victim = self._preempt_newest()
                if victim is seq or victim is None:
                    break
            else:
                plan.append((seq, seq.computed, count))
                budget -= count
        budget = self._fitted_prefill(self.budget - budget, budget)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if self.rings and not self.ring_free:
                break  # every ring slot is taken: it waits for a sequence to finish
            # an echo sequence computes every prompt row itself: its prompt's logits are wanted, not its KV
            if seq.computed == 0 and not seq.blocks.table and not self.rings and not seq.request.echo_logprobs:
                seq.computed = self.kv.match_prefix(seq.blocks, seq.tokens)
            count = min(len(seq.tokens) - seq.computed, budget)
            if not self.kv.ensure(seq.blocks, seq.computed + count):
                if not self.running and not plan:
                    raise BitsmithError("the KV pool cannot hold even one sequence", where="engine",
                                        fix="recompile with a larger --memory or a smaller --context")
                break
            self.waiting.pop(0)
            if self.rings:
                seq.ring_slot = self.ring_free.pop(0)
            self.running.append(seq)
            plan.append((seq, seq.computed, count))
            budget -= count
        return plan

    def _fitted_prefill(self, used: int, budget: int) -> int:
        """Rows left for prefill chunks after `used` rows: all that is waiting (up to `budget`), or fewer when
        that fills a step size of at least FIT_MIN_ROWS exactly instead of padding up to the next one (a
        step costs its padded rows once rows are compute-bound; the rest of the prompt goes next step)."""
        sizes = getattr(self.runner, "step_rows", None)
        wanted = min(budget, sum(len(seq.tokens) - seq.computed for seq in self.waiting))
        total = used + wanted
        if not sizes or wanted == 0 or total in sizes:
            return budget
        fits = [size for size in sizes if FIT_MIN_ROWS <= size <= total and size > used]
        return max(fits) - used if fits else budget

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Sequence]:
        """Run one batched step; returns sequences that got a new token (or finished) in it."""
        plan = self._schedule()
        if not plan:
            return []
        ids, positions, tables, rings = [], [], [], []
        for seq, start, count in plan:
            ids.extend(seq.tokens[start:start + count])
            positions.extend(range(start, start + count))
            table = np.zeros(self.runner.max_blocks, dtype=np.int32)
            table[:len(seq.blocks.table)] = seq.blocks.table
            tables.extend([table] * count)
            if self.rings:
                rings.extend([self.runner.ring_table(seq.ring_slot)] * count)
        # logits only for each chunk's last row when it completes its sequence's known tokens, and for every
        # prompt row of an echo sequence whose prompt is not scored yet
        wanted: list[int] = []
        row = 0
        for seq, start, count in plan:
            if seq.request.echo_logprobs and len(seq.prompt_logprobs) < len(seq.request.prompt):
                wanted.extend(range(row, row + count))
            elif start + count == len(seq.tokens):
                wanted.append(row + count - 1)
            row += count
        extra = {"ring_tables": np.stack(rings)} if self.rings else {}
        logits = self.runner.run(np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64),
                                 np.stack(tables), logits_rows=wanted, **extra)
        self.stats.steps += 1
        self.stats.rows += len(ids)
        at = {r: i for i, r in enumerate(wanted)}  # step row -> its logits row
        touched, rows = [], []
        row = 0
        for seq, start, count in plan:
            seq.computed = start + count
            self.kv.publish_full_blocks(seq.blocks, seq.tokens, seq.computed)
            if seq.request.echo_logprobs and row in at:
                self._score_prompt(seq, start, logits[at[row]:at[row] + count])
            row += count
            if seq.computed < len(seq.tokens):  # prefill continues next step
                self.stats.prefill_rows += count
                continue
            if len(seq.generated) >= seq.request.max_tokens:  # max_tokens 0: the prompt is scored, nothing else
                seq.finish_reason = "length"
            else:
                rows.append(at[row - 1])
            touched.append(seq)
        sampling = [seq for seq in touched if not seq.done]
        self._sample(sampling, logits[rows] if rows else logits[:0])
        for seq in touched:
            if seq.done:
                self.running.remove(seq)
                self._release(seq)
        return touched

    def _score_prompt(self, seq: Sequence, start: int, logits: np.ndarray) -> None:
        """Prompt logprobs from the logits of the chunk's rows (positions start...): row p scores prompt[p + 1]."""
        prompt = seq.request.prompt
        first = len(seq.prompt_logprobs) - 1  # the first row not used yet (a recomputation after preemption skips)
        lo, hi = max(first, start), min(start + len(logits), len(prompt) - 1)
        if lo >= hi:
            return
        lp = log_softmax(logits[lo - start:hi - start])
        seq.prompt_logprobs.extend(float(v) for v in lp[np.arange(hi - lo), prompt[lo + 1:hi + 1]])
        seq.prompt_top_logprobs.extend(top_logprobs(row, seq.request.logprobs or 0) for row in lp)

    def _sample(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        """One token for each of `seqs` from its logits row: constrained rows masked together in one batch,
        logprobs from the raw row (the model's own distribution, before temperature and mask)."""
        masked = logits
        constrained = [i for i, seq in enumerate(seqs) if seq.constraint_state is not None]
        if constrained:
            masked = logits.copy()
            masked[constrained] = self._constrainer().mask([seqs[i].constraint_state for i in constrained],
                                                           logits[constrained])
        for seq, raw, row in zip(seqs, logits, masked):
            state = seq.constraint_state
            if state is not None and state.error:
                seq.constraint_error, seq.finish_reason = state.error, "stop"
                continue
            token = sample_token(row, seq.request.params, seq.rng)
            if seq.request.logprobs is not None:  # every sampled token, a stop id that ends the output included
                seq.logprobs.append(token_logprob(raw, token, seq.request.logprobs))
            ended = False
            if state is not None:
                ended = self._constrainer().consume(state, token)
                if state.error:
                    seq.constraint_error, seq.finish_reason = state.error, "stop"
                    continue
                if ended and token in self._constrainer().eos_ids:  # the grammar ended with EOS: not output
                    seq.finish_reason = "stop"
                    continue
            self._append(seq, token)
            if ended:  # the grammar is complete after this token
                seq.finish_reason = "stop"

    def _append(self, seq: Sequence, token: int) -> None:
        """Add a sampled token to the output (a stop id ends the sequence unwritten)."""
        req = seq.request
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        if token in req.stop_ids:
            seq.finish_reason = "stop"
            return
        seq.generated.append(token)
        seq.tokens.append(token)
        if self.tokenizer is not None and any(req.stop_strings):
            text = seq.text
            for stop in req.stop_strings:
                if stop and stop in text:
                    seq.stopped_text = text[:text.index(stop)]
                    seq.finish_reason = "stop"
                    return
        if len(seq.generated) >= req.max_tokens:
            seq.finish_reason = "length"

    def run_until_done(self, on_step: Callable[[list[Sequence]], None] | None = None) -> None:
        while self.has_work():
            touched = self.step()
            if on_step:
                on_step(touched)
