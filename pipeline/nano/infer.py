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

from pipeline.mcq import ShuffledMCQ
from pipeline.nano.encode import ids, prompt_text, reader_tree
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


class NanoReader:
    """The nano reader: scores every shown option (' ' + text) after the reward's prompt and pre-fill."""

    def __init__(self, path: str | Path, groups_per_batch: int = 32, device: str = "cpu") -> None:
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.groups_per_batch = groups_per_batch

    @torch.no_grad()
    def score(self, items: Sequence[tuple[str, ShuffledMCQ]]) -> list[list[float]]:
        """Log-likelihood of each shown option for each (caption, shown MCQ); all must show the same count."""
        out: list[list[float]] = []
        for i in range(0, len(items), self.groups_per_batch):
            chunk = items[i: i + self.groups_per_batch]
            prefix, mids, leaves, _ = reader_tree(self.tok, [(c, [s]) for c, s in chunk])
            mids = [m + row[0] for m, row in zip(mids, leaves, strict=True)]
            k = len(chunk[0][1].options)
            opts = [[ids(self.tok, " " + o) for o in s.options] for _, s in chunk]
            ml, ll, li, lm = tree_forward(self.model, prefix, mids, opts, self.tok.pad_token_id)
            lp = leaf_logprobs(ml, ll, li, lm, k).view(len(chunk), k)
            out += lp.tolist()
        return out

    def answer(self, items: Sequence[tuple[str, ShuffledMCQ]]) -> list[int]:
        """Index of the chosen (most likely) option for each item."""
        return [max(range(len(s)), key=s.__getitem__) for s in self.score(items)]
