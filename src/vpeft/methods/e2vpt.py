"""E2VPT: key-value prompts in every attention plus visual prompts in every block's input.

Han et al., "E^2VPT: An Effective and Efficient Approach for Visual Prompt Tuning", ICCV 2023
(ChengHan111/E2VPT, ``vit_prompt_VK.py``, ``vit_changeVK.py``). Every attention attends over
[P_kv; K] and [P_kv; V], P_kv learnable per layer and head (the code's defaults: 5 tokens, one tensor
shared by keys and values, Kaiming-uniform init, prompts before the layer's own tokens); every block
also gets VPT-deep visual prompts (5 tokens, VPT's layout and init, :mod:`vpeft.methods.vpt`).
Not the identity at step 0.

Pruning (``prune_tokens`` / ``prune_segments`` > 0; off by default), a stage on the training split,
as the paper and its code (``train.py`` ``calculate_importance``, ``determine_mask_sequence``,
``what_tokens_to_mask``, ``what_tokens_pieces_to_mask``; the masks of ``vit_prompt_VK.py``):

1. A first training: E2VPT unpruned on a copy of the model, its prompts and head trained with AdamW
   (``prune_lr``) for ``prune_epochs`` epochs of the training split.
2. Importance: the code multiplies every block's visual prompts by a token mask gamma (one value per
   prompt token, shared by the blocks) and a segment mask (per token and segment; segment s holds the
   channels c with c mod ``segments`` == s, the code's mask tiling), both at one. The importance of a
   mask entry is the mean over training batches of |dL/d mask|; at mask one, dL/dgamma_t is the sum
   over blocks and channels of (dL/dP * P)[t, c], computed that way. The paper's expectation of the
   absolute gradient (the code adds the signed gradients).
3. Token-wise pruning removes the ``int(n * prune_tokens)`` least important tokens (at least one
   stays); segment-wise pruning zeroes the ``int(segments * prune_segments)`` least important
   segments of each kept token (the code's single-step ratios; its sequence of ratios is not built).
4. Rewinding: the training run starts the kept prompts from their initial values, the values the
   first training started from (the stage restores the random state it used), pruned entries removed.

The kept tokens and segments are saved in the config (``selection``), so a saved adapter reloads
without data; trainable visual-prompt entries: depth x kept tokens x kept segments x dim / segments.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.anatomy import Anatomy
from vpeft.config import option
from vpeft.errors import ConfigError, UnsupportedBackboneError
from vpeft.methods.base import Method, MethodConfig, Stage, StageData, register, replace_module
from vpeft.methods.prefix import PrefixAttention
from vpeft.methods.prompts import prompt_init_bound
from vpeft.methods.state import apply
from vpeft.methods.vpt import PromptedBlock

ROOT = "vpeft_e2vpt"


@dataclass
class E2VPTConfig(MethodConfig):
    kv_tokens: int = option(5, "key-value prompts per attention layer (the code's P_VK.NUM_TOKENS)")
    visual_tokens: int = option(5, "visual prompts per block (the code's NUM_TOKENS_P); 0 for key-value prompts only")
    share_kv: bool = option(True, "one prompt tensor serves as keys and values (the code's SHARE_PARAM_KV)")
    dropout: float = option(0.0, "dropout on the visual and on the key-value prompts")
    prune_tokens: float = option(
        0.0,
        "token-wise pruning: fraction of the visual prompt tokens removed (the code's CLS_TOKEN_MASK_PERCENT / 100)",
    )
    prune_segments: float = option(
        0.0, "segment-wise pruning: fraction of each kept token's segments removed (CLS_TOKEN_PIECE_MASK_PERCENT / 100)"
    )
    segments: int = option(16, "segments per visual prompt token (the code's CLS_TOKEN_P_PIECES_NUM)")
    prune_epochs: int = option(
        10, "pruning: epochs of the first training (prompts and head) before the importance pass"
    )
    prune_lr: float = option(1e-3, "pruning: AdamW learning rate of the first training")
    selection: dict[str, Any] | None = option(
        None,
        "decided by the pruning stage: the kept visual prompt tokens and, per kept token, its kept segments; saved "
        "with the adapter (set it only to reuse a saved selection)",
    )

    def validate(self) -> None:
        if self.kv_tokens < 1 or self.visual_tokens < 0:
            raise ConfigError(
                f"e2vpt: kv_tokens must be >= 1 and visual_tokens >= 0, got {self.kv_tokens}, {self.visual_tokens}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"e2vpt: dropout must be in [0, 1), got {self.dropout}")
        if not (0.0 <= self.prune_tokens < 1.0 and 0.0 <= self.prune_segments < 1.0):
            raise ConfigError(
                f"e2vpt: prune_tokens and prune_segments are fractions in [0, 1), got {self.prune_tokens}, "
                f"{self.prune_segments}"
            )
        if self.segments < 1 or self.prune_epochs < 0 or self.prune_lr <= 0:
            raise ConfigError("e2vpt: segments must be >= 1, prune_epochs >= 0 and prune_lr > 0")
        if self.pruning and self.visual_tokens == 0:
            raise ConfigError("e2vpt: pruning removes visual prompts; set visual_tokens > 0 or drop prune_*")

    @property
    def pruning(self) -> bool:
        return self.prune_tokens > 0 or self.prune_segments > 0

    def kept_counts(self) -> tuple[int, int]:
        """(kept tokens, kept segments per token) that the pruning ratios leave (at least one of each)."""
        tokens = self.visual_tokens - min(int(self.visual_tokens * self.prune_tokens), self.visual_tokens - 1)
        return tokens, self.segments - min(int(self.segments * self.prune_segments), self.segments - 1)


class KVPromptBank(nn.Module):
    """Every layer's key-value prompts, (heads, tokens, head_dim) each, handed to the attention as (tokens, d)."""

    def __init__(self, depth: int, heads: int, head_dim: int, config: E2VPTConfig, like: torch.Tensor):
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        bound = math.sqrt(6.0 / (config.kv_tokens * head_dim))  # kaiming_uniform_ (a=0, fan_in) on that shape

        def prompts() -> nn.ParameterList:
            shape = (heads, config.kv_tokens, head_dim)
            return nn.ParameterList(
                [nn.Parameter(torch.empty(shape, **kw).uniform_(-bound, bound)) for _ in range(depth)]
            )

        self.keys = prompts()
        self.values = None if config.share_kv else prompts()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @staticmethod
    def _flat(p: torch.Tensor) -> torch.Tensor:
        return p.transpose(0, 1).reshape(p.shape[1], -1)  # (tokens, heads * head_dim)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.dropout(self._flat(self.keys[index]))
        v = k if self.values is None else self.dropout(self._flat(self.values[index]))
        return k, v


