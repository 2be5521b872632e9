"""Generated same-topic chatter: handwritten templates filled with near-miss identifiers."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from typing import Any

Exchange = list[list[str]]

# {item} a value from a slot list; {item2} a second, different value from the same list;
# {#order} a fresh identifier made from the pattern ids["order"].
_SLOT = re.compile(r"\{(#?)([a-z_]+?)(\d*)\}")
_DIGIT = "#"
# A template line may offer alternative wordings: "Nice. || Good to hear."
_OR = " || "
# Fresh identifiers are drawn until one is unused; a pattern this crowded is a data error.
_MAX_DRAWS = 1000


class ChatterGenerator:
    """Fills one user's chatter templates, topic by topic, from one seeded RNG.

    A user's `generated` spec holds `ids` (identifier patterns, `#` a digit), shared `slots`
    (lists of values) and `topics`, each with its own `slots` and its `templates`: exchanges
    whose lines may hold slots and alternative wordings. A topic's templates are drawn in a
    shuffled order and come round again only once all of them have been used; an exchange
    whose opening line the user has already said is drawn again. A fresh identifier never
    appears in the user's written text (scenes, chatter, questions) and is never drawn twice,
    so a generated near-miss (`#A-96610` beside the evidence's `#A-96604`) is never evidence.
    """

    def __init__(self, spec: dict[str, Any], written: str, seed: str) -> None:
        self._ids: dict[str, str] = spec.get("ids", {})
        self._slots: dict[str, list[str]] = spec.get("slots", {})
        self._topics: dict[str, dict[str, Any]] = spec.get("topics", {})
        self._written = written
        # A string seed is hashed with SHA-512, so the output does not depend on PYTHONHASHSEED.
        self._rng = random.Random(seed)
        self._drawn: set[str] = set()
        self._said: set[str] = set()
        self._streams: dict[str, Iterator[Exchange]] = {}
        self._check()

    def _check(self) -> None:
        """Every slot a template names resolves, so a typo fails at load, not mid-corpus."""
        for name, topic in self._topics.items():
            known = {*topic.get("slots", {}), *self._slots}
            for template in topic["templates"]:
                for line in template:
                    for fresh, slot, _ in _SLOT.findall(line[1]):
                        if slot not in (self._ids if fresh else known):
                            raise ValueError(f"topic {name!r}: unknown slot {slot!r}")

    def exchanges(self, topics: list[str]) -> list[Exchange]:
        """One filled exchange per topic named, in the order named."""
        return [self._exchange(topic) for topic in topics]

    def _exchange(self, topic: str) -> Exchange:
        # A user who says the very same line twice sounds like a template, so an exchange
        # that opens with a line already generated is drawn again, a few times at most.
        stream = self._stream(topic)
        for _ in range(len(self._topics[topic]["templates"])):
            exchange = self._fill(topic, next(stream))
            if exchange[0][1] not in self._said:
                break
        self._said.add(exchange[0][1])
        return exchange

    def _stream(self, topic: str) -> Iterator[Exchange]:
        if topic not in self._topics:
            raise ValueError(f"no chatter templates for topic {topic!r}")
        if topic not in self._streams:
            self._streams[topic] = self._shuffled(self._topics[topic]["templates"])
        return self._streams[topic]

    def _shuffled(self, templates: list[Exchange]) -> Iterator[Exchange]:
        while True:
            order = list(range(len(templates)))
            self._rng.shuffle(order)
            for i in order:
                yield templates[i]

    def _fill(self, topic: str, template: Exchange) -> Exchange:
        # One value per slot within an exchange ("{item}" twice is the same item), and
        # different values for "{item}" and "{item2}".
        values: dict[str, str] = {}
        chosen: dict[str, set[str]] = {}
        local: dict[str, list[str]] = self._topics[topic].get("slots", {})

        def value(match: re.Match[str]) -> str:
            slot, (fresh, name, _) = match.group(0), match.groups()
            if slot not in values:
                if fresh:
                    values[slot] = self._fresh(name)
                else:
                    taken = chosen.setdefault(name, set())
                    pool = [v for v in local.get(name) or self._slots[name] if v not in taken]
                    choice = self._rng.choice(pool)
                    taken.add(choice)
                    values[slot] = choice
            return values[slot]

        lines = [[line[0], self._rng.choice(line[1].split(_OR))] for line in template]
        return [[speaker, _SLOT.sub(value, text)] for speaker, text in lines]

    def _fresh(self, name: str) -> str:
        pattern = self._ids[name]
        for _ in range(_MAX_DRAWS):
            candidate = "".join(str(self._rng.randrange(10)) if c == _DIGIT else c for c in pattern)
            if candidate not in self._drawn and candidate not in self._written:
                self._drawn.add(candidate)
                return candidate
        raise ValueError(f"identifier pattern {name!r} has run out of fresh values")
