"""The flat training parameters: ``TrainParams``, the schema of every training params file and notebook.

Torch-free, so reading or checking a params file never imports torch (``python -m blip2lib.train --help``, the
workbook's schemas); ``blip2lib.train`` re-exports both names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Params, ParamsError
from .options import DEFAULT_TIMEOUT_S, LR_SCHEDULES, TEXT_PADDINGS, VIT_PRECISIONS

STAGES = ("stage1", "stage2", "caption_ft", "vqa_ft", "retrieval_ft")


@dataclass
class TrainParams(Params):
    """Flat training parameters (the stage notebooks' parameters cells hold the same keys)."""

    stage: str = "stage1"  # stage1 | stage2 | caption_ft | vqa_ft | retrieval_ft
    model: str = "toy"  # "toy" (embedded toy world), "tiny" (random, seconds) or a PRESETS key, e.g. "vitg_opt2.7b"
    llm: str = "opt"  # toy/tiny LLM family: opt | t5
    toy_world: str = "full"  # toy world size: full (make demo) | tiny (seconds, tests)
    init_from: str = ""  # parent checkpoint dir (stage 1 → stage 2 / retrieval FT; stage 2 → caption/VQA FT)
    bert_dir: str = ""  # local bert-base-uncased dir: Q-Former init + tokenizer (unused by the toy and tiny models)
    vision_weights: str = ""  # eva_vit_g.pth / clip_vit_L.pth (real presets)
    llm_path: str = ""  # local transformers LLM dir (real presets)
    image_size: int = 224  # 224 pre-training; 364 caption/retrieval FT; 490 VQA FT (docs/paper_map.md §4)
    augment: str = "paper"  # paper (random crop 0.5-1 + flip) | crop (no flip) | none (eval resize: toy world)
    freeze_vit: bool = True  # False in the fine-tunings (ViT fp32, docs/paper_map.md §10.18)
    grad_checkpointing: bool = False  # ViT gradient checkpointing when it is trained
    llm_dropout: bool = True  # frozen LLM's dropout on in training steps (LAVIS); false pins the LLM in eval mode
    train_data: str = "toy"  # "toy", "synthetic", an annotation file / manifest under data_root, or tar shards
    shard_epoch_samples: int = 0  # tar-shard train_data: samples per rank and epoch (shards are resampled)
    shuffle_buffer: int = 1000  # tar-shard train_data: sample shuffle buffer (0 keeps the shard order)
    images_root: str = ""  # image folder under data_root for annotation files
    val_data: str = ""  # validation annotation file ("toy" → the toy val split; "" → none)
    val_images: int = 64  # validation subset size (images; questions for vqa_ft)
    steps: int = 100  # optimizer steps (paper: 250k stage 1, 80k stage 2)
    batch_size: int = 32  # per GPU
    grad_accum: int = 1  # micro-batches per step
    num_workers: int = 0  # DataLoader workers
    num_nodes: int = 1  # nodes taking part; num_gpus counts one node's GPUs (docs/multinode.md)
    node_rank: int = 0  # this node's index 0..num_nodes-1 (only the static rendezvous uses it)
    rdzv_endpoint: str = ""  # several nodes: rendezvous HOST:PORT ("" → $PET_RDZV_ENDPOINT)
    rdzv_id: str = ""  # several nodes: job id shared by all nodes ("" → $PET_RDZV_ID, else from the run folder)
    rdzv_backend: str = "c10d"  # c10d (ranks assigned when nodes join) | static (node_rank decides them)
    lr: float = 1e-4  # peak LR (paper §3.4)
    min_lr: float = 1e-5  # cosine floor (1e-5 stage 1, 5e-5 stage 2 in the paper)
    warmup_lr: float = 1e-6  # LR at step 0
    warmup_steps: int = 2000  # paper 2k (LAVIS yaml 5k)
    weight_decay: float = 0.05  # AdamW weight decay (paper and LAVIS), none on 1-D params and biases
    beta2: float = 0.98  # paper 0.98 (LAVIS yamls 0.999)
    lr_layer_decay: float = 1.0  # ViT layer-wise LR decay (Tables 7–9)
    apply_layer_decay: bool = True  # multiply the ViT groups' LR by lr_layer_decay powers (paper); LAVIS never does
    lr_schedule: str = (
        "step"  # step (paper: cosine per step) | lavis_epoch (LAVIS: warmup in epoch 0, cosine per epoch)
    )
    steps_per_epoch: int = 0  # lavis_epoch: micro-batches per epoch and rank (0 → the training set's full batches)
    amp: str = (
        "bf16"  # training autocast: bf16 | fp16 (GradScaler; LAVIS amp: True) | fp32; CPU runs use fp32 regardless
    )
    vit_precision: str = (
        ""  # frozen ViT on a GPU: fp16_lavis | fp16 | bf16 | fp32 ("" → the model's; presets fp16_lavis)
    )
    clip_norm: float = 0.0  # gradient clipping norm; 0 turns it off (the paper does not clip)
    max_txt_len: int = 32  # Q-Former and LLM text length
    text_padding: str = "max_length"  # Q-Former captions in stage 1 / retrieval FT: max_length (LAVIS) | longest
    cache_vision_features: bool = False  # keep each frozen-ViT output after its first pass (needs augment none)
    cache_images: bool = False  # keep each decoded, transformed training image in memory (needs augment none)
    prompt: str = ""  # "" pre-training; "a photo of" caption FT
    question_template: str = "Question: {} Answer:"  # VQA FT prompt (docs/paper_map.md §4.2)
    use_itg: bool = True  # Table 6 ablation switch (retrieval FT)
    ckpt_every: int = 0  # steps between checkpoints (0 → only at the end)
    eval_every: int = 0  # steps between validations (0 → only at the end)
    eval_at_start: bool = True  # also validate before the first step, so each validation curve has a true start
    keep_last: int = 2  # checkpoints kept
    max_bad_steps: int = 10  # consecutive non-finite steps before stopping
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = False  # also write the log's scalars to <run_dir>/tensorboard (needs `tensorboard`)
    dist_timeout_s: float = float(DEFAULT_TIMEOUT_S)  # several processes: seconds a rank waits for a hung one
    cache_max_gib: float = 4.0  # memory budget (GiB) of cache_images and of cache_vision_features, each
    feature_store: str = ""  # frozen-ViT feature store folder (python -m blip2lib.featstore build); needs augment none
    text_len_buckets: list[int] = field(default_factory=list)  # pad captions to the smallest fitting bucket; [] → off

    # Allowed ranges (checked by from_dict / validate_values before any work). Zero keeps its documented meaning
    # where a key has one (ckpt_every / eval_every 0: only at the end; steps_per_epoch 0: from the data; ...).
    ranges = {
        "steps": "[1, inf)",
        "batch_size": "[1, inf)",
        "grad_accum": "[1, inf)",
        "num_workers": "[0, inf)",
        "image_size": "[1, inf)",
        "max_txt_len": "[1, inf)",
        "val_images": "[1, inf)",
        "lr": "[0, inf)",
        "min_lr": "[0, inf)",
        "warmup_lr": "[0, inf)",
        "warmup_steps": "[0, inf)",
        "weight_decay": "[0, inf)",
        "beta2": "[0, 1)",
        "lr_layer_decay": "(0, 1]",
        "clip_norm": "[0, inf) (0 turns clipping off)",
        "steps_per_epoch": "[0, inf) (0 takes the epoch length from the data)",
        "shard_epoch_samples": "[0, inf)",
        "shuffle_buffer": "[0, inf) (0 keeps the shard order)",
        "ckpt_every": "[0, inf) (0 saves only at the end)",
        "eval_every": "[0, inf) (0 validates only at the end)",
        "keep_last": "[0, inf) (0 keeps every checkpoint)",
        "max_bad_steps": "[1, inf)",
        "dist_timeout_s": "(0, inf)",
        "cache_max_gib": "(0, inf)",
    }

    def validate_values(self, source: str = "TrainParams") -> TrainParams:
        """Ranges (see ``ranges``) and semantic checks that types alone cannot express."""
        self.check_ranges(source)
        if self.llm not in ("opt", "t5"):  # also a folder name (stage 2 trains each family into run_dir/<llm>)
            raise ValueError(f"llm must be opt or t5, got {self.llm!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.augment not in ("paper", "crop", "none"):
            raise ValueError(f"augment must be paper, crop or none, got {self.augment!r}")
        if self.cache_vision_features and (self.augment != "none" or not self.freeze_vit):
            raise ValueError("cache_vision_features needs a frozen ViT and fixed images (freeze_vit: true, augment: "
                             f"none); got freeze_vit={self.freeze_vit}, augment={self.augment!r}")  # fmt: skip
        if self.cache_images and self.augment != "none":
            raise ValueError(f"cache_images needs fixed images (augment: none), got augment={self.augment!r}")
        if self.text_padding not in TEXT_PADDINGS:
            raise ValueError(f"text_padding must be max_length or longest, got {self.text_padding!r}")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"amp must be bf16, fp16 or fp32, got {self.amp!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.vit_precision not in ("", *VIT_PRECISIONS):
            raise ValueError(f"vit_precision must be '' or one of {VIT_PRECISIONS}, got {self.vit_precision!r}")
        return self


def load_train_params(path: str) -> TrainParams:
    """``TrainParams`` of a YAML file, keys and values checked; a refused value is a ``ParamsError`` naming the file."""
    try:
        params = TrainParams.from_yaml(path)
        params.validate_values(path)
    except ParamsError:
        raise
    except ValueError as err:  # a value the schema's own checks refuse: name the file
        raise ParamsError(f"{path}: {err}") from err
    return params
