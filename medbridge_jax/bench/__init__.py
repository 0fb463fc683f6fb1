"""Benchmarks: the harness and its pieces, and standalone benchmarks.

The harness, `python -m medbridge_jax.bench [flags]` (one JSON line per
measurement; `__main__.py` has its flags and fields):
  harness       the measurements, one function each, in run order
  flops         analytic FLOP count of a ViT tower's forward
  timing        timed iterations, compile counting, device facts
  model_steps   the frozen forward, MedBridge train and eval steps to time
  input_speed   decode + resize + augment throughput of the input pipeline
  plan          real configurations compiled ahead of time from shapes
                (--plan): views, FLOPs, memory, batch fit

Standalone benchmarks, each `python -m medbridge_jax.bench.NAME [flags]`:
  decode_speed  DICOM decoding and shard-record preparation per image
  index_speed   the label-file readers on publisher-sized fixtures
  focal_probe   a linear probe: can a frozen expert's features see a finding?
  focal_zoom    which crop side lets a frozen expert see a focal finding
  expert_sizes  parameters and bf16 weights of the published experts
  evidence_cost what evidence maps add to an evaluation step

Nothing is imported here: the input pipeline's spawned workers import
`input_speed` and need no JAX.
"""
