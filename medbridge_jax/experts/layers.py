"""Transformer building blocks shared by the towers.

Every family uses the same pre-norm encoder layer (LayerNorm, multi-head
self-attention, residual, LayerNorm, MLP, residual); they differ in the
activation, the LayerNorm epsilon and DINOv2's layer scale. Params are
float32; `dtype` is the compute dtype. Attention goes through
`jax.nn.dot_product_attention`; `choose_attention` picks its implementation
per platform and path.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from medbridge_jax.errors import UserError

Array = jax.Array


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x):
  return jax.nn.gelu(x, approximate=False)


# Names as they appear in transformers' `hidden_act`.
ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": _gelu_erf,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
  """The activation function transformers calls `name`."""
  if name not in ACTIVATIONS:
    raise UserError(f"unsupported hidden_act {name!r}; "
                    f"supported: {', '.join(sorted(ACTIVATIONS))}")
  return ACTIVATIONS[name]


def dense(features: int, dtype, name: Optional[str] = None,
          use_bias: bool = True) -> nn.Dense:
  """A float32-param Dense computing in `dtype` (name only in compact code)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  param_dtype=jnp.float32, name=name)


def layer_norm(eps: float, dtype, name: Optional[str] = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def _on_nvidia_gpu() -> bool:
  if jax.default_backend() != "gpu":
    return False
  client = getattr(jax.devices()[0], "client", None)
  return "rocm" not in str(getattr(client, "platform_version", "")).lower()


def choose_attention(impl: Optional[str], dtype, head_dim: int, *,
                     differentiated: bool, masked: bool,
                     self_attention: bool = True) -> Optional[str]:
  """The `implementation` given to `jax.nn.dot_product_attention`.

  The one place where the attention kernel is chosen, per platform and path.
  A path is `differentiated` when a backward pass runs through it in
  training (the Query-Encoder's query stream, joint-mode layers, the pooling
  of the queries); the frozen image stream never is (stop_gradient).

    None     JAX's default (XLA).
    "xla"    XLA everywhere.
    "cudnn"  cuDNN's fused kernel on paths without a backward, XLA on
             differentiated ones: cuDNN's backward refused the ViT's
             sequence length (197 tokens, "Unsupported sequence length",
             on an H200), while its forward ran 1.5x faster than XLA's.
    "auto"   "cudnn"'s choice where cuDNN can run and was measured to pay
             (an NVIDIA GPU, bf16 or f16, head dim a multiple of 8 up to
             128, no mask, tokens attending to the same tokens: not SigLIP's
             one-query pooling), else XLA (CPU, TPU, float32). The default
             config's choice.

  The query stream is a handful of tokens, so XLA costs it little.
  """
  if impl is None:
    return None
  if impl not in ATTENTION_IMPLS:
    raise UserError(f"attention implementation {impl!r}; expected one of "
                    f"{ATTENTION_IMPLS}")
  if impl == "xla" or differentiated:
    return "xla"
  if impl == "cudnn":
    return "cudnn"
  fits = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128 and not masked
          and self_attention)
  return "cudnn" if fits and _on_nvidia_gpu() else "xla"


def attend(q: Array, k: Array, v: Array, mask: Optional[Array],
           impl: Optional[str], differentiated: bool = False) -> Array:
  """Scaled dot-product attention over (B, T, N, H) tensors.

  `impl` and `differentiated` go through `choose_attention`.
  """
  impl = choose_attention(impl, q.dtype, q.shape[-1],
                          differentiated=differentiated,
                          masked=mask is not None,
                          self_attention=q.shape[1] == k.shape[1])
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


