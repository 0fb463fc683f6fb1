"""Pieces of `python -m medbridge_jax.bench`, one idea per file.

  flops        analytic FLOP count of a ViT tower's forward
  timing       timed iterations, compile counting, device facts
  model_steps  the frozen forward, MedBridge train and eval steps to time
  input_speed  decode + resize + augment throughput of the input pipeline
"""
