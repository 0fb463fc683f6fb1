"""Zero-shot prompts and pair-softmax probabilities (CheXzero style)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from medbridge_jax.errors import UserError
from medbridge_jax.experts import zero_shot


@dataclasses.dataclass
class FakeExpert:
  """Text features by lookup: checks the zero-shot maths, not a model."""
  table: dict
  logit_scale: float = 10.0
  logit_bias: float = 0.0
  seen: list = dataclasses.field(default_factory=list)

  def encode_text(self, texts):
    self.seen.extend(texts)
    return jnp.asarray([self.table[t] for t in texts], jnp.float32)


def test_prompts_order_and_templates():
  got = zero_shot.prompts(["edema", "mass"], "{label} yes", "{label} no")
  assert got == ["edema yes", "edema no", "mass yes", "mass no"]
  assert zero_shot.prompts(["edema"])[0] == "a chest x-ray showing edema"
  with pytest.raises(UserError, match="positive prompt"):
    zero_shot.prompts(["edema"], positive="a chest x-ray")
  with pytest.raises(UserError, match="non-empty list"):
    zero_shot.prompts("edema")


def test_prompt_embeddings_are_normalised_pairs():
  table = {"edema yes": [3.0, 0.0], "edema no": [0.0, 2.0],
           "mass yes": [1.0, 1.0], "mass no": [-1.0, 1.0]}
  e = FakeExpert(table)
  emb = zero_shot.prompt_embeddings(e, ["edema", "mass"], "{label} yes",
                                    "{label} no")
  assert emb.shape == (2, 2, 2)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(emb[0], [[1, 0], [0, 1]], atol=1e-6)
  assert e.seen == ["edema yes", "edema no", "mass yes", "mass no"]


@pytest.mark.parametrize("bias", [0.0, -10.0])
def test_probabilities_softmax_over_each_pair(bias):
  e = FakeExpert({}, logit_scale=5.0, logit_bias=bias)
  emb = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]],
                     [[0.0, 1.0], [1.0, 0.0]]])
  images = jnp.asarray([[2.0, 0.0], [1.0, 1.0]])  # Unnormalised on purpose.
  logits = np.asarray(zero_shot.logits(images, emb, e))
  c = 1 / np.sqrt(2)
  np.testing.assert_allclose(
      logits, 5.0 * np.array([[[1, 0], [0, 1]], [[c, c], [c, c]]]) + bias,
      rtol=1e-6, atol=1e-6)
  p = np.asarray(zero_shot.probabilities(images, emb, e))
  assert p.shape == (2, 2)
  s = 1 / (1 + np.exp(-5.0))  # The bias cancels inside each pair.
  np.testing.assert_allclose(p, [[s, 1 - s], [0.5, 0.5]], rtol=1e-6)


def test_width_mismatch():
  with pytest.raises(UserError, match="width"):
    zero_shot.logits(jnp.ones((1, 3)), jnp.ones((2, 2, 4)), FakeExpert({}))
