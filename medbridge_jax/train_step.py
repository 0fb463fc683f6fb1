"""The jitted training update: loss, gradients (optionally accumulated over
micro-batches) and one optimizer step over the trainable parameters."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from medbridge_jax import sharding
from medbridge_jax.model import losses
from medbridge_jax.model import partition


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    config: ml_collections.ConfigDict, mesh):
  """The jitted update: (state, frozen, batch, class_weights) -> (state, m).

  `state` (step, trainable params, optimizer state) is donated; `frozen`
  (the experts' towers) is an ordinary argument that gets no gradient.
  With grad_accum > 1 the batch is cut into micro-batches whose gradients
  are summed in a scan before one optimizer update. Each micro-batch's label
  loss is its masked sum over the whole batch's count of known entries, so
  the sum is the full batch's masked mean (value and gradient) however
  unevenly the known labels fall; the balance loss is the mean of the
  micro-batches' own (`losses.total`). Random focal crops are drawn per
  micro-batch (key fold_in(step key, i)): as likely as the full batch's, not
  the same ones.
  """
  accum = int(config.train.grad_accum)
  step_key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
  batch_sharding = sharding.batch_sharding(mesh)

  def loss_fn(trainable, frozen, images, targets, mask, key, class_weights,
              known, share):
    params = partition.merge(trainable, frozen)
    logits, aux = model.apply({"params": params}, images, train=True,
                              rngs={"focal": key})
    return losses.total(logits, aux, targets, mask, config, class_weights,
                        known=known, share=share)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state, frozen, batch, class_weights):
    key = jax.random.fold_in(step_key, state["step"])
    # uint8 as the pipeline gives them: the model scales them on the device.
    args = (batch["image"], batch["targets"], batch["mask"])
    # The full batch's denominator, known before any micro-batch runs.
    known = losses.known_count(batch["mask"])
    if accum == 1:
      (_, parts), grads = grad_fn(state["params"], frozen, *args, key,
                                  class_weights, known, 1.0)
    else:
      grads, parts = _accumulate(
          functools.partial(grad_fn, state["params"], frozen), args, key,
          class_weights, known, accum, batch_sharding)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(step=state["step"] + 1,
                     params=optax.apply_updates(state["params"], updates),
                     opt_state=opt_state)
    out = dict(parts, grad_norm=optax.tree.norm(grads),
               lr=schedule(state["step"]))
    return new_state, out

  return step_fn


def _accumulate(grad_fn, args, key, class_weights, known, accum: int,
                batch_sharding):
  """(grads, loss parts) summed over `accum` micro-batches in a scan.

  `grad_fn(images, targets, mask, key, class_weights, known, share)` is the
  value-and-grad of the loss with the parameters bound; every part it
  returns is already scaled to its micro-batch's share of the batch.
  """
  # Micro-batch i takes rows i, i + accum, ...: every device keeps an
  # equal share of every micro-batch, so no rows move between devices.
  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  def body(carry, xs):
    *micro, i = xs
    micro = [jax.lax.with_sharding_constraint(m, batch_sharding)
             for m in micro]
    (_, p), g = grad_fn(*micro, jax.random.fold_in(key, i), class_weights,
                        known, 1.0 / accum)
    return jax.tree.map(jnp.add, carry, (g, p)), None

  shapes = jax.eval_shape(
      grad_fn,
      *[jax.ShapeDtypeStruct((a.shape[0] // accum,) + a.shape[1:], a.dtype)
        for a in args], key, class_weights, known, 1.0 / accum)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       (shapes[1], shapes[0][1]))
  (grads, parts), _ = jax.lax.scan(
      body, zeros, tuple(split(a) for a in args) + (jnp.arange(accum),))
  return grads, parts
