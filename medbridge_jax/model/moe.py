"""The query-driven Mixture of Experts: gates over K experts' logits.

The gate network sees every expert's pooled query vector (each in its own
width P_k, scaled to unit RMS so no expert dominates by its activation
scale), concatenated: sum_k P_k inputs -> optional hidden MLP -> K logits (or
K x L for per-label gating). Experts of different widths never need a shared
space: only this concatenation mixes them. The last layer starts at zero, so
training starts from equal gates.

Gating forms (gates always sum to 1 over the K experts):
  soft       softmax over K: (B, K).
  top_k      softmax over the k largest logits, 0 elsewhere: (B, K).
  per_label  a softmax over K for each label: (B, K, L).

Load balancing (Switch Transformer): K * sum_k mean_gate_k * fraction_k,
where fraction_k is the share of (image[, label]) routings whose top-k
choice includes k (divided by k). It is 1 when routing is balanced and grows
to K when one expert takes everything; the gradient flows through the mean
gates only.
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from medbridge_jax.errors import UserError
from medbridge_jax.model import heads

Array = jax.Array
GATINGS = ("soft", "top_k", "per_label")


def top_k_mask(logits: Array, k: int) -> Array:
  """1.0 at the k largest entries of the last axis (ties: lowest index)."""
  _, idx = jax.lax.top_k(logits, k)
  return jax.nn.one_hot(idx, logits.shape[-1], dtype=logits.dtype).sum(-2)


def gates_from_logits(logits: Array, gating: str, top_k: int = 1) -> Array:
  """Gates from gate logits (B, K) or (B, L, K); softmax over the last axis."""
  if gating == "top_k":
    keep = top_k_mask(logits, top_k) > 0
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def balance_loss(gates: Array, top_k: int = 1) -> Array:
  """Switch load-balancing loss of gates (..., K): 1 when balanced."""
  k = gates.shape[-1]
  flat = gates.reshape(-1, k)
  chosen = jax.lax.stop_gradient(top_k_mask(flat, min(top_k, k))) / top_k
  return k * jnp.sum(flat.mean(0) * chosen.mean(0))


def combine(gates: Array, expert_logits: Array) -> Array:
  """Gated sum of expert logits (B, K, L) with gates (B, K) or (B, K, L)."""
  if gates.ndim == 2:
    gates = gates[:, :, None]
  return jnp.sum(gates * expert_logits, axis=1)


class Gate(nn.Module):
  """Gate network: pooled query vectors of K experts -> (gates, balance)."""
  num_experts: int
  num_labels: int
  gating: str = "soft"
  top_k: int = 1
  hidden: int = 0  # 0 = a linear gate.

  @nn.compact
  def __call__(self, pooled: Sequence[Array]) -> Tuple[Array, Array]:
    """pooled: K arrays (B, P_k). Returns gates (B, K) | (B, K, L), loss."""
    k = self.num_experts
    if self.gating not in GATINGS:
      raise UserError(f"model.moe.gating={self.gating!r}; expected one of "
                      f"{GATINGS}")
    if self.gating == "top_k" and not 1 <= self.top_k <= k:
      raise UserError(f"model.moe.top_k={self.top_k} must be in [1, {k}] "
                      f"(the number of experts)")
    if len(pooled) != k:
      raise ValueError(f"expected {k} pooled vectors, got {len(pooled)}")
    x = jnp.concatenate(
        [heads.unit_rms(jnp.asarray(p, jnp.float32)) for p in pooled], axis=-1)
    if self.hidden:
      x = nn.gelu(nn.Dense(self.hidden, name="hidden")(x))
    per_label = self.gating == "per_label"
    out = k * self.num_labels if per_label else k
    logits = nn.Dense(out, kernel_init=nn.initializers.zeros,
                      name="logits")(x)
    if per_label:
      logits = logits.reshape(-1, self.num_labels, k)  # softmax over K last
    gates = gates_from_logits(logits, self.gating, self.top_k)
    routed = self.top_k if self.gating == "top_k" else 1
    loss = balance_loss(gates, routed)
    if per_label:
      gates = jnp.swapaxes(gates, 1, 2)  # (B, K, L)
    return gates, loss
