"""The request queue of one model instance: priority levels, per-level policy, timeouts, batch forming.

Triton's meanings:
* ``priority_levels`` N > 0 makes levels 1 (highest) .. N; a request's ``priority`` parameter picks
  one, 0 or absent means ``default_priority_level``.
* ``max_queue_size`` (per level, 0 = unbounded): a request arriving at a full level is rejected.
* ``default_timeout_microseconds`` (0 = none); a request's ``timeout`` parameter (µs) may only
  shorten it, and only when ``allow_timeout_override`` is set. A request still queued when its time
  is up is rejected (``REJECT``) or moved behind every other request (``DELAY``).
* Batches: the oldest request of the highest non-empty level leads; queued requests whose inputs
  agree on every non-batch dimension join it up to ``max_batch_size`` rows. A batch leaves when it is
  full, when its size is a ``preferred_batch_size``, or when the leader has waited
  ``max_queue_delay_microseconds``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from dl_inference.errors import InvalidArgument, ResourceExhausted, ServerError, Unavailable
from dl_inference.protocol.generated import model_config_pb2 as mc
from dl_inference.worker.runner import Prepared

TIMER_SLACK_NS = 1_000_000


@dataclass(frozen=True)
class LevelPolicy:
    delay_on_timeout: bool = False
    default_timeout_ns: int = 0
    allow_override: bool = False
    max_queue_size: int = 0

    @classmethod
    def from_proto(cls, p: mc.ModelQueuePolicy) -> LevelPolicy:
        return cls(
            delay_on_timeout=p.timeout_action == mc.ModelQueuePolicy.DELAY,
            default_timeout_ns=p.default_timeout_microseconds * 1000,
            allow_override=p.allow_timeout_override,
            max_queue_size=p.max_queue_size,
        )

    def deadline(self, arrival_ns: int, requested_us: int | None) -> int | None:
        timeout = self.default_timeout_ns
        if requested_us and self.allow_override:
            requested = requested_us * 1000
            timeout = requested if timeout == 0 else min(timeout, requested)
        return arrival_ns + timeout if timeout else None


@dataclass(frozen=True)
class BatchPolicy:
    """Scheduling settings of one model, from its config."""

    max_batch_size: int
    dynamic: bool
    delay_ns: int
    preferred: frozenset[int]
    preserve_ordering: bool
    levels: int
    default_level: int
    level_policies: tuple[LevelPolicy, ...]  # index 0 = level 1

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> BatchPolicy:
        dynamic = config.HasField("dynamic_batching") and config.max_batch_size > 0
        db = config.dynamic_batching
        levels = max(int(db.priority_levels), 1)
        default_level = int(db.default_priority_level) or (levels + 1) // 2 if db.priority_levels else 1
        base = LevelPolicy.from_proto(db.default_queue_policy)
        policies = tuple(
            LevelPolicy.from_proto(db.priority_queue_policy[level]) if level in db.priority_queue_policy else base
            for level in range(1, levels + 1)
        )
        return cls(
            max_batch_size=config.max_batch_size,
            dynamic=dynamic,
            delay_ns=int(db.max_queue_delay_microseconds) * 1000,
            preferred=frozenset(db.preferred_batch_size),
            preserve_ordering=db.preserve_ordering,
            levels=levels,
            default_level=min(max(default_level, 1), levels),
            level_policies=policies,
        )


@dataclass(eq=False, slots=True)
class Pending:
    """A queued request and how to answer it."""

    rid: int
    seq: int
    prepared: Prepared
    arrival_ns: int
    deadline_ns: int | None
    level: int
    reply: object  # callable set by the executor
    delayed: bool = False
    cancelled: bool = False


@dataclass
class RequestQueue:
    policy: BatchPolicy
    levels: list[deque[Pending]] = field(default_factory=list)
    delayed: deque[Pending] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.levels = [deque() for _ in range(self.policy.levels)]

    def __len__(self) -> int:
        return sum(len(q) for q in self.levels) + len(self.delayed)

    def level_of(self, prepared: Prepared) -> int:
        if prepared.priority is None or prepared.priority == 0 or self.policy.levels == 1:
            return self.policy.default_level
        if prepared.priority > self.policy.levels:
            raise InvalidArgument(
                f"request priority {prepared.priority} is outside 1..{self.policy.levels} "
                f"(priority_levels of this model)"
            )
        return prepared.priority

    def admit(self, item: Pending) -> None:
        """Queue ``item`` or raise RESOURCE_EXHAUSTED when its level is full."""
        queue = self.levels[item.level - 1]
        limit = self.policy.level_policies[item.level - 1].max_queue_size
        if limit and len(queue) >= limit:
            raise ResourceExhausted(
                f"the queue of priority level {item.level} is full ({limit} requests, max_queue_size)"
            )
        queue.append(item)

    def _in_order(self) -> Iterator[Pending]:
        for queue in self.levels:
            yield from queue
        yield from self.delayed

    def expire(self, now_ns: int) -> tuple[list[Pending], int | None]:
        """Apply timeouts: return the requests rejected now and the next deadline still ahead."""
        rejected: list[Pending] = []
        next_deadline: int | None = None
        for index, queue in enumerate(self.levels):
            if not any(p.deadline_ns is not None for p in queue):
                continue
            policy = self.policy.level_policies[index]
            keep: deque[Pending] = deque()
            for p in queue:
                if p.deadline_ns is not None and p.deadline_ns <= now_ns and not p.cancelled:
                    if policy.delay_on_timeout:
                        p.delayed = True
                        p.deadline_ns = None
                        self.delayed.append(p)
                    else:
                        rejected.append(p)
                    continue
                if p.deadline_ns is not None:
                    next_deadline = p.deadline_ns if next_deadline is None else min(next_deadline, p.deadline_ns)
                keep.append(p)
            self.levels[index] = keep
        return rejected, next_deadline

    def take_batch(self, now_ns: int) -> tuple[list[Pending], int | None]:
        """The next batch to run now, or ([], time to look again) when it should wait for more."""
        for queue in (*self.levels, self.delayed):
            while queue and queue[0].cancelled:
                queue.popleft()
        head = next(self._in_order(), None)
        if head is None:
            return [], None
        policy = self.policy
        batch = [head]
        rows = head.prepared.rows
        if policy.dynamic and rows < policy.max_batch_size:
            key = head.prepared.key
            for p in self._in_order():
                if p is head or p.cancelled or p.prepared.key != key:
                    continue
                if rows + p.prepared.rows <= policy.max_batch_size:
                    batch.append(p)
                    rows += p.prepared.rows
                    if rows == policy.max_batch_size:
                        break
        # Event-loop timers have millisecond resolution and fire up to ~1 ms late; aim early by that
        # much (at most half the delay) so the wait a lone request sees stays within the delay.
        ready_at = head.arrival_ns + policy.delay_ns - min(TIMER_SLACK_NS, policy.delay_ns // 2)
        if (
            not policy.dynamic
            or rows >= policy.max_batch_size
            or rows in policy.preferred
            or policy.delay_ns == 0
            or now_ns >= ready_at
        ):
            self._remove(batch)
            return batch, None
        return [], ready_at

    def _remove(self, batch: list[Pending]) -> None:
        taken = {id(p) for p in batch}
        for index, queue in enumerate(self.levels):
            if any(id(p) in taken for p in queue):
                self.levels[index] = deque(p for p in queue if id(p) not in taken)
        if any(id(p) in taken for p in self.delayed):
            self.delayed = deque(p for p in self.delayed if id(p) not in taken)

    def drain(self) -> list[Pending]:
        items = [p for p in self._in_order() if not p.cancelled]
        self.levels = [deque() for _ in self.levels]
        self.delayed = deque()
        return items


def timeout_error() -> ServerError:
    return Unavailable("request timeout expired while queued")
