"""Abstention: drop the sentences of a caption that its captioner was unsure of, by its own token probabilities.

A captioner that sees imperfectly is wrong mostly where it hesitated. On the demo world every false shape
claim nano-VL makes on 1,000 held-out scenes is a word it wrote at probability < 0.96, 74 of 77 below 0.9,
while the 3,753 of its 4,008 colour and shape words written above 0.9 hold only 3 of the 77 (docs/train.md,
"Abstention"). Utility RL teaches a
captioner to say everything it can see; this gate takes back what it only guessed.

The rule, per sentence (split after '.', '!', '?' or a line break): the sentence is dropped when one of its
*content words* was written at a probability below `min_prob`. A word's probability is the lowest of the
tokens it is made of (the first token carries the choice, the rest are usually ~1); a content word is a run
of letters that is not a function word (STOPWORDS) and not the sentence's first word (sentence openers
such as "The", "Additionally", "Overall" are a choice of style, not a claim). The probabilities are the
model's own, before temperature or top-p (engines return them with `Sampling(logprobs=True)`).
Dropped sentences are returned beside the kept text, so a manifest can keep them: nothing is lost.
The threshold is per model: choose it on data with truth (tools/calibrate_abstain.py on the demo world) or with
evaluate's judge on a sample.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

TokenLogprob = tuple[str, float]
"""One generated token: its text piece and the log-probability the model gave it."""

STOPWORDS = frozenset("""
a an the this that these those there here it its it's they them their he she his her we our you your
is are was were be been being am has have had having do does did can could may might will would shall should
of on in at to by for from with without into onto over under above below between among through across near
and or but nor so yet as than then also too very just only both either neither each every some any
which who whom whose what where when while whereas how if because although though thus therefore however
image picture photo photograph shows show showing shown depicts depicting features featuring appears
appear seems seem visible can see seen looks look like
""".split())
"""Function words never gated (plus words about the picture itself): their probability is a matter of style."""

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


@dataclass(frozen=True)
class Abstained:
    """A caption after the gate: the text kept and the sentences dropped (in order)."""

    text: str
    dropped: tuple[str, ...] = ()
    gated: bool = True
    """False when the gate could not run (no token probabilities, or pieces that do not spell the text)."""


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`; whitespace between them goes with the next."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < len(text):
        m = _SENTENCE_END.search(text, pos)
        end = m.end() if m else len(text)
        spans.append((pos, end))
        pos = end
    return spans


def word_probs(tokens: Sequence[TokenLogprob]) -> list[tuple[str, float, int, int]]:
    """(word, probability, start, end) for every word of the text the tokens spell; a word's probability is that
    of the least sure token overlapping it (with the tokens spelling nothing just before it: the first bytes of a
    split character). One pass over words and tokens together (linear in the caption)."""
    text = "".join(piece for piece, _ in tokens)
    ends, pos = [], 0
    for piece, _ in tokens:
        pos += len(piece)
        ends.append(pos)
    out = []
    t = 0  # the first token that may overlap the current word
    for m in _WORD.finditer(text):
        while t < len(tokens) and ends[t] <= m.start():
            t += 1
        lowest, k = 0.0, t
        while k < len(tokens) and ends[k] - len(tokens[k][0]) < m.end():
            lowest = min(lowest, tokens[k][1])
            k += 1
        k = t - 1  # the byte tokens of a character split over several spell nothing: the first carries the choice
        while k >= 0 and not tokens[k][0]:
            lowest = min(lowest, tokens[k][1])
            k -= 1
        out.append((m.group(0), math.exp(lowest), m.start(), m.end()))
    return out


def abstain(tokens: Sequence[TokenLogprob], min_prob: float) -> Abstained:
    """The caption spelled by `tokens` with every sentence holding an unsure content word dropped."""
    text = "".join(piece for piece, _ in tokens)
    if min_prob <= 0:
        return Abstained(text.strip())
    words = word_probs(tokens)
    kept: list[str] = []
    dropped: list[str] = []
    w = 0
    for start, end in sentences(text):
        inside = []
        while w < len(words) and words[w][2] < end:
            inside.append(words[w])
            w += 1
        sentence = text[start:end]
        if not sentence.strip():
            continue
        unsure = any(p < min_prob for k, (word, p, _, _) in enumerate(inside) if k > 0 and word.lower() not in STOPWORDS)
        (dropped if unsure else kept).append(sentence)
    return Abstained("".join(kept).strip(), tuple(s.strip() for s in dropped))


def gate(text: str, tokens: Sequence[TokenLogprob] | None, min_prob: float) -> Abstained:
    """`abstain` when the engine returned token probabilities that spell `text`; else `text` unchanged with
    `gated=False` (the gate off, a backend without probabilities, or pieces that do not spell the text)."""
    if min_prob <= 0:
        return Abstained(text.strip())
    if not tokens or "".join(piece for piece, _ in tokens).strip() != text.strip():
        return Abstained(text.strip(), gated=False)
    return abstain(tokens, min_prob)


def spelling(pieces: Sequence[TokenLogprob], text: str) -> tuple[TokenLogprob, ...] | None:
    """The leading pieces that spell `text` (a stop string may have cut the text inside the last one, which
    is then cut too); None when they do not."""
    out: list[TokenLogprob] = []
    pos = 0
    for piece, logprob in pieces:
        if pos >= len(text):
            break
        take = piece[: len(text) - pos]
        out.append((take, logprob))
        pos += len(take)
    return tuple(out) if "".join(p for p, _ in out) == text else None


MAX_GAP = 4
"""`align` gives at most this many characters of the text to tokens whose own piece is unknown."""


def align(pieces: Sequence[TokenLogprob], text: str) -> tuple[TokenLogprob, ...] | None:
    """Pieces as a server reports them, fitted to the text it returned: a piece that is not the text's next
    characters (a special token the text skips, a byte of a character that arrives as '') spells nothing, and
    the few characters no piece spells (a replacement character for invalid bytes; never a letter or digit) go
    to the last such token before them. None when the pieces cannot be fitted."""
    out: list[TokenLogprob] = []
    pos = 0
    unspelled: list[int] = []  # tokens since the last fitted piece that spelled nothing

    def give_gap(upto: int) -> bool:
        nonlocal pos
        gap = text[pos:upto]
        if not gap:
            return True
        if len(gap) > MAX_GAP or any(ch.isalnum() for ch in gap):  # a gap never holds a word's letters
            return False
        if unspelled:
            k = unspelled[-1]
            out[k] = (out[k][0] + gap, out[k][1])
        elif out:
            out[-1] = (out[-1][0] + gap, out[-1][1])
        else:
            return False
        pos = upto
        return True

    for piece, logprob in pieces:
        at = text.find(piece, pos, pos + MAX_GAP + len(piece)) if piece else -1
        if at < 0:
            out.append(("", logprob))
            unspelled.append(len(out) - 1)
            continue
        if not give_gap(at):
            return None
        out.append((piece, logprob))
        pos = at + len(piece)
        unspelled = []
    if not give_gap(len(text)):
        return None
    return tuple(out) if "".join(p for p, _ in out) == text else None
