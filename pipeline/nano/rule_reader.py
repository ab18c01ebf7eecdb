"""The demo world's rule reader behind the Engine interface (backend `nano-rule`): a second, independent reader.

It parses the caption between the reader prompt's <caption> markers with the world's caption grammar and
answers the question from what the caption states (pipeline.nano.world.rule_reader_answer); when the caption
does not say, it picks the "cannot answer" option. It cannot be flattered, only informed, which makes it the
demo's audit reader of the train stage (the learned nano-reader is the training reader). Text only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.config import EngineConfig
from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.mcq import LETTERS
from pipeline.nano import world

_TURN = re.compile(r"<caption>\n(?P<caption>.*)\n</caption>\n\nQuestion: (?P<question>.*?)\n(?P<options>.*)\Z", re.S)
_OPTION = re.compile(r"^([A-Z])\) (.*)$")
CHOSEN, OTHER = 0.0, -30.0


def parse_turn(request: ChatRequest) -> tuple[str, str, list[str]]:
    """(caption, question, option texts) of the last user turn of a reader prompt."""
    user = [m for m in request.messages if m.get("role") == "user"]
    content = user[-1]["content"] if user else ""
    m = _TURN.search(content if isinstance(content, str) else "")
    if m is None:
        raise ValueError("not a reader prompt (no <caption> block and question)")
    options = [o.group(2) for o in map(_OPTION.match, m.group("options").splitlines()) if o]
    return m.group("caption"), m.group("question"), options


class RuleReaderEngine:
    """Engine protocol over world.rule_reader_answer (score_choices for option texts or letters; generate)."""

    def __init__(self, config: EngineConfig | None = None):
        self.model_id = "nano-rule-reader:v1"

    def pick(self, request: ChatRequest) -> int:
        caption, question, options = parse_turn(request)
        found = world.rule_reader_answer(caption, question, options[:-1])
        return len(options) - 1 if found is None else found

    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for request, cands in zip(requests, choices, strict=True):
            chosen = self.pick(request)
            out.append([CHOSEN if i == chosen else OTHER for i in range(len(cands))])
        return out

    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        return [[Generation(f" {LETTERS[self.pick(r)]}.", "stop", 2)] * params.n for r in requests]

    def close(self) -> None:
        pass
