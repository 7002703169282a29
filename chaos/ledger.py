"""Three ledgers reconciled: accepted, the database, the receivers.

- **accepted**: every (message, subscriber) pair the system took on: the
  messages committed for the scenario's channels times their subscribers.
- **database**: the final state of every delivery row and its attempt rows.
- **receivers**: every request / mail / envelope, with the delivery id it
  carried and whether the receiver acknowledged it (a complete 2xx, a 250
  to DATA, a consumed envelope).

The counts, defined so that none can be satisfied by construction:

- ``delivered``: pairs whose row is ``delivered`` *and* whose id a receiver
  acknowledged at least once.
- ``dead``: pairs whose row is ``dead`` with a reason (``last_error``).
- ``lost``: every other accepted pair: no row, a row still pending or
  retrying after the settle timeout, a row ``delivered`` that no receiver
  ever acknowledged, a row ``dead`` without a reason.
- ``dup_after_dedupe``: what deduplicating by delivery id cannot hide:
  acknowledged ids that are not deliveries of this scenario, two distinct
  delivery ids acknowledged for one (message, subscriber), two rows for
  one pair.
- ``dup_raw``: acknowledged receipts beyond the first per delivery id (the
  at-least-once repeats a receiver deduplicates); reported, never hidden.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chaos.receivers import Receipt
from chaos.stack import Chaos

__all__ = ["Accepted", "Result", "reconcile", "unsettled", "accepted_for"]

FINAL = ("delivered", "dead")


@dataclass
class Accepted:
    """The pairs owed, and how receivers name each subscriber."""

    pairs: set[tuple[int, int]] = field(default_factory=set)
    keys: dict[str, int] = field(default_factory=dict)  # receiver key -> subscriber id

    @property
    def message_ids(self) -> list[int]:
        return sorted({m for m, _ in self.pairs})


@dataclass
class Result:
    scenario: str
    accepted: int = 0
    delivered: int = 0
    dead: int = 0
    lost: int = 0
    dup_after_dedupe: int = 0
    dup_raw: int = 0
    settle_s: float = 0.0
    failures: list[str] = field(default_factory=list)  # checks of the scenario that failed
    notes: list[str] = field(default_factory=list)  # facts worth a line, not failures
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return (
            not self.skipped
            and self.lost == 0
            and self.dup_after_dedupe == 0
            and self.accepted > 0
            and not self.failures
        )

    def line(self) -> str:
        if self.skipped:
            return f"{self.scenario} SKIPPED: {self.skipped}"
        return (
            f"{self.scenario} accepted={self.accepted} delivered={self.delivered} "
            f"dead={self.dead} lost={self.lost} dup_after_dedupe={self.dup_after_dedupe} "
            f"dup_raw={self.dup_raw} settle_s={self.settle_s:.1f}"
        )


def accepted_for(chaos: Chaos, channel_subscribers: Mapping[int, Iterable[int]]) -> set[int]:
    """Messages committed on these channels (the outbox is written with them)."""
    with chaos.admin() as conn:
        rows = conn.execute(
            "SELECT message_id FROM outbox WHERE channel_id = ANY(%s)",
            (list(channel_subscribers),),
        ).fetchall()
    return {int(r[0]) for r in rows}


def unsettled(chaos: Chaos, accepted: Accepted) -> int:
    """Pairs not yet final: no row yet, or a row pending / retrying."""
    ids = accepted.message_ids
    with chaos.admin() as conn:
        final = conn.execute(
            "SELECT count(*) FROM deliveries WHERE message_id = ANY(%s) AND status = ANY(%s)",
            (ids, list(FINAL)),
        ).fetchone()
    return len(accepted.pairs) - int(final[0] if final else 0)


def reconcile(
    chaos: Chaos, scenario: str, accepted: Accepted, receipts: Iterable[Receipt]
) -> Result:
    result = Result(scenario, accepted=len(accepted.pairs))
    with chaos.admin() as conn:
        rows: list[Any] = conn.execute(
            "SELECT id, message_id, subscriber_id, status, attempts, last_error "
            "FROM deliveries WHERE message_id = ANY(%s)",
            (accepted.message_ids,),
        ).fetchall()
        attempt_rows: list[Any] = conn.execute(
            "SELECT a.delivery_id, a.attempt FROM delivery_attempts a "
            "JOIN deliveries d ON d.id = a.delivery_id WHERE d.message_id = ANY(%s)",
            (accepted.message_ids,),
        ).fetchall()

    by_pair: dict[tuple[int, int], list[Any]] = defaultdict(list)
    for row in rows:
        by_pair[(row[1], row[2])].append(row)
    ours = {row[0] for row in rows}
    got = list(receipts)
    acks = Counter(r.delivery_id for r in got if r.acked)
    tries = Counter(r.delivery_id for r in got)

    why_lost: Counter[str] = Counter()
    for pair in accepted.pairs:
        found = by_pair.get(pair, [])
        if not found:
            why_lost["no delivery row"] += 1
            continue
        if len(found) > 1:
            result.dup_after_dedupe += len(found) - 1
        row = found[0]
        status, last_error = row[3], row[5]
        if status == "delivered" and acks[row[0]] > 0:
            result.delivered += 1
        elif status == "delivered":
            why_lost["delivered in the database, never acknowledged by a receiver"] += 1
        elif status == "dead" and last_error:
            result.dead += 1
        elif status == "dead":
            why_lost["dead without a reason"] += 1
        else:
            why_lost[f"still {status} after the settle timeout"] += 1
    result.lost = sum(why_lost.values())
    for reason, count in why_lost.items():
        result.failures.append(f"lost {count}: {reason}")

    strangers = {d for d in acks if d not in ours}
    if strangers:
        result.dup_after_dedupe += len(strangers)
        result.failures.append(f"{len(strangers)} acknowledged ids are no delivery of this run")
    per_pair: dict[tuple[int | None, int | None], set[int | None]] = defaultdict(set)
    for r in got:
        if r.acked:
            per_pair[(r.message_id, accepted.keys.get(r.subscriber_key))].add(r.delivery_id)
    twice = sum(len(ids) - 1 for ids in per_pair.values() if len(ids) > 1)
    if twice:
        result.dup_after_dedupe += twice
        result.failures.append(f"{twice} (message, subscriber) pairs acknowledged under two ids")
    result.dup_raw = sum(c - 1 for c in acks.values() if c > 1)

    # One attempt row per recorded try, numbered 1..attempts without gaps.
    numbers: dict[int, list[int]] = defaultdict(list)
    for delivery_id, attempt in attempt_rows:
        numbers[delivery_id].append(attempt)
    bad = [r[0] for r in rows if sorted(numbers.get(r[0], [])) != list(range(1, r[4] + 1))]
    if bad:
        result.failures.append(f"{len(bad)} deliveries whose attempt rows do not match attempts")
    unrecorded = sum(max(0, tries[r[0]] - r[4]) for r in rows)
    if unrecorded:
        result.notes.append(
            f"{unrecorded} tries reached a receiver without an attempt row "
            "(the try was killed or cancelled before its row was written)"
        )
    dead_acked = sum(1 for r in rows if r[3] == "dead" and acks[r[0]] > 0)
    if dead_acked:
        result.notes.append(f"{dead_acked} dead deliveries had been acknowledged by the receiver")
    return result
