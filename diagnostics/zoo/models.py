"""Built-in example models: a digits MLP, a digits CNN and a small pre-LN character-level GPT.

All are deterministic given ``seed`` (initialised under a private generator, so building a model does not
touch the global RNG), small enough for CPU tests, and use only operations that support forward-mode AD
(``torch.func.jvp``), so forward-over-reverse Hessian products work on them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from diagnostics.errors import ConfigError

__all__ = [
    "MLPDigits",
    "CNNDigits",
    "GPTConfig",
    "TinyGPT",
    "CausalSelfAttention",
    "count_parameters",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def _seeded(seed: int | None):
    # Build and initialise inside a forked RNG so that constructing a zoo model never moves the caller's
    # stream and the same seed gives the same weights.
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class MLPDigits(nn.Module):
    """Multilayer perceptron for flattened 8x8 digits.

    Input [N, in_features] (or [N, 1, 8, 8], flattened), output logits [N, num_classes].

    Args:
        in_features: input size (64 for digits).
        hidden: widths of the hidden layers.
        num_classes: number of classes (10 for digits).
        activation: "tanh", "relu" or "gelu".
        seed: initialisation seed (private generator); None uses the global RNG.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] | list[int] = (32, 32),
        num_classes: int = 10,
        activation: str = "tanh",
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
            raise ConfigError(
                f"mlp sizes must be positive: in_features={in_features}, hidden={hidden}, "
                f"num_classes={num_classes}"
            )
        layers: list[nn.Module] = []
        width = in_features
        with _seeded(seed):
            for h in hidden:
                layers += [nn.Linear(width, h), _activation(activation)]
                width = h
            layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


