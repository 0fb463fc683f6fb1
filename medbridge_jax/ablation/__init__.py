"""Pieces of `python -m medbridge_jax.ablate`, one idea per file.

  tokens      experts' geometry, patch tokens per image, the matched side
  variants    the grid's variants: a table of config overrides
  runs        one run per sub-workdir: trained once, reused, read back
  numbers     label groups, paired differences, spreads over seeds
  grid        the seeded grid of variants and its results
  dose        the dose-response on the focal findings' size and contrast
  tables      the results as markdown and JSON files
"""
