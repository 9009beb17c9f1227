"""The transformer over the cells of a grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kktrain.tasks.latin.vocab import MAX_SIZE, PAD, VOCAB_SIZE, Mode, allowed_tokens

# ------------------------------------------------------------------------------ model


class Block(nn.Module):
    """Pre-norm transformer layer over the cells of a grid; callable as ``block(x)``.

    Padding cells carry the zero vector through the whole network, so a block reads its key mask
    from its input: ``torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`` recomputes
    it exactly, with no mask held in attributes or closures.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d) -> (B, L, d); rows of x that are all zero are padding."""
        batch, length, width = x.shape
        valid = x.ne(0).any(-1, keepdim=True)
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=valid.view(batch, 1, 1, length))
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        x = x + self.mlp(self.norm2(x))
        return x * valid


class LatinTransformer(nn.Module):
    """Encoder over the cells: token + row + column + size + mode embeddings, pre-norm blocks, a symbol head."""

    allowed: torch.Tensor
    pad_only: torch.Tensor

    def __init__(self, d_model: int = 128, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.token = nn.Embedding(VOCAB_SIZE, d_model)
        self.row = nn.Embedding(MAX_SIZE, d_model)
        self.col = nn.Embedding(MAX_SIZE, d_model)
        self.size = nn.Embedding(MAX_SIZE + 1, d_model)
        self.mode = nn.Embedding(len(Mode), d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB_SIZE)
        self.register_buffer("allowed", allowed_tokens().clone(), persistent=False)
        self.register_buffer("pad_only", F.one_hot(torch.tensor(PAD), VOCAB_SIZE).bool(), persistent=False)
        for module in self.modules():  # small init: the residual stream starts near the embeddings
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, size: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, N, VOCAB_SIZE); a token a cell may not hold gets -inf (PAD cells: all but PAD)."""
        batch, big, _ = tokens.shape
        pos = torch.arange(big, device=tokens.device)
        x = self.token(tokens) + self.row(pos)[:, None] + self.col(pos)[None, :]
        x = x + (self.size(size) + self.mode(mode))[:, None, None]
        valid = (tokens != PAD).unsqueeze(-1)
        x = (x * valid).flatten(1, 2)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).view(batch, big, big, VOCAB_SIZE)
        # and/or rather than where: ONNX Runtime has no Where over booleans (export, example_input).
        allowed = (valid & self.allowed[mode, size][:, None, None]) | (~valid & self.pad_only)
        return logits.masked_fill(~allowed, float("-inf"))
