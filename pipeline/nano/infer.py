"""Plain-HF inference for the nano models (used by the nano eval and tests; the stages use the engines).

Loads through AutoProcessor / AutoModelForImageTextToText / AutoModelForCausalLM exactly like a real
checkpoint. Option scoring = summed log-likelihood of ' ' + option text after the prompt + pre-fill
(the `option_text` answer mode of the contracts).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from pipeline.engines.base import ChatRequest, Generation, Sampling
from pipeline.mcq import READER_PREFILL, ShuffledMCQ, reader_messages
from pipeline.nano.encode import ids, prompt_text
from pipeline.nano.tree import leaf_logprobs, tree_forward


class NanoVL:
    """A nano-VL checkpoint: greedy generation and option scoring, batched."""

    def __init__(self, path: str | Path, batch_size: int = 50, device: str = "cpu") -> None:
        self.processor = AutoProcessor.from_pretrained(path)
        self.tok = self.processor.tokenizer
        self.model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict:
        return self.processor(text=texts, images=images or None, return_tensors="pt", padding=True,
                              padding_side="left").to(self.device)

    @torch.no_grad()
    def generate(self, messages: list[dict], images: Sequence[Image.Image], max_new_tokens: int) -> list[str]:
        """Greedy completions of the same chat prompt for each image."""
        prompt = prompt_text(self.tok, messages)
        out: list[str] = []
        for i in range(0, len(images), self.batch_size):
            chunk = list(images[i: i + self.batch_size])
            batch = self._inputs([prompt] * len(chunk), chunk)
            gen = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            out += self.tok.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    @torch.no_grad()
    def score(self, requests: Sequence[tuple[list[dict], Image.Image | None, str]],
              choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Summed log-likelihood of each choice after (messages, image, prefill)."""
        flat = [(prompt_text(self.tok, m, pre), img, c) for (m, img, pre), cs in zip(requests, choices, strict=True)
                for c in cs]
        scores: list[float] = []
        for i in range(0, len(flat), self.batch_size):
            chunk = flat[i: i + self.batch_size]
            batch = self._inputs([p + c for p, _, c in chunk], [img for _, img, _ in chunk if img is not None])
            logp = torch.log_softmax(self.model(**batch).logits[:, :-1].float(), -1)
            tgt = batch["input_ids"][:, 1:]
            tok_lp = logp.gather(2, tgt[..., None]).squeeze(2)
            for r, (_, _, c) in enumerate(chunk):
                n = len(ids(self.tok, c))
                scores.append(float(tok_lp[r, -n:].sum().cpu()))
        out, k = [], 0
        for cs in choices:
            out.append(scores[k: k + len(cs)])
            k += len(cs)
        return out


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, leaving every row at least one token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(0, n)):
        if any(r[i] != first[i] for r in rows):
            return i
    return max(0, n)


@torch.no_grad()
def tree_score(model: torch.nn.Module, pad_id: int, prompts: Sequence[Sequence[int]],
               choices: Sequence[Sequence[Sequence[int]]], chunk: int = 32) -> list[list[float]]:
    """Summed log-likelihood of each choice's ids after each prompt's ids.

    Prompts are processed in chunks that share their longest common token prefix (computed once)
    and each prompt is computed once for all its choices: equal to scoring every (prompt, choice)
    row on its own, up to float tolerance.
    """
    out: list[list[float] | None] = [None] * len(prompts)
    by_k: dict[int, list[int]] = {}
    for i, cs in enumerate(choices):
        if not cs or any(not c for c in cs):
            raise ValueError(f"request {i}: every choice needs at least one token")
        by_k.setdefault(len(cs), []).append(i)
    for k, idx in by_k.items():
        for s in range(0, len(idx), chunk):
            part = idx[s: s + chunk]
            rows = [list(prompts[i]) for i in part]
            n = _common_prefix(rows)
            if n == 0:
                raise ValueError("prompts must be at least 2 tokens long")
            ml, ll, li, lm = tree_forward(model, rows[0][:n], [r[n:] for r in rows],
                                          [list(choices[i]) for i in part], pad_id)
            lp = leaf_logprobs(ml, ll, li, lm, k).view(len(part), k).cpu().tolist()
            for i, row in zip(part, lp, strict=True):
                out[i] = row
    return [row if row is not None else [] for row in out]


class NanoReader:
    """The nano reader: scores every shown option (' ' + text) after the reward's prompt and pre-fill."""

    def __init__(self, path: str | Path, groups_per_batch: int = 32, device: str = "cpu") -> None:
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.groups_per_batch = groups_per_batch

    def score(self, items: Sequence[tuple[str, ShuffledMCQ]]) -> list[list[float]]:
        """Log-likelihood of each shown option for each (caption, shown MCQ)."""
        prompts = [ids(self.tok, prompt_text(self.tok, reader_messages(c, s), READER_PREFILL)) for c, s in items]
        choices = [[ids(self.tok, " " + o) for o in s.options] for _, s in items]
        return tree_score(self.model, self.tok.pad_token_id, prompts, choices, self.groups_per_batch)

    def answer(self, items: Sequence[tuple[str, ShuffledMCQ]]) -> list[int]:
        """Index of the chosen (most likely) option for each item."""
        return [max(range(len(s)), key=s.__getitem__) for s in self.score(items)]


class NanoReaderEngine(NanoReader):
    """The nano reader behind the Engine protocol (score_choices with shared-prefix batching; greedy or
    sampled generate), so pipeline.reward can use it directly."""

    def __init__(self, path: str | Path, groups_per_batch: int = 32, device: str = "cpu") -> None:
        super().__init__(path, groups_per_batch, device)
        self.model_id = f"nano-tree:{path}"

    def _prompt(self, request: ChatRequest) -> list[int]:
        if request.images:
            raise ValueError("the nano reader is text-only")
        return ids(self.tok, prompt_text(self.tok, request.messages, request.prefill))

    def score_choices(self, requests: Sequence[ChatRequest], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        return tree_score(self.model, self.tok.pad_token_id, [self._prompt(r) for r in requests],
                          [[ids(self.tok, c) for c in cs] for cs in choices], self.groups_per_batch)

    @torch.no_grad()
    def generate(self, requests: Sequence[ChatRequest], params: Sampling) -> list[list[Generation]]:
        torch.manual_seed(params.seed)
        out = []
        for r in requests:
            x = torch.tensor([self._prompt(r)], device=self.model.device)
            gens = []
            for _ in range(params.n):
                kw = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p} \
                    if params.temperature > 0 else {"do_sample": False}
                y = self.model.generate(x, max_new_tokens=params.max_new_tokens, **kw)[0, x.shape[1]:]
                gens.append(Generation(self.tok.decode(y, skip_special_tokens=True), "stop", len(y)))
            out.append(gens)
        return out

    def close(self) -> None:
        pass