class PrunedPromptedBlock(PromptedBlock):
    """VPT-deep's prompted block with only the kept prompt tokens and, per token, its kept channels.

    It draws the full prompts as :class:`PromptedBlock` does (so the kept entries start from the
    unpruned initial values: rewinding) and keeps ``tokens``; with ``channels`` (kept tokens x kept
    channels) only those entries train and the others stay zero.
    """

    def __init__(self, base_layer: nn.Module, *, tokens: list[int], channels: torch.Tensor | None, **kwargs: Any):
        super().__init__(base_layer, **kwargs)
        dim = self.prompt.shape[-1]
        kept = self.prompt.detach()[0, tokens]  # (k, dim)
        self.num_tokens, self.dim = len(tokens), dim
        if channels is None:
            self.register_buffer("channels", None, persistent=False)
            self.prompt = nn.Parameter(kept.unsqueeze(0).clone())
        else:
            channels = channels.to(kept.device)
            self.register_buffer("channels", channels, persistent=False)
            self.prompt = nn.Parameter(kept.gather(1, channels).unsqueeze(0).clone())

    def tokens(self) -> torch.Tensor:
        """The kept prompt tokens at full width, (1, k, dim): pruned segments are zero."""
        if self.channels is None:
            return self.prompt
        full = self.prompt.new_zeros(1, self.num_tokens, self.dim)
        return full.scatter(2, self.channels.unsqueeze(0), self.prompt)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        o, n = self.offset, self.num_tokens
        prompt = self.dropout(self.tokens().expand(x.shape[0], -1, -1))
        rest = x[:, o:] if self.insert else x[:, o + n :]
        x = self.base_layer(torch.cat([x[:, :o], prompt, rest], dim=1), *args, **kwargs)
        if self.strip:
            x = torch.cat([x[:, :o], x[:, o + n :]], dim=1)
        return x


def _kept_channels(segments: list[list[int]], num_segments: int, dim: int) -> torch.Tensor:
    """Per kept token, the channels of its kept segments (channel c belongs to segment c mod num_segments)."""
    owner = torch.arange(dim) % num_segments
    return torch.stack([torch.isin(owner, torch.tensor(kept)).nonzero().flatten() for kept in segments])


def _cuda_devices(device: torch.device | str) -> list[int]:
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else []