class SelfAttention(nn.Module):
  """Multi-head attention with separate q/k/v/out projections (HF layout)."""
  hidden_size: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None

  def setup(self):
    d = self.hidden_size
    self.query = dense(d, self.dtype)
    self.key = dense(d, self.dtype)
    self.value = dense(d, self.dtype)
    self.out = dense(d, self.dtype)

  def _split(self, x: Array) -> Array:
    b, t, _ = x.shape
    return x.reshape(b, t, self.num_heads, self.hidden_size // self.num_heads)

  def qkv(self, x: Array):
    """Per-head queries, keys and values of `x`, each (B, T, N, H)."""
    return (self._split(self.query(x)), self._split(self.key(x)),
            self._split(self.value(x)))

  def project_out(self, heads: Array) -> Array:
    b, t = heads.shape[:2]
    return self.out(heads.reshape(b, t, self.hidden_size))

  def __call__(self, x: Array, mask: Optional[Array] = None,
               differentiated: bool = False) -> Array:
    q, k, v = self.qkv(x)
    return self.project_out(
        attend(q, k, v, mask, self.attention_impl, differentiated))


class Mlp(nn.Module):
  hidden_size: int
  mlp_dim: int
  act: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = dense(self.mlp_dim, self.dtype, "fc1")(x)
    x = activation(self.act)(x)
    return dense(self.hidden_size, self.dtype, "fc2")(x)


class EncoderLayer(nn.Module):
  """Pre-norm transformer layer, numerically as transformers computes it.

  `__call__` is the plain layer. `with_extra` runs the same ops on the image
  stream and, beside it, lets extra tokens attend to the image tokens' keys
  and values (from this very layer) plus their own, without ever letting the
  image tokens see the extra ones.

  When the caller collects "intermediates" (`apply(..., mutable=
  ["intermediates"])`), `with_extra` also sows "query_attention": (B, S)
  float32, per image the extra tokens' attention over the S image keys
  alone, softmax(q_extra . k_image / sqrt(h)) (i.e. renormalised over the
  image keys, their own keys left out), averaged over heads and extra
  tokens. Otherwise nothing of it is even traced.
  """
  hidden_size: int
  num_heads: int
  mlp_dim: int
  act: str
  eps: float
  dtype: jnp.dtype = jnp.float32
  attention_impl: Optional[str] = None
  # DINOv2: each branch's output is scaled per channel (`layer_scale1/2`).
  layer_scale: bool = False

  def setup(self):
    if self.layer_scale:
      ones = nn.initializers.ones
      self.scale1 = self.param("scale1", ones, (self.hidden_size,))
      self.scale2 = self.param("scale2", ones, (self.hidden_size,))
    self.norm1 = layer_norm(self.eps, self.dtype)
    self.attn = SelfAttention(self.hidden_size, self.num_heads, self.dtype,
                              self.attention_impl)
    self.norm2 = layer_norm(self.eps, self.dtype)
    self.mlp = Mlp(self.hidden_size, self.mlp_dim, self.act, self.dtype)

  def _scaled(self, y: Array, which: int) -> Array:
    if not self.layer_scale:
      return y
    return y * (self.scale1 if which == 1 else self.scale2).astype(y.dtype)

  def _finish(self, x: Array, attn_out: Array) -> Array:
    x = x + self._scaled(attn_out, 1)
    return x + self._scaled(self.mlp(self.norm2(x)), 2)

  def __call__(self, x: Array, mask: Optional[Array] = None,
               differentiated: bool = False) -> Array:
    return self._finish(x, self.attn(self.norm1(x), mask, differentiated))

  def with_extra(self, x: Array, extra: Array):
    """One layer on image tokens `x` and extra tokens; see class docstring."""
    # Image stream: the very ops of `__call__` (keeps it bit-identical).
    q, k, v = self.attn.qkv(self.norm1(x))
    x_out = self._finish(
        x, self.attn.project_out(attend(q, k, v, None, self.attention_impl)))
    # Extra stream: queries from the extra tokens; keys/values are the image
    # tokens' (reused, not recomputed) followed by the extra tokens' own.
    qe, ke, ve = self.attn.qkv(self.norm1(extra))
    keys = jnp.concatenate([k, ke], axis=1)
    values = jnp.concatenate([v, ve], axis=1)
    # The query stream is the one a training step differentiates.
    e_heads = attend(qe, keys, values, None, self.attention_impl,
                     differentiated=True)
    e_out = self._finish(extra, self.attn.project_out(e_heads))
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "query_attention", image_attention(qe, k))
    return x_out, e_out


def image_attention(queries: Array, keys: Array) -> Array:
  """(B, S) float32: softmax(q . k / sqrt(h)) of (B, Q, N, H) queries over
  (B, S, N, H) keys, averaged over the N heads and Q queries."""
  q = queries.astype(jnp.float32)
  k = keys.astype(jnp.float32)
  scores = jnp.einsum("bqnh,bsnh->bnqs", q, k) / jnp.sqrt(
      jnp.float32(q.shape[-1]))
  return jnp.mean(jax.nn.softmax(scores, axis=-1), axis=(1, 2))
