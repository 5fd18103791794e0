"""The values some params keys accept, and a shared default, kept free of torch.

``TrainParams`` (``blip2lib/train_params.py``) checks its keys against these when a params file is read, and every
``--help`` builds without importing torch; the modules that act on the values (``dist``, ``tasks``, ``optim``,
``precision``) import them from here, so each list is written once.
"""

DEFAULT_TIMEOUT_S = 1800  # torch's own default: room for a slow checkpoint write or validation that others wait for
TEXT_PADDINGS = ("max_length", "longest")  # Q-Former caption padding: max_length (LAVIS) | longest
LR_SCHEDULES = ("step", "lavis_epoch")  # per-step cosine (paper) | LAVIS's per-epoch cosine
VIT_PRECISIONS = ("fp16_lavis", "fp16", "bf16", "fp32")  # frozen-ViT precision policies (blip2lib.precision)
