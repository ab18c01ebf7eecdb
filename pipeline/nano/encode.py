"""Turning nano examples into token ids: prompts exactly as the engines render them, targets, reader trees."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from pipeline.mcq import READER_PREFILL, ShuffledMCQ, reader_messages
from pipeline.nano import world
from pipeline.nano.builders import IMAGE_TOKENS
from pipeline.nano.data import DrillQA, Example

END = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"


def prompt_text(tok: PreTrainedTokenizerBase, messages: list[dict], prefill: str = "") -> str:
    """Chat template with the generation prompt, then the assistant pre-fill."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill


def ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok: PreTrainedTokenizerBase, ex: Example) -> list[int]:
    """The example's prompt (+ pre-fill) tokens, image placeholders expanded: encode_example's first part."""
    return ids(tok, prompt_text(tok, ex.messages, ex.prefill).replace(IMAGE_PAD, IMAGE_PAD * IMAGE_TOKENS))


def encode_example(tok: PreTrainedTokenizerBase, ex: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are -100 on the prompt, the target + end-of-turn token otherwise."""
    p, t = prompt_ids(tok, ex), ids(tok, ex.target + END)
    return p + t, [-100] * len(p) + t


def target_offsets(tok: PreTrainedTokenizerBase, ex: Example) -> list[tuple[int, int]]:
    """Character spans in ex.target of the target tokens encode_example appends after the prompt."""
    return tok(ex.target + END, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


@dataclass
class VLBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    image_token_id: int = -1

    @property
    def mm_token_type_ids(self) -> torch.Tensor:
        """1 on image placeholder tokens, 0 elsewhere: what the Qwen2.5-VL processor returns, and what the
        model needs to give image tokens their 3-D (t, h, w) rotary positions. Without it the model
        falls back to 1-D positions, so a model trained without it fails under every real processor."""
        return (self.input_ids == self.image_token_id).long()

    def model_inputs(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        d = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
             "mm_token_type_ids": self.mm_token_type_ids}
        if self.pixel_values is not None:
            d["pixel_values"] = self.pixel_values
            d["image_grid_thw"] = self.image_grid_thw
        return {k: v.to(device) for k, v in d.items()}


def pad_right(enc: Sequence[tuple[list[int], list[int]]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels) rows -> right-padded input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(i) for i, _ in enc)
    input_ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for r, (i, lab) in enumerate(enc):
        input_ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return input_ids, mask, labels


def collate_vl(tok: PreTrainedTokenizerBase, image_processor, examples: Sequence[Example]) -> VLBatch:
    """Right-padded batch; pixel values for the examples that carry an image, in order."""
    input_ids, mask, labels = pad_right([encode_example(tok, ex) for ex in examples], tok.pad_token_id)
    images: list[Image.Image] = [ex.image for ex in examples if ex.image is not None]
    pv = grid = None
    if images:
        feats = image_processor(images=images, return_tensors="pt")
        pv, grid = feats["pixel_values"], feats["image_grid_thw"]
    return VLBatch(input_ids, mask, labels, pv, grid, tok.convert_tokens_to_ids(IMAGE_PAD))


_ANSWER_LINE = re.compile(r"^Answer: (?P<letter>[A-D])\) (?P<text>.+)$", re.M)


def answer_copy_spans(text: str) -> list[tuple[int, int, int]]:
    """(answer text start, option text start, length) for every 'Answer: X) text' line of generator-format
    text whose option line '- X) text' precedes it in the same question (character offsets)."""
    spans = []
    block_start = 0
    for m in _ANSWER_LINE.finditer(text):
        opt = re.compile(rf"^- {m['letter']}\) {re.escape(m['text'])}$", re.M).search(text, block_start, m.start())
        if opt is not None:
            spans.append((m.start("text"), opt.start() + len(f"- {m['letter']}) "), len(m["text"])))
        block_start = m.end()
    return spans


def answer_copy_targets(tok: PreTrainedTokenizerBase, ex: Example) -> list[tuple[int, int]]:
    """Attention supervision for a generator example, in encode_example's positions: each position that
    predicts a token of an answer line's text attends to the same token of the option line it names, so
    the answer text is a copy of the chosen option (the letter is the only decision)."""
    prompt_len, offsets = len(prompt_ids(tok, ex)), target_offsets(tok, ex)
    pairs = []
    for answer, option, length in answer_copy_spans(ex.target):
        for k, (a, e) in enumerate(offsets):  # a token's span may start at the space before its word
            if a < answer + length and e > answer:
                pairs.append((prompt_len + k - 1, prompt_len + token_at(offsets, option + e - 1 - answer)))
    return pairs


_FIRST_OPTION = re.compile(r"^- A\) ", re.M)


def first_option_targets(tok: PreTrainedTokenizerBase, ex: Example) -> list[tuple[int, int]]:
    """Attention supervision for a generator example, in encode_example's positions: the position that
    predicts each answer letter attends to the first token of that question's option A. With colour
    options a window of the pool (`data.generator_layout`), the letter is the answer's offset from option
    A, so the letter needs the answer (from the image) and option A (from here)."""
    prompt_len, offsets = len(prompt_ids(tok, ex)), target_offsets(tok, ex)
    pairs = []
    for m in _ANSWER_LINE.finditer(ex.target):
        option_a = [o for o in _FIRST_OPTION.finditer(ex.target, 0, m.start())][-1]
        letter = token_at(offsets, m.start("letter"))
        pairs.append((prompt_len + letter - 1, prompt_len + token_at(offsets, option_a.end())))
    return pairs


def quadrant_tokens(position: str) -> list[int]:
    """Indices (among an image's IMAGE_TOKENS placeholder tokens, raster order of the merged grid) of the
    tokens that cover a world position's quadrant."""
    side = int(IMAGE_TOKENS ** 0.5)
    half = side // 2
    row0 = 0 if "top" in position else half
    col0 = 0 if "left" in position else half
    return [r * side + c for r in range(row0, row0 + half) for c in range(col0, col0 + half)]


_QUESTION_LINE = re.compile(r"Question: (?P<q>[^\n]+)")
_WORDS = {"shape": re.compile(r"\b(?:" + "|".join(world.SHAPES) + r")\b"),
          "color": re.compile(r"\b(?:" + "|".join(world.COLORS) + r")\b")}
_LEAK_WORDS = {"shape": _WORDS["shape"], "color": re.compile("|".join(world.COLORS + world.BACKGROUNDS))}


def question_word_targets(tok: PreTrainedTokenizerBase, ex: Example, kind: str) -> list[tuple[int, int]]:
    """Attention supervision for a gate-filter query with the image whose question names its object by
    look ("What color is the star?", "Where is the red star?"): the positions that predict the answer's
    value tokens attend to the question's shape word (kind "shape") or colour word ("color"), in
    encode_example's positions. A leaky query without the image (task `filter_leak`) whose question states
    its answer ("What color is the red star?" -> red) gets the same target when that word is the answer:
    the head that gathers the word is the one that copies it. Empty for other queries."""
    if ex.task not in ("filter", "filter_leak") or (ex.task == "filter" and ex.image is None):
        return []
    text = prompt_text(tok, ex.messages, ex.prefill).replace(IMAGE_PAD, IMAGE_PAD * IMAGE_TOKENS)
    line = _QUESTION_LINE.search(text)
    if ex.task == "filter_leak":  # the stated answer, when it is a word of this head's kind
        value = ex.target.strip().rstrip(".")
        pattern = _LEAK_WORDS[kind].fullmatch(value) and re.compile(rf"\b{value}\b")
    else:
        pattern = _WORDS[kind]
    word = pattern.search(text, line.start("q"), line.end("q")) if line and pattern else None
    if word is None:
        return []
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    key = token_at(offsets, word.end() - 1)
    return [(q, key) for q in _value_queries(tok, ex, len(offsets))]


def _value_queries(tok: PreTrainedTokenizerBase, ex: Example, prompt_len: int) -> list[int]:
    """The positions that predict an option-text answer's value tokens (' ' + value, the '.' left out)."""
    value = ex.target.strip().rstrip(".")
    return [prompt_len - 1 + k for k in range(len(ids(tok, " " + value)))]


def image_token_labels(scene: world.Scene) -> dict[str, list[int]]:
    """Per image token (raster order of the merged grid): its quadrant (index in world.POSITIONS) and the
    shape and colour of the object in that quadrant (indices in world.SHAPES / COLORS; none: one past)."""
    out = {"position": [0] * IMAGE_TOKENS, "shape": [len(world.SHAPES)] * IMAGE_TOKENS,
           "color": [len(world.COLORS)] * IMAGE_TOKENS}
    for q, pos in enumerate(world.POSITIONS):
        for k in quadrant_tokens(pos):
            out["position"][k] = q
    for o in scene.objects:
        for k in quadrant_tokens(o.position):
            out["shape"][k], out["color"][k] = world.SHAPES.index(o.shape), world.COLORS.index(o.color)
    return out


def image_region_targets(tok: PreTrainedTokenizerBase, ex: Example) -> list[tuple[int, list[int]]]:
    """Attention supervision towards the object a question is about (`Example.about`), in encode_example's
    positions: the positions that predict a gate-filter answer's value tokens, or an MCQ generation's
    answer letter and answer text, attend to the image tokens of that object's quadrant."""
    if ex.image is None or not any(ex.about):
        return []
    prompt = prompt_ids(tok, ex)
    pads = [i for i, t in enumerate(prompt) if t == tok.convert_tokens_to_ids(IMAGE_PAD)]
    first = len(prompt) - 1  # predicts the first target token
    if ex.task == "qagen":
        offsets = target_offsets(tok, ex)
        queries: list[list[int]] = []
        for m in _ANSWER_LINE.finditer(ex.target):  # the letter and every token of the answer text
            text = [k for k, (a, e) in enumerate(offsets) if a < m.end("text") and e > m.start("text")]
            queries.append([first + k for k in [token_at(offsets, m.start("letter")), *text]])
    else:
        queries = [_value_queries(tok, ex, len(prompt))]
    return [(q, [pads[k] for k in quadrant_tokens(pos)])
            for pos, qs in zip(ex.about, queries, strict=True) if pos is not None for q in qs]


# -- reader trees ---------------------------------------------------------------------------------
_CAPTION_OPEN = "<caption>\n"
_QUESTION = "Question:"


def split_reader_prompt(tok: PreTrainedTokenizerBase, caption: str, shown: ShuffledMCQ,
                        few_shot: bool = True) -> tuple[str, str, str]:
    """The reader prompt (+ pre-fill) cut into (shared prefix, caption part, question part).

    The cuts fall on pre-token boundaries, so tokenizing the parts equals tokenizing the whole.
    """
    full = prompt_text(tok, reader_messages(caption, shown, few_shot=few_shot), READER_PREFILL)
    cut1 = full.rindex(_CAPTION_OPEN) + len(_CAPTION_OPEN)
    cut2 = full.rindex(_QUESTION)
    return full[:cut1], full[cut1:cut2], full[cut2:]


def reader_tree(tok: PreTrainedTokenizerBase, groups: Sequence[tuple[str, Sequence[ShuffledMCQ]]],
                targets: Sequence[Sequence[str]] | None = None, few_shot: bool = True,
                ) -> tuple[list[int], list[list[int]], list[list[list[int]]], list[list[int]]]:
    """Token ids for prefix -> caption -> question(+target) trees; also each leaf's prompt length."""
    prefix = None
    mids, leaves, prompt_lens = [], [], []
    for g, (caption, shows) in enumerate(groups):
        row, lens = [], []
        for j, shown in enumerate(shows):
            pre, mid, q = split_reader_prompt(tok, caption, shown, few_shot)
            if prefix is None:
                prefix = ids(tok, pre)
            if j == 0:
                mids.append(ids(tok, mid))
            q_ids = ids(tok, q)
            lens.append(len(q_ids))
            row.append(q_ids + (ids(tok, targets[g][j] + END) if targets is not None else []))
        leaves.append(row)
        prompt_lens.append(lens)
    assert prefix is not None
    return prefix, mids, leaves, prompt_lens


# -- reader drill ---------------------------------------------------------------------------------
_DRILL_CAPTION = "Caption: "


@dataclass
class DrillRow:
    """A tokenized drill sequence: ids, labels (only on ' value.' tokens) and attention supervision:
    (query position, caption token position) pairs, the query being each position that predicts a value
    token and the target the caption token where the caption states the answer."""

    ids: list[int]
    labels: list[int]
    attend: list[tuple[int, int]]


def token_at(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token that covers character `char` (the last one starting at or before it)."""
    return max(i for i, (a, _) in enumerate(offsets) if a <= char)


def drill_ids(tok: PreTrainedTokenizerBase, caption: str, qas: Sequence[DrillQA]) -> DrillRow:
    """'Caption: ...' then 'Question: q' / 'The answer is value.' lines; labels only on ' value.'."""
    head = f"{_DRILL_CAPTION}{caption}\n"
    enc = tok(head, add_special_tokens=False, return_offsets_mapping=True)
    seq, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [-100] * len(seq)
    attend: list[tuple[int, int]] = []
    for qa in qas:
        q = ids(tok, f"{_QUESTION} {qa.question}\n{READER_PREFILL}")
        a = ids(tok, f" {qa.value}.\n")
        if qa.evidence is not None:
            target = token_at(offsets, len(_DRILL_CAPTION) + qa.evidence - 1)
            first = len(seq) + len(q) - 1  # the position that predicts the first value token
            attend += [(first + k, target) for k in range(len(ids(tok, f" {qa.value}")))]
        seq += q + a
        labels += [-100] * len(q) + a
    return DrillRow(seq, labels, attend)


def collate_drill(tok: PreTrainedTokenizerBase, rows: Sequence[tuple[str, Sequence[DrillQA]]]
                  ) -> tuple[dict[str, torch.Tensor], list[list[tuple[int, int]]]]:
    """Right-padded batch of drill sequences (input_ids, attention_mask, labels) and each row's
    attention supervision pairs."""
    enc = [drill_ids(tok, cap, qas) for cap, qas in rows]
    input_ids, mask, labels = pad_right([(r.ids, r.labels) for r in enc], tok.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}, [r.attend for r in enc]
