"""Multi-label losses with a mask for unknown labels.

Every entry (image, label) has a target in [0, 1] and a mask (1 = known). The
loss is the mean over known entries of a per-entry loss times its class
weight:

  loss = sum(mask * weight * l) / max(sum(mask), 1)

Per-entry losses:
  bce         -[y log p + (1 - y) log(1 - p)],  p = sigmoid(logit)
  asymmetric  ASL (Ridnik et al., 2021): -[y (1 - p)^g+ log p
              + (1 - y) p_m^g- log(1 - p_m)],  p_m = max(p - clip, 0).
              Negatives are focused (g-) and easy ones below `clip` dropped;
              the focusing factors are differentiated (plain focal loss).

Every term is per entry, so the loss of a batch cut into parts is the sum
of the parts' `masked_sum`s over the whole batch's known-entry count:
gradient accumulation uses this (`total(..., known=, share=)`).

Class weights are (2, L): row 0 weighs negative entries, row 1 positive
ones; `balanced_class_weights` makes sklearn's "balanced" weights,
n / (2 n_c), from the training targets and mask, so both classes of every
label weigh the same in total and the mean weight stays about 1.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medbridge_jax.errors import UserError

Array = jax.Array
KINDS = ("bce", "asymmetric")
CLASS_WEIGHTS = ("none", "balanced")


def balanced_class_weights(targets: np.ndarray, mask: np.ndarray,
                           max_weight: float = 100.0) -> np.ndarray:
  """(2, L) float32 weights n / (2 n_c) over known entries, capped.

  A class with no known example gets weight `max_weight` (irrelevant: it has
  no entries to weigh); a label with no known entry gets 1 for both.
  """
  t = np.asarray(targets, np.float64)
  m = np.asarray(mask, np.float64)
  pos = (m * t).sum(0)
  neg = (m * (1.0 - t)).sum(0)
  n = pos + neg
  with np.errstate(divide="ignore", invalid="ignore"):
    w = np.stack([n / (2.0 * neg), n / (2.0 * pos)])
  w = np.where(np.isfinite(w), w, max_weight)
  w = np.where(n[None] > 0, np.minimum(w, max_weight), 1.0)
  return w.astype(np.float32)


def class_weights_from_config(loss_config: ml_collections.ConfigDict,
                              targets: np.ndarray,
                              mask: np.ndarray) -> Optional[np.ndarray]:
  """The class weights `loss_config.class_weights` asks for, or None."""
  kind = loss_config.class_weights
  if kind == "none":
    return None
  if kind == "balanced":
    return balanced_class_weights(targets, mask)
  raise UserError(f"loss.class_weights={kind!r}; expected one of "
                  f"{CLASS_WEIGHTS}")


def bce(logits: Array, targets: Array) -> Array:
  """Per-entry binary cross-entropy from logits (numerically stable)."""
  return -(targets * jax.nn.log_sigmoid(logits)
           + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def asymmetric(logits: Array, targets: Array, gamma_pos: float,
               gamma_neg: float, clip: float) -> Array:
  """Per-entry asymmetric loss (see the module docstring)."""
  p = jax.nn.sigmoid(logits)
  log_p = jax.nn.log_sigmoid(logits)
  if clip > 0:
    # 1 - p_m = min(1 - p + clip, 1) >= clip > 0: the log is safe.
    one_minus_pm = jnp.minimum(1.0 - p + clip, 1.0)
    log_1m_pm = jnp.log(one_minus_pm)
    p_m = 1.0 - one_minus_pm
  else:
    log_1m_pm = jax.nn.log_sigmoid(-logits)
    p_m = p
  pos = log_p * (1.0 - p) ** gamma_pos if gamma_pos else log_p
  neg = log_1m_pm * p_m ** gamma_neg if gamma_neg else log_1m_pm
  return -(targets * pos + (1.0 - targets) * neg)


def masked_sum(logits: Array, targets: Array, mask: Array,
               loss_config: ml_collections.ConfigDict,
               class_weights: Optional[Array] = None) -> Array:
  """Scalar float32 sum over known entries of the weighted per-entry loss.

  Args:
    logits: (B, L) logits.
    targets: (B, L) targets in [0, 1].
    mask: (B, L), 1 where the label is known, 0 where it is ignored.
    loss_config: `config.loss` (kind, gamma_pos, gamma_neg, clip).
    class_weights: None or (2, L) weights for negative / positive entries.
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  # Unknown entries may hold any target, even nan: replace them before use
  # (a nan there would poison the gradient even when multiplied by 0).
  targets = jnp.where(mask > 0, targets, 0.0)
  if loss_config.kind == "bce":
    per = bce(logits, targets)
  elif loss_config.kind == "asymmetric":
    per = asymmetric(logits, targets, float(loss_config.gamma_pos),
                     float(loss_config.gamma_neg), float(loss_config.clip))
  else:
    raise UserError(f"loss.kind={loss_config.kind!r}; expected one of {KINDS}")
  if class_weights is not None:
    w = jnp.asarray(class_weights, jnp.float32)
    per = per * (targets * w[1] + (1.0 - targets) * w[0])
  return jnp.sum(per * mask)


def known_count(mask: Array) -> Array:
  """The loss's denominator: the number of known entries, at least 1 (a
  batch with none has loss 0, not nan)."""
  return jnp.maximum(jnp.sum(jnp.asarray(mask, jnp.float32)), 1.0)


def loss(logits: Array, targets: Array, mask: Array,
         loss_config: ml_collections.ConfigDict,
         class_weights: Optional[Array] = None) -> Array:
  """Scalar float32 loss: the masked mean of the per-entry loss (arguments
  as `masked_sum`)."""
  return (masked_sum(logits, targets, mask, loss_config, class_weights)
          / known_count(mask))


def total(logits: Array, aux: dict, targets: Array, mask: Array,
          config: ml_collections.ConfigDict,
          class_weights: Optional[Array] = None, *,
          known: Optional[Array] = None, share: float = 1.0):
  """(scalar, metrics): the label loss plus the weighted MoE balance loss.

  `config` is the full config: `config.loss` and
  `config.model.moe.balance_loss` (the weight).

  For one part of a batch (a micro-batch of gradient accumulation) pass
  `known`, the whole batch's `known_count`, and `share`, the part's share of
  the batch's rows: then the parts' values and gradients add up to the
  whole batch's label loss (exactly: it is a sum over entries) plus the
  row-weighted mean of the parts' balance losses. The balance loss is a
  product of two batch means (mean gate x routed fraction), not a sum over
  rows; like Switch Transformer's per-group loss, each part balances its own
  rows. Metrics are the part's contributions, to be summed over parts.
  """
  known = known_count(mask) if known is None else known
  label = masked_sum(logits, targets, mask, config.loss, class_weights) / known
  balance = share * jnp.asarray(aux.get("balance_loss", 0.0), jnp.float32)
  weight = float(config.model.moe.balance_loss)
  value = label + weight * balance if weight else label
  return value, {"loss": value, "label_loss": label, "balance_loss": balance}