class CNNDigits(nn.Module):
    """Small convolutional network with BatchNorm for 1x8x8 digits.

    conv3x3(1->c1)-BN-ReLU, conv3x3(c1->c2)-BN-ReLU, 2x2 max-pool, linear to num_classes.
    Input [N, 1, 8, 8] or flattened [N, 64]; output logits [N, num_classes].

    Args:
        channels: (c1, c2) channel counts.
        num_classes: number of classes.
        seed: initialisation seed (private generator); None uses the global RNG.
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), num_classes: int = 10, seed: int | None = 0) -> None:
        super().__init__()
        if len(channels) != 2 or min(channels) < 1:
            raise ConfigError(f"channels must be two positive integers, got {channels}")
        c1, c2 = channels
        with _seeded(seed):
            self.features = nn.Sequential(
                nn.Conv2d(1, c1, 3, padding=1),
                nn.BatchNorm2d(c1),
                nn.ReLU(),
                nn.Conv2d(c1, c2, 3, padding=1),
                nn.BatchNorm2d(c2),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            self.classifier = nn.Linear(c2 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            if x.shape[1] != 64:
                raise ConfigError(f"cnn-digits expects [N, 64] or [N, 1, 8, 8] inputs, got {tuple(x.shape)}")
            x = x.reshape(-1, 1, 8, 8)
        return self.classifier(self.features(x).flatten(1))


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of :class:`TinyGPT`.

    Attributes:
        vocab_size: number of tokens (96 for the zoo's ``pydoc-text`` vocabulary).
        block_size: maximal sequence length T.
        d_model: residual width.
        n_layers: number of transformer blocks.
        n_heads: attention heads (must divide d_model).
        mlp_ratio: MLP hidden width = mlp_ratio * d_model.
        dropout: dropout probability (0 keeps the model deterministic, as curvature estimates need).
        qk_layernorm: LayerNorm on queries and keys per head (Dehghani et al. 2023; Wortsman et al. 2023),
            which bounds attention logits.
        embedding_scale: multiplier applied to token + position embeddings in forward.
        embedding_std: init std of the embeddings.
        init_std: init std of every other linear weight.
        residual_init_scale: extra factor on the init std of the residual output projections (attention
            out-projection and MLP second layer), which are also scaled by 1/sqrt(2 n_layers) as in GPT-2.
        tie_weights: share the token embedding with the LM head.
        bias: biases in linear layers.
        norm: ``"pre"`` (LayerNorm before attention, MLP and head) or ``"none"`` (no LayerNorm at all; the
            unnormalised twin that loss-explosion studies compare against).
    """

    vocab_size: int = 96
    block_size: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    qk_layernorm: bool = False
    embedding_scale: float = 1.0
    embedding_std: float = 0.02
    init_std: float = 0.02
    residual_init_scale: float = 1.0
    tie_weights: bool = False
    bias: bool = True
    norm: str = "pre"

    def __post_init__(self) -> None:
        if self.norm not in ("pre", "none"):
            raise ConfigError(f"GPTConfig.norm must be 'pre' or 'none', got {self.norm!r}")
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with explicit matmuls (no fused SDPA kernel).

    The scaled pre-softmax logits pass through the identity module ``logits`` (shape [B, H, T, T], not
    yet causally masked) and the attention probabilities through ``probs``, so a scoped forward hook on
    ``<name>.logits`` observes them; ``causal_mask`` ([T, T] bool, True = allowed) says which entries
    are used. The explicit path also keeps forward-mode AD available.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if cfg.qk_layernorm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if cfg.qk_layernorm else nn.Identity()
        self.logits = nn.Identity()
        self.probs = nn.Identity()
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.register_buffer(
            "causal_mask", torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool)), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h, hd = self.n_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).view(b, t, h, hd)).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_norm(self.k_proj(x).view(b, t, h, hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, hd).transpose(1, 2)
        att = self.logits((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd)))
        att = att.masked_fill(~self.causal_mask[:t, :t], float("-inf"))
        att = self.probs(F.softmax(att, dim=-1))
        y = self.attn_dropout(att) @ v  # [B, H, T, hd]
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Position-wise feed-forward block: fc1 -> GELU -> fc2."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = _norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    """Pre-LN character-level GPT.

    Input token ids [B, T] (int64, T <= block_size); output logits [B, T, vocab_size]. Module names:
    ``tok_emb``, ``pos_emb``, ``blocks.{i}.attn.{q,k,v,out}_proj``, ``blocks.{i}.attn.logits`` (observable
    attention logits), ``blocks.{i}.mlp.fc{1,2}``, ``ln_f``, ``head``.

    Args:
        config: a :class:`GPTConfig`; or keyword arguments of GPTConfig.
        seed: initialisation seed (private generator); None uses the global RNG.
    """

    def __init__(self, config: GPTConfig | None = None, *, seed: int | None = 0, **kwargs) -> None:
        super().__init__()
        if config is None:
            unknown = set(kwargs) - set(GPTConfig.__dataclass_fields__)
            if unknown:
                raise ConfigError(
                    f"unknown tiny-gpt option(s) {sorted(unknown)}; valid: {sorted(GPTConfig.__dataclass_fields__)}"
                )
            config = GPTConfig(**kwargs)
        elif kwargs:
            raise ConfigError("pass either a GPTConfig or keyword options to TinyGPT, not both")
        self.config = config
        cfg = config
        with _seeded(seed):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
            self.emb_dropout = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
            self.ln_f = _norm(cfg)
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            self._init_weights()
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        cfg = self.config
        resid_std = cfg.init_std * cfg.residual_init_scale / math.sqrt(2 * cfg.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, cfg.embedding_std)
            elif isinstance(m, nn.Linear):
                std = resid_std if name.endswith(("out_proj", "fc2")) else cfg.init_std
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ConfigError(f"tiny-gpt expects token ids of shape [B, T], got {tuple(idx.shape)}")
        b, t = idx.shape
        if t > self.config.block_size:
            raise ConfigError(f"sequence length {t} exceeds block_size={self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = (self.tok_emb(idx) + self.pos_emb(pos)) * self.config.embedding_scale
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def config_dict(self) -> dict:
        """The model's GPTConfig as a plain dict (JSON-serialisable), e.g. for run metadata."""
        return asdict(self.config)