@register
class E2VPT(Method):
    name = "e2vpt"
    family = "addition/prompt"
    paper = "Han et al., E2VPT, ICCV 2023 (arXiv 2307.13770)"
    requires = frozenset({"tokens", "isotropic", "qkv_fused", "attn_proj"})
    config_class = E2VPTConfig
    stage = Stage("pruning", "train", "a first training, then token and segment importance |dL/d mask| on it")

    def prepared(self, config: E2VPTConfig) -> bool:
        return config.selection is not None or not config.pruning

    def prepare(self, model: nn.Module, anatomy: Anatomy, config: E2VPTConfig, data: StageData) -> E2VPTConfig:
        """Train E2VPT unpruned on a copy, score the visual prompts' tokens and segments, keep the most important."""
        if anatomy.embed_dim % config.segments:
            raise ConfigError(f"e2vpt: segments={config.segments} does not divide the width {anatomy.embed_dim}")
        unpruned = replace(config, prune_tokens=0.0, prune_segments=0.0, selection=None)
        n, s, dim = config.visual_tokens, config.segments, anatomy.embed_dim
        # the copy draws its prompts from the random state that inject will use next: restoring it afterwards
        # makes the training run start the kept prompts from the values the first training started from
        with torch.random.fork_rng(devices=_cuda_devices(data.device)):
            probe = apply(copy.deepcopy(model), unpruned)
            if config.prune_epochs:
                data.fit(probe, config.prune_epochs, config.prune_lr)  # vpeft's trainer, as a run trains
            probe.eval()
            prompts = [m.prompt for m in probe.modules() if isinstance(m, PromptedBlock)]
            token_score = torch.zeros(n, dtype=torch.float64)
            segment_score = torch.zeros(n, s, dtype=torch.float64)
            batches = 0
            for x, y in data.batches():
                grads = torch.autograd.grad(F.cross_entropy(probe(x), y), prompts)
                # dL/d mask at mask one: the gradient times the prompt, summed over blocks and masked channels
                gp = sum((g * p.detach()).double() for g, p in zip(grads, prompts, strict=True))[0].cpu()  # (n, dim)
                token_score += gp.sum(-1).abs()
                segment_score += gp.view(n, dim // s, s).sum(1).abs()
                batches += 1
            del probe
        token_score, segment_score = token_score / max(1, batches), segment_score / max(1, batches)
        k, kept_segments = config.kept_counts()
        tokens = token_score.argsort(descending=True, stable=True)[:k].sort().values.tolist()
        segments = [
            segment_score[t].argsort(descending=True, stable=True)[:kept_segments].sort().values.tolist()
            for t in tokens
        ]
        return replace(config, selection={"tokens": tokens, "segments": segments})

    def _checked_selection(self, config: E2VPTConfig, dim: int) -> tuple[list[int], torch.Tensor | None]:
        sel = config.selection
        if not isinstance(sel, dict) or set(sel) != {"tokens", "segments"}:
            raise ConfigError(
                "e2vpt: selection must be {'tokens': [...], 'segments': [[...], ...]} from the pruning stage"
            )
        tokens, segments = [int(t) for t in sel["tokens"]], [[int(i) for i in seg] for seg in sel["segments"]]
        k, per_token = config.kept_counts()
        if len(set(tokens)) != k or not all(0 <= t < config.visual_tokens for t in tokens):
            raise ConfigError(f"e2vpt: the selection needs {k} distinct tokens among {config.visual_tokens}")
        if len(segments) != k or any(
            len(set(seg)) != per_token or not all(0 <= i < config.segments for i in seg) for seg in segments
        ):
            raise ConfigError(
                f"e2vpt: the selection needs {per_token} distinct segments of {config.segments} per token"
            )
        if per_token == config.segments:
            return tokens, None
        if dim % config.segments:
            raise ConfigError(f"e2vpt: segments={config.segments} does not divide the width {dim}")
        return tokens, _kept_channels(segments, config.segments, dim)

    def inject(self, model: nn.Module, anatomy: Anatomy, config: E2VPTConfig) -> None:
        from timm.layers import Attention

        attns = [model.get_submodule(b.attn) for b in anatomy.blocks]
        for attn in attns:
            if type(attn) is not Attention or getattr(attn, "gate", None) is not None:
                raise UnsupportedBackboneError(f"e2vpt: supports timm's standard Attention, not {type(attn).__name__}")
        bank = KVPromptBank(anatomy.depth, attns[0].num_heads, attns[0].head_dim, config, like=attns[0].qkv.weight)
        model.add_module(ROOT, bank)
        for i, (block, attn) in enumerate(zip(anatomy.blocks, attns, strict=True)):
            replace_module(model, block.attn, PrefixAttention(attn, bank, i))
        if config.visual_tokens == 0:
            return
        pruned = None
        if config.pruning:
            if config.selection is None:
                raise ConfigError(
                    "e2vpt: pruning needs the stage's selection; apply it with data=<training set> "
                    "(vpeft.apply) or load an adapter"
                )
            pruned = self._checked_selection(config, anatomy.embed_dim)
        bound = prompt_init_bound(anatomy)
        for i, block in enumerate(anatomy.blocks):
            kwargs = dict(
                offset=anatomy.num_prefix_tokens,
                num_tokens=config.visual_tokens,
                dim=anatomy.embed_dim,
                init_bound=bound,
                learn=True,
                insert=i == 0,
                strip=i == anatomy.depth - 1,
                dropout=config.dropout,
            )
            base = model.get_submodule(block.name)
            if pruned is None:
                wrapper = PromptedBlock(base, **kwargs)
            else:
                wrapper = PrunedPromptedBlock(base, tokens=pruned[0], channels=pruned[1], **kwargs)
            replace_module(model, block.name, wrapper)
