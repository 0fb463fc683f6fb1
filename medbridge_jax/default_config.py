"""The full configuration schema, with defaults for the embedded synthetic run.

Every task config in `configs/` starts from `get_default()` and changes what
its task needs. Every field has a comment; the command line can override any
of them (`--config.train.steps=100`) and an unknown key is an error.
"""

import ml_collections

# The embedded default's two experts: a CLIP-like and a SigLIP-like ViT of
# different widths and input sides (random_experts spec strings) ...
RANDOM_EXPERT_SHAPES = ("clip:width=64,layers=4,heads=4,patch=8,image=64",
                        "siglip:width=48,layers=4,heads=4,patch=8,image=48")
# ... given sight by this many steps of generic pre-training (experts.pretrain:
# small blobs and lines on textures, no chest X-rays). Without it a random ViT
# cannot see a finding smaller than a patch and focal sampling has nothing to
# show (README, Ablation). Pre-trained once and shipped (experts.testbed), so
# every machine loads the same experts; changing these means regenerating
# them (python -m medbridge_jax.experts.testbed), else each machine
# pre-trains its own for minutes.
PRETRAIN_STEPS = 1500


def get_default() -> ml_collections.ConfigDict:
  """Defaults: the synthetic chest X-ray data and two small random experts."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # One seed for init, data order, crops: same seed, same numbers.

  # ---- Data -----------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.dataset = "synthetic"  # chexpert | nih | mimic | vindr | rsna | synthetic
  c.data.root = ""  # Data set root; "" = generate synthetic data in the cache.
  c.data.train_split = "train"  # Split to train on.
  c.data.valid_split = "valid"  # Periodic eval, best checkpoint, thresholds.
  c.data.test_split = "test"  # Held out: every reported number comes from it.
  c.data.test_datasets = ()  # Extra (dataset, root, split) triples to test on.
  c.data.image_size = 256  # Side of the stored high-resolution image (pixels).
  c.data.labels = ()  # Label names to train on; () = the data set's own.
  c.data.uncertain_policy = "ignore"  # -1 labels: ignore | zeros | ones.
  c.data.blank_policy = "zeros"  # Blank labels: zeros | ignore.
  c.data.train_fraction = 1.0  # Fraction of training patients (0.01, 0.1, 1).
  c.data.on_bad_image = "error"  # Missing or corrupt image: error | skip.
  c.data.num_workers = 0  # grain worker processes (0 = in the main process).
  c.data.augment = True  # Training augmentation (small shifts, contrast).
  # Synthetic data (used when dataset == "synthetic" and root == "").
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_patients = 1200  # Patients; each has 1-4 studies.
  c.data.synthetic.seed = 0  # Generator seed (independent of c.seed).
  c.data.synthetic.variant = "chexpert"  # chexpert layout | nih (shifted domain).
  c.data.synthetic.focal_scale = 1.0  # x nodule radius, x pleural-line width.
  c.data.synthetic.focal_contrast = 1.0  # x the focal findings' contrast.

  # ---- Experts --------------------------------------------------------------
  # Expert folders as their publishers ship them (Hugging Face CLIP, SigLIP,
  # DINOv2 or VLM folders, open_clip folders; README lists them). Empty: small
  # random experts described by `random_experts` (briefly pre-trained on a
  # generic task, see PRETRAIN_STEPS) are written once to the cache and
  # loaded through the same loader.
  c.experts = ()
  c.random_experts = tuple(f"{s},pretrain={PRETRAIN_STEPS}"
                           for s in RANDOM_EXPERT_SHAPES)

  # ---- Model ----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32).
  c.model.attention_impl = "auto"  # auto | xla | cudnn (choose_attention).
  c.model.focal = ml_collections.ConfigDict()
  c.model.focal.enabled = True  # False: the global view only.
  c.model.focal.num_local = 4  # N-1 random local crops per image in training.
  c.model.focal.crop_size = 0  # Crop side in stored pixels; 0 = expert's side.
  c.model.focal.eval_overlap = 0.25  # Overlap of evaluation sliding windows.
  c.model.focal.lung_bias = 0.0  # 0 = uniform crop centres; 1 = all in lungs.
  c.model.focal.resize = "linear"  # Antialiased: linear | cubic | lanczos3.
  c.model.focal.train_windows = "random"  # random | sliding (eval windows).
  c.model.focal.global_view = True  # False: local views only (needs enabled).
  c.model.focal.global_side = 0  # Whole-image view side; 0 = expert's side.
  c.model.queries = ml_collections.ConfigDict()
  c.model.queries.enabled = True  # False: the frozen pooled feature only.
  c.model.queries.num_queries = 4  # Q learnable query tokens per expert.
  c.model.queries.inject_layer = -2  # T1; negative counts from the last layer.
  c.model.queries.mode = "non_destructive"  # non_destructive | joint.
  c.model.queries.init_std = 0.02  # Query tokens start as N(0, init_std^2).
  c.model.fusion = ml_collections.ConfigDict()
  c.model.fusion.enabled = True  # False: plain max over views, no attention.
  c.model.fusion.num_heads = 4  # Heads of the cross-view self-attention.
  c.model.fusion.num_layers = 1  # Cross-view self-attention blocks.
  c.model.fusion.keep_global = False  # Global view's tokens beside the max.
  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.enabled = True  # False: plain average of the experts' logits.
  c.model.moe.gating = "soft"  # soft | top_k | per_label.
  c.model.moe.top_k = 1  # Experts kept by top_k gating.
  c.model.moe.balance_loss = 0.0  # Weight of the load-balancing loss.
  c.model.moe.gate_hidden = 0  # Hidden width of the gate MLP; 0 = linear gate.
  c.model.head = ml_collections.ConfigDict()
  c.model.head.text_init = True  # Init heads from label-prompt text embeddings.

  # ---- Method ---------------------------------------------------------------
  # What adapts the frozen experts: MedBridge, or one of the baselines it is
  # compared with (methods.py). Every method reads the same data, trains with
  # the same loop and loss, and is evaluated and reported the same way.
  # Baselines see each expert's whole image at the expert's input side (the
  # global view) and combine experts like MedBridge (config.model.moe).
  c.method = ml_collections.ConfigDict()
  # medbridge | linear_probe | clip_adapter | vpt_shallow | vpt_deep | lora
  # | coop | finetune.
  c.method.name = "medbridge"
  c.method.adapter_reduction = 4  # CLIP-Adapter bottleneck: width / this.
  c.method.adapter_ratio = 0.2  # CLIP-Adapter residual ratio in [0, 1].
  c.method.vpt_prompts = 8  # VPT prompt tokens (per layer when deep).
  c.method.lora_rank = 4  # LoRA rank r.
  c.method.lora_alpha = 8.0  # LoRA scale alpha (the update is alpha / r AB).
  c.method.lora_targets = ("query", "value")  # Adapted attention projections.
  c.method.coop_class_specific = False  # CoOp: one context per label.
  c.method.finetune_last = 2  # Blocks fine-tuned, the last; -1 = all (full).

  # ---- Zero-shot baseline -----------------------------------------------------
  c.zero_shot = ml_collections.ConfigDict()
  c.zero_shot.enabled = True  # Report the frozen experts' zero-shot AUROC.
  c.zero_shot.positive = "a chest x-ray showing {label}"  # Positive prompt.
  c.zero_shot.negative = "a chest x-ray with no {label}"  # Negative prompt.

  # ---- Loss -----------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.kind = "bce"  # bce | asymmetric.
  c.loss.gamma_pos = 0.0  # Asymmetric loss: focusing on positives.
  c.loss.gamma_neg = 4.0  # Asymmetric loss: focusing on negatives.
  c.loss.clip = 0.05  # Asymmetric loss: probability margin for negatives.
  c.loss.class_weights = "none"  # none | balanced (inverse prevalence).

  # ---- Training -------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 300  # Optimizer steps.
  c.train.batch_size = 32  # Global batch size (all devices, all hosts).
  c.train.grad_accum = 1  # Micro-batches accumulated per optimizer step.
  c.train.lr = 3e-3  # Peak learning rate.
  c.train.warmup_steps = 30  # Linear warm-up, then cosine decay to zero.
  c.train.weight_decay = 1e-4  # AdamW weight decay.
  c.train.grad_clip = 1.0  # Global gradient-norm clip (0 = off).
  c.train.log_every = 25  # Steps between training-metric logs.
  c.train.eval_every = 100  # Steps between evaluations (0 = only at the end).
  c.train.checkpoint_every = 100  # Steps between checkpoints.
  c.train.keep_checkpoints = 2  # Periodic checkpoints kept (the best is kept too).

  # ---- Evaluation -----------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64  # Global evaluation batch size.
  c.eval.mean_labels = ()  # Labels in the reported mean AUROC; () = all.
  c.eval.bootstrap = 200  # Bootstrap resamples for 95% intervals (0 = off).
  # Score the evidence maps against the test sets' boxes (pointing game, IoU
  # hit) where the data set has boxes (NIH, VinDr, RSNA, synthetic).
  c.eval.localise = True

  # ---- Devices --------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the data axis; -1 = all.
  return c


def shrink_for_local_run(c: ml_collections.ConfigDict) -> None:
  """Makes `c` a run of seconds: tiny data, few steps, experts without the
  minutes of pre-training (tests, smoke runs)."""
  c.random_experts = RANDOM_EXPERT_SHAPES
  c.data.synthetic.num_patients = 60
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.warmup_steps = 1
  c.train.log_every = 2
  c.train.eval_every = 0
  c.train.checkpoint_every = 2
  c.eval.batch_size = 16
  c.eval.bootstrap = 10
