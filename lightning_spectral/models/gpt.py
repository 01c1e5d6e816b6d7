"""A GPT-style decoder-only transformer (Vaswani et al. 2017, "Attention is all you need";
Radford et al. 2019, "Language models are unsupervised multitask learners" (GPT-2); the layout
follows Karpathy's nanoGPT).

Pre-norm residual blocks ``x + attn(LN(x))``, ``x + mlp(LN(x))``; causal multi-head attention
through ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``. The query, key,
value and output projections are four separate ``nn.Linear`` maps ``n_embd → n_embd``, so a
matrix optimizer sees them as four matrices, and the rows ``h·d … (h+1)·d − 1`` of the query,
key and value weights (``d = head_dim``) are head ``h``: ``BlockStiefel(block_size=head_dim,
blocks="rows")`` puts every head's projection on its own Stiefel manifold.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_spectral.models.common import scaled_width

POSITIONS = ("learned", "rotary")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021, "RoFormer"): channel pairs ``(i, i + d/2)`` of
    every query and key are rotated by the angle ``t·θ_i``, ``θ_i = base^(−2i/d)``, so that
    ``⟨q_s, k_t⟩`` depends on the positions only through ``s − t``."""

    def __init__(self, head_dim: int, block_size: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary position embeddings need an even head_dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float64), inv_freq)
        # Buffers rebuilt from the arguments, not saved: checkpoints hold parameters only.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``(batch, heads, T, head_dim)``."""
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention over the past positions, with separate Q, K, V and O projections."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool,
                 rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.o_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)
        self.rotary = rotary

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        # The fused kernels (flash, memory-efficient, and the CPU's flash kernel) have no second
        # derivative. The package's diagnostics select the math backend themselves
        # (diagnostics.isolated, in either mode); in eval mode with gradients on, attention runs
        # on it here too, so that the Hessian of the eval-mode loss can be taken from plain
        # PyTorch (torch.autograd.functional.hessian, torch.func) without that context.
        with sdpa_kernel(SDPBackend.MATH) if torch.is_grad_enabled() and not self.training else nullcontext():
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        return self.resid_drop(self.o_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """``Linear(n_embd, 4·n_embd) → GELU → Linear(4·n_embd, n_embd) → dropout``."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool,
                 rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, rotary)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer mapping token ids ``(B, T)`` to next-token logits ``(B, T, vocab_size)``.

    ``tok_emb`` (+ ``pos_emb`` for learned positions) → dropout → ``n_layer`` pre-norm blocks →
    ``ln_f`` → ``lm_head``. Initialisation as GPT-2: weights ``N(0, 0.02²)``, the two residual
    output projections of every block (``attn.o_proj``, ``mlp.proj``) ``N(0, 0.02²/(2·n_layer))``,
    biases zero. ``lm_head`` is registered last (the output head), and with ``tie_weights`` it
    shares its weight with ``tok_emb`` (Press & Wolf 2017), the parameter then being named
    ``tok_emb.weight``.

    Args:
        vocab_size: tokens of the vocabulary (256 for bytes). ``None``: ``num_classes`` if given, else 256.
        block_size: the longest context (positions of the learned or rotary embedding).
        n_layer, n_head, n_embd: depth, heads per attention, model width (divisible by ``n_head``).
        dropout: dropout on embeddings, attention weights and residual branches.
        bias: biases in the Linear layers and LayerNorms (GPT-2 has them; nanoGPT's default drops them).
        tie_weights: share the input embedding and the output head.
        position: ``"learned"`` (GPT-2) or ``"rotary"`` (no position parameters).
        width_mult: scales the head dimension ``n_embd / n_head`` (the head count stays).
        num_classes: the model registry's name for the vocabulary size (next-token prediction
            classifies over the vocabulary); must agree with ``vocab_size`` when both are given.
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        tie_weights: bool = True,
        position: Literal["learned", "rotary"] = "learned",
        width_mult: float = 1.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if vocab_size is not None and num_classes is not None and vocab_size != num_classes:
            raise ValueError(f"vocab_size ({vocab_size}) and num_classes ({num_classes}) disagree; give one of them")
        vocab_size = vocab_size if vocab_size is not None else num_classes if num_classes is not None else 256
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_embd", n_embd)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}): each head takes n_embd/n_head")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        head_dim = scaled_width(n_embd // n_head, width_mult)
        n_embd = head_dim * n_head
        self.vocab_size, self.block_size, self.n_layer = vocab_size, block_size, n_layer
        self.n_head, self.n_embd, self.head_dim = n_head, n_embd, head_dim

        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd) if position == "learned" else None
        rotary = RotaryEmbedding(head_dim, block_size) if position == "rotary" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias, rotary) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for block in self.blocks:
            for residual_out in (block.attn.o_proj, block.mlp.proj):
                nn.init.normal_(residual_out.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.ndim != 2 or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"GPT expects integer token ids of shape (batch, T), got {idx.dtype} {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}; crop the context")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)``, each from the softmax of
        the last logits divided by ``temperature`` (``0``: the most likely token), restricted to the
        ``top_k`` most likely when given; the context is cropped to the last ``block_size`` tokens.
        Runs in the module's current mode (call ``eval()`` first to turn dropout off)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if idx.ndim != 2 or idx.shape[1] < 1:
            raise ValueError(f"generate needs a non-empty prompt of shape (batch, T), got {tuple(idx.shape)}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt.to(idx.dtype)), dim=1)
        return idx
