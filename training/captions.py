"""Caption policy applied at training time: trigger word, tag shuffling, caption dropout."""

from __future__ import annotations

import random
from dataclasses import dataclass

TRIGGER = "{trigger}"  # in a caption (or the dataset's caption for images without one): where the trigger goes


@dataclass(frozen=True)
class CaptionPolicy:
    """How a sample's caption is turned into the prompt the model trains on.

    The trigger is always first and never shuffled; if the caption already contains it (as whole
    tags, anywhere) that copy is moved to the front rather than repeated. ``keep_tokens`` counts
    the caption's own leading tags that stay in place, not the trigger. Tags are re-joined with
    ``", "`` even when nothing is shuffled, so "a,b" renders as "a, b". A caption that says where the trigger
    goes (``TRIGGER``, e.g. "a photo of {trigger}") gets it there instead of in front.
    """

    dropout: float = 0.0  # probability of training on the empty caption instead
    trigger: str = ""  # e.g. "ohwx"; prepended as the first tag
    shuffle: bool = False  # shuffle the tags after the first keep_tokens
    keep_tokens: int = 0
    separator: str = ","  # what splits a caption into tags

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (0.1 drops one caption in ten), got {self.dropout}")
        if not isinstance(self.keep_tokens, int) or self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be an int >= 0, got {self.keep_tokens!r}")
        if not isinstance(self.trigger, str):
            raise ValueError(f"trigger must be a string ('' for none), got {self.trigger!r}")
        if not self.separator:
            raise ValueError("separator is empty; use ',' for comma-separated tags")
        object.__setattr__(self, "trigger", self.trigger.strip())

    @property
    def _joiner(self) -> str:
        return f"{self.separator.strip()} " if self.separator.strip() else " "

    def tags(self, caption: str) -> list[str]:
        """The caption's tags, stripped, empty ones dropped."""
        return [t.strip() for t in caption.split(self.separator) if t.strip()]

    def _split(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """(trigger tags, kept tags, shufflable tags); the trigger's first copy in the caption is removed."""
        if TRIGGER in caption:  # the tags up to the one holding the trigger stay first, in place
            tags = self.tags(caption)
            at = next(i for i, tag in enumerate(tags) if TRIGGER in tag)
            filled = [tag.replace(TRIGGER, self.trigger).strip() for tag in tags]
            head, rest = [t for t in filled[:at + 1] if t], [t for t in filled[at + 1:] if t]
            return head, rest[:self.keep_tokens], rest[self.keep_tokens:]
        head, tags = self.tags(self.trigger), self.tags(caption)
        n = len(head)
        at = next((i for i in range(len(tags) - n + 1) if n and tags[i:i + n] == head), None)
        if at is not None:
            tags = tags[:at] + tags[at + n:]
        return head, tags[:self.keep_tokens], tags[self.keep_tokens:]

    def render(self, caption: str, rng: random.Random) -> str:
        """The prompt for one training step: trigger first, kept tags, then the rest (shuffled if on),
        joined with the separator and a space (``", "``). Only shuffling draws from ``rng``."""
        head, kept, rest = self._split(caption)
        if self.shuffle:
            rng.shuffle(rest)
        return self._joiner.join(head + kept + rest)

    def variants(self, caption: str, count: int, seed: int) -> list[str]:
        """Up to ``count`` distinct renderings, deterministic from ``seed``: what a cache encodes so cached
        training still sees shuffled captions. One when shuffling is off or cannot change anything."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        rng = random.Random(seed)
        found = [self.render(caption, rng)]
        if not self.shuffle or len(self._split(caption)[2]) < 2:
            return found
        for _ in range(count * 20):  # bounded: few tags (or repeated tags) have few distinct orders
            if len(found) == count:
                break
            rendered = self.render(caption, rng)
            if rendered not in found:
                found.append(rendered)
        return found

    def drops(self, rng: random.Random) -> bool:
        """True with probability ``dropout``: train this step on the empty caption's embedding."""
        return self.dropout > 0 and rng.random() < self.dropout
