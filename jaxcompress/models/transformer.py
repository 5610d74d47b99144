"""A small decoder-only Transformer language model (GPT-2 style, pre-LayerNorm)."""
from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_int

# GPT-2's initialisation of the embedding tables; Dense layers keep Flax's default.
_EMBED_INIT = nn.initializers.normal(stddev=0.02)

#: Where the input of each of :class:`TransformerLM`'s Dense layers comes from, as the ``folds``
#: of :func:`jaxcompress.oneshot.one_shot` (scale folds of SmoothQuant and AWQ, rotations):
#: query, key and value read ``ln1``, fc1 reads ``ln2``, the output layer reads ``ln_f``, and
#: attention's ``out`` reads the ``value`` projection's channels. ``fc2`` reads a GELU: none.
TRANSFORMER_FOLDS = (
    (r"^(block_\d+)/attn/(query|key|value)$", r"\1/ln1"),
    (r"^(block_\d+)/attn/out$", r"\1/attn/value"),
    (r"^(block_\d+)/mlp/fc1$", r"\1/ln2"),
    (r"^head$", "ln_f"),
)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` attends to positions ``<= t``.

    The projections are ``nn.Dense`` layers named ``query``, ``key``, ``value`` (each
    ``(dim, dim)``, heads split after the projection) and ``out``, so path rules such as
    ``'attn/(query|key|value|out)/kernel'`` and interception of Dense calls reach them. The
    softmax is computed in float32; the attention weights ``(B, heads, T, T)`` are sown as
    ``intermediates/attention`` for attention-based distillation.
    """

    heads: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, t, dim = x.shape
        head_dim = dim // self.heads
        split = lambda y: y.reshape(b, t, self.heads, head_dim)  # noqa: E731
        q = split(nn.Dense(dim, name="query")(x))
        k = split(nn.Dense(dim, name="key")(x))
        v = split(nn.Dense(dim, name="value")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(head_dim))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1)
        self.sow("intermediates", "attention", weights)
        weights = nn.Dropout(self.dropout, deterministic=not train)(weights).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, dim)
        return nn.Dense(dim, name="out")(y)


class MLPBlock(nn.Module):
    """``fc2(gelu(fc1(x)))`` with hidden width ``hidden``."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(x.shape[-1], name="fc2")(y)


class Block(nn.Module):
    """One pre-LayerNorm Transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    heads: int
    mlp_ratio: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        drop = nn.Dropout(self.dropout, deterministic=not train)
        x = x + drop(CausalSelfAttention(self.heads, self.dropout, name="attn")(nn.LayerNorm(name="ln1")(x), train))
        x = x + drop(MLPBlock(self.mlp_ratio * x.shape[-1], name="mlp")(nn.LayerNorm(name="ln2")(x)))
        return x


class TransformerLM(nn.Module):
    """A decoder-only Transformer language model returning next-token logits.

    Token embedding plus a learned positional embedding, ``depth`` pre-LayerNorm blocks of
    causal multi-head self-attention and a GELU MLP, a final LayerNorm and an untied output
    layer. Position ``t``'s logits depend only on tokens ``0..t``.

    Attributes:
      vocab_size: number of token ids (256 for byte-level text).
      max_len: longest sequence the positional embedding covers.
      dim: model width; a multiple of ``heads``.
      depth: number of blocks.
      heads: attention heads.
      mlp_ratio: the MLP's hidden width is ``mlp_ratio * dim``.
      dropout: dropout rate on the embeddings, the attention weights and each residual branch,
        active when ``train=True`` (needs a ``'dropout'`` rng); 0 disables it.

    Parameters are named ``embed/embedding``, ``pos_embed/embedding``, then per block ``i``
    ``block_i/ln1``, ``block_i/attn/{query,key,value,out}``, ``block_i/ln2``,
    ``block_i/mlp/{fc1,fc2}``, and finally ``ln_f`` and ``head`` (kernel ``(dim, vocab_size)``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = TransformerLM(vocab_size=256, max_len=32, dim=64, depth=2, heads=4)
      >>> tokens = jnp.zeros((2, 16), jnp.int32)
      >>> variables = model.init(jax.random.key(0), tokens)
      >>> model.apply(variables, tokens).shape
      (2, 16, 256)
      >>> variables['params']['block_1']['attn']['query']['kernel'].shape
      (64, 64)
      >>> variables['params']['head']['kernel'].shape
      (64, 256)
    """

    vocab_size: int = 256
    max_len: int = 256
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        for name, minimum in (("vocab_size", 1), ("max_len", 1), ("dim", 1), ("depth", 0), ("heads", 1),
                              ("mlp_ratio", 1)):
            check_int(name, getattr(self, name), minimum=minimum)
        if self.dim % self.heads:
            raise ValueError(
                f"dim must be a multiple of heads, got dim={self.dim} and heads={self.heads}; "
                f"e.g. dim={self.heads * max(1, round(self.dim / self.heads))}."
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real):
            raise TypeError(f"dropout must be a rate in [0, 1), got {type(self.dropout).__name__}: {self.dropout!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a rate in [0, 1), got {self.dropout!r}; 0 disables it.")
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        """Maps int tokens ``(B, T)`` with ``T <= max_len`` to float logits ``(B, T, vocab_size)``."""
        tokens = jnp.asarray(tokens)
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be an int array of token ids, got dtype {tokens.dtype}.")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length), got shape {tokens.shape}.")
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"tokens has length {length} but max_len is {self.max_len}; pass shorter sequences or "
                f"build the model with max_len >= {length}."
            )
        x = nn.Embed(self.vocab_size, self.dim, embedding_init=_EMBED_INIT, name="embed")(tokens)
        x = x + nn.Embed(self.max_len, self.dim, embedding_init=_EMBED_INIT, name="pos_embed")(jnp.arange(length))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.depth):
            x = Block(self.heads, self.mlp_ratio, self.dropout, name=f"block_{i}")(x, train)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(self.vocab_size, name="head")(x)
