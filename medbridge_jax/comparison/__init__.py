"""Pieces of `python -m medbridge_jax.compare`, one idea per file.

  plan        which methods run, their configs and sub-workdirs
  isolated    each run trained in a fresh process (its own peak memory)
  machine     the machine and date the table names
  collect     the finished runs read back: numbers per test set, costs
  tables      the comparison as markdown
  experiment  trains what is missing, writes compare.md and compare.json

Runs, paired differences and file writing are the ablation's
(`medbridge_jax.ablation.runs`, `numbers`, `tables`).
"""
