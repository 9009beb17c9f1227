"""A character-level transformer language model over ``corpus.txt`` (the opening of *Alice's
Adventures in Wonderland*, public domain), trained with a curriculum over the context length.

It shows what a real language-model user brings: dict batches (``{"input": ..., "target": ...}``),
a perplexity metric, and a dataset that needs the curriculum's knob in its worker processes, so
it opts in to kktrain's ``SampleKey`` (``sample_keys = True``): each item is
``dataset[SampleKey(index, seed, knobs)]`` and its window length is ``knobs["seq_len"]``.

    kktrain run --task char_lm:CharLMTask --plugin curriculum \\
        -o curriculum.stages='[{until_fraction = 0.5, knobs = {seq_len = 16}}, {knobs = {seq_len = 64}}]'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

CORPUS = Path(__file__).with_name("corpus.txt")


class Options(BaseModel):
    """``-o task.KEY=VALUE``."""

    model_config = ConfigDict(extra="forbid")
    d_model: int = Field(64, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    seq_len: int = Field(64, ge=2, le=256)
    """The longest context (the curriculum's knob moves up to it)."""
    samples: int = Field(4096, ge=64)
    """Windows per epoch."""


class Corpus:
    """The text as token ids: 90 % to train, the rest held out."""

    def __init__(self, path: Path = CORPUS) -> None:
        text = path.read_text(encoding="utf-8")
        self.chars = sorted(set(text))
        self.ids = torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)
        cut = int(len(self.ids) * 0.9)
        self.train, self.val = self.ids[:cut], self.ids[cut:]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class Windows(torch.utils.data.Dataset):
    """Random windows of ``seq_len`` (a knob) characters; the start comes from the key's seed."""

    sample_keys = True

    def __init__(self, ids: torch.Tensor, length: int, seq_len: int) -> None:
        self.ids, self.length, self.seq_len = ids, length, seq_len

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: Any) -> dict[str, torch.Tensor]:
        seq_len = int(key.knobs.get("seq_len", self.seq_len))
        start = key.seed % (len(self.ids) - seq_len - 1)
        chunk = self.ids[start : start + seq_len + 1]
        return {"input": chunk[:-1], "target": chunk[1:]}


class HeldOut(torch.utils.data.Dataset):
    """Consecutive windows of the held-out text (plain int indices: no knobs needed)."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        self.ids, self.seq_len = ids, seq_len

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = self.ids[i * self.seq_len : (i + 1) * self.seq_len + 1]
        return {"input": chunk[:-1], "target": chunk[1:]}


class CharTransformer(nn.Module):
    """A small causal transformer."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.head(self.blocks(x, mask=mask, is_causal=True))


class CharLMTask:
    """Predict the next character of Alice in Wonderland."""

    name = "char-lm"
    Options = Options

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.corpus = Corpus()

    def config_defaults(self) -> dict[str, Any]:
        return {"batch_size": 32, "max_steps": 300, "val_every": 100, "log_every": 25, "optimizer.lr": 3e-3,
                "optimizer.no_decay": True, "checkpoint.best_metric": "val/ppl"}

    def build_model(self) -> nn.Module:
        o = self.options
        return CharTransformer(self.corpus.vocab, o.d_model, o.layers, o.heads, o.seq_len)

    def train_dataset(self) -> Windows:
        return Windows(self.corpus.train, self.options.samples, self.options.seq_len)

    def val_dataset(self) -> HeldOut:
        return HeldOut(self.corpus.val, self.options.seq_len)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input"])
        return F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten())

    def metrics(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = self.loss(model, batch)
        # ppl of the batch; val/ppl is their mean (close to exp(val/loss) for equal-size windows).
        return {"loss": loss, "ppl": loss.exp(), "bits_per_char": loss / math.log(2)}

    def default_knobs(self) -> dict[str, Any]:
        return {"seq_len": self.options.seq_len}

    def example_input(self) -> torch.Tensor:
        return self.corpus.val[: self.options.seq_len].unsqueeze(0)

    @torch.no_grad()
    def sample(self, model: nn.Module, prompt: str, length: int = 80) -> str:
        """Greedy continuation of ``prompt`` (characters outside the corpus are dropped)."""
        ids = [self.corpus.chars.index(c) for c in prompt if c in self.corpus.chars]
        for _ in range(length):
            context = torch.tensor([ids[-self.options.seq_len :]])
            ids.append(int(model(context)[0, -1].argmax()))
        return self.corpus.decode(ids)


def make_task(options: Options | None = None) -> CharLMTask:
    """``--task char_lm:make_task``."""
    return CharLMTask(options)


make_task.Options = Options  # type: ignore[attr-defined]
