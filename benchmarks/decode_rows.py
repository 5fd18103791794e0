"""The generation rows of ``benchmarks/gpu.py``: captioning (ours vs transformers), zero-shot VQA, the VQAv2 pipeline.

* ``caption_greedy`` / ``caption_beam5``: ViT-g + OPT-2.7B, batch 64, exactly 30 new tokens (EOS suppressed, so
  every row does the same work). Ours = ``Blip2.soft_prompt`` + ``blip2lib.generation.generate_ids`` with
  ``engine=--engine``; transformers = ``Blip2ForConditionalGeneration.generate`` on the same tensors. Columns:
  images/s of both, ``same tokens`` (fraction of identical ids) and ``max |Δlogit|``: the largest difference
  between the two loops' logits over the first :data:`LOGIT_STEPS` decode steps, read from the LLM's output layer
  in one extra, untimed call per side (steps run inside a CUDA graph are not seen: ``logit_steps`` says how many
  steps were compared).
* ``vqa_opt2.7b`` / ``vqa_flant5xl``: one ``generate`` call per batch of (image, question) pairs, as the
  per-question path does: questions/s and the projected VQAv2 val time (214,354 questions).
* ``vqav2_pipeline``: the grouped evaluation pipeline (``blip2lib.evaluate.pipeline.GroupedVQA``: one soft prompt
  per image, length-sorted question batches) on synthetic images with VQAv2's 5.3 questions per image. It measures
  images/s (soft prompt) and questions/s (``generate`` with the repeated prefix) and projects the whole VQAv2 val run
  as ``40,504 / images/s + 214,354 / questions/s`` (:func:`project_vqav2`); image reading happens in DataLoader
  workers ahead of the model and is not part of it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from blip2lib.evaluate.pipeline import GroupedVQA
from blip2lib.generation import VQA_PROMPTS, format_prompt, generate_ids, resolve_eos
from blip2lib.toy.synthetic import WORDS

VQAV2_VAL_QUESTIONS = 214_354
VQAV2_VAL_IMAGES = 40_504
LOGIT_STEPS = 3  # decode steps whose logits are compared (the first ones: later steps follow different tokens)


def project_vqav2(images_per_s: float, questions_per_s: float) -> float:
    """Minutes for the whole VQAv2 val run: every image's soft prompt once, then every question's answer."""
    return (VQAV2_VAL_IMAGES / images_per_s + VQAV2_VAL_QUESTIONS / questions_per_s) / 60


def images(bench: Any, cfg: Any, n: int) -> torch.Tensor:
    """Random normalised images on the host (pinned on a GPU host, so the per-step copy is asynchronous)."""
    x = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(n))
    return x.pin_memory() if bench.cuda else x


def texts(n: int, words: int | tuple[int, int], seed: int = 0) -> list[str]:
    """``n`` captions/questions of random WORDS (fixed or ranged word count)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (words, words) if isinstance(words, int) else words
    pool = [w for w in WORDS if w.isalpha()]
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [" ".join(pool[int(i)] for i in torch.randint(0, len(pool), (k,), generator=g)) for k in lens]


def _gen_config(num_beams: int, max_new: int, min_new: int, length_penalty: float, tok, family: str):
    from transformers import GenerationConfig

    beam = dict(length_penalty=length_penalty) if num_beams > 1 else {}
    eos, pad = resolve_eos(tok, family), tok.pad_token_id
    return GenerationConfig(max_new_tokens=max_new, min_new_tokens=min_new, num_beams=num_beams, do_sample=False,
                            eos_token_id=eos, pad_token_id=pad, use_cache=True, **beam)  # fmt: skip


def step_logits(llm: torch.nn.Module, fn, steps: int = LOGIT_STEPS) -> list[torch.Tensor]:
    """The last-position logits (rows, V) of the first ``steps`` calls of ``llm``'s output layer while ``fn`` runs.

    Calls made while a CUDA graph is being captured are skipped (their values are not real yet, and copying them
    would break the capture); replays of a graph do not run Python, so they are not seen either.
    """
    got: list[torch.Tensor] = []

    def hook(module, args, out):
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if len(got) < steps and not capturing:
            # a copy: on a CPU in fp32 .float().cpu() is the same storage, and a loop that masks its logits in place
            # (EOS under min_new_tokens) would change what was recorded
            got.append((out[:, -1] if out.dim() == 3 else out).detach().float().cpu().clone())  # (rows, V)

    handle = llm.get_output_embeddings().register_forward_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return got


def max_logit_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> tuple[float | None, int]:
    """Largest |ours - theirs| over the steps both saw, and how many steps that was.

    A loop that prefills each sample once (B rows) is compared with one that prefills every beam (B × beams rows)
    by repeating its rows; steps whose rows still do not line up are not compared.
    """
    worst, n = None, 0
    for a, b in zip(ours, theirs):
        if a.shape[0] != b.shape[0] and b.shape[0] % a.shape[0] == 0:
            a = a.repeat_interleave(b.shape[0] // a.shape[0], dim=0)
        if a.shape != b.shape:
            continue
        d = (a - b).abs().max().item()
        worst, n = d if worst is None else max(worst, d), n + 1
    return worst, n


def row_caption(bench: Any, model, cfg, num_beams: int, hf=None) -> dict:
    """Captioning with the empty pre-training prompt (BOS only), exactly 30 new tokens, ours vs transformers."""
    n, tok, new = bench.sizes["gen_batch"], model.tokenizer, 30
    px = images(bench, cfg, n)
    name = "caption_greedy" if num_beams == 1 else f"caption_beam{num_beams}"
    kw = dict(num_beams=num_beams, max_new_tokens=new, min_new_tokens=new, length_penalty=1.0, engine=bench.engine)
    res = {}
    model.eval()

    @torch.inference_mode()
    def ours():
        with bench.amp(cfg):
            prefix = model.soft_prompt(px.to(bench.device, non_blocking=True))
            res["ours"] = generate_ids(model.language_model, "opt", tok, prefix, "", **kw)

    bench.reset_memory()
    out = dict(row=name, unit="img/s", ours=n / bench.timed(ours, bench.sizes["gen_iters"]), mem_ours=bench.peak_gib(),
               batch=n, new_tokens=new, num_beams=num_beams, engine=bench.engine)  # fmt: skip
    if hf is not None:
        gen = _gen_config(num_beams, new, new, 1.0, tok, "opt")
        skip = cfg.qformer.num_query_tokens + 1  # transformers returns [<image>×Q, BOS, new tokens]

        @torch.inference_mode()
        def theirs():
            with bench.amp(cfg):
                ids = hf.generate(pixel_values=px.to(bench.device, non_blocking=True), generation_config=gen)
                res["hf"] = ids[:, skip:]

        bench.reset_memory()
        out.update(hf=n / bench.timed(theirs, bench.sizes["gen_iters"]), mem_hf=bench.peak_gib())
        a, b = res["ours"].cpu(), res["hf"].cpu()
        t = min(a.shape[1], b.shape[1])
        same = (a[:, :t] == b[:, :t]).sum().item()
        out["token_agreement"] = same / (a.shape[0] * max(a.shape[1], b.shape[1]))  # length mismatch counts
        # untimed: the first steps' logits of both loops, from the LLM's output layer
        diff, steps = max_logit_diff(step_logits(model.language_model, ours), step_logits(hf.language_model, theirs))
        out.update(max_logit_diff=diff, logit_steps=steps)
    return out


def row_vqa(bench: Any, model, cfg, name: str) -> dict:
    """Zero-shot VQA (docs/paper_map.md §5.1): beam 5, ≤ 10 new tokens, min 1, length penalty -1, the paper's prompt."""
    n, fam = bench.sizes["vqa_batch"], cfg.llm.family
    px = images(bench, cfg, n)
    prompts = [format_prompt(VQA_PROMPTS[fam], q + "?") for q in texts(n, (4, 9), seed=2)]
    model.eval()

    @torch.inference_mode()
    def step():
        with bench.amp(cfg):
            prefix = model.soft_prompt(px.to(bench.device, non_blocking=True))
            generate_ids(model.language_model, fam, model.tokenizer, prefix, prompts, num_beams=5, max_new_tokens=10,
                         min_new_tokens=1, length_penalty=-1.0, engine=bench.engine)  # fmt: skip

    bench.reset_memory()
    qps = n / bench.timed(step, bench.sizes["gen_iters"])
    return dict(row=name, unit="questions/s", ours=qps, mem_ours=bench.peak_gib(), batch=n, engine=bench.engine,
                projected_vqav2_val_min=VQAV2_VAL_QUESTIONS / qps / 60)  # fmt: skip


class _SyntheticVQA(torch.utils.data.Dataset):
    """In-memory VQA split for the pipeline row: ``n_images`` random images, 5 or 6 questions each (mean 5.29)."""

    def __init__(self, pixels: torch.Tensor, seed: int = 3):
        counts = [5 + (k % 7 < 2) for k in range(pixels.shape[0])]  # 37 questions per 7 images: VQAv2's 5.29
        qs = texts(sum(counts), (3, 12), seed=seed)
        self.pixels = pixels
        self.annotation: list[dict] = []  # question n about image k (the grouping key)
        for k, c in enumerate(counts):
            for _ in range(c):
                n = len(self.annotation)
                self.annotation.append({"image": k, "question": qs[n], "question_id": n})
        self.text_processor = str

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, i: int) -> dict:
        a = self.annotation[i]
        return {"image": self.pixels[a["image"]], "text_input": a["question"], "question_id": a["question_id"]}


def row_vqav2_pipeline(bench: Any, model, cfg) -> dict:
    """The grouped pipeline on synthetic VQAv2-like data: measured images/s and questions/s, projected VQAv2 val."""
    n_img, batch, fam = 2 * bench.sizes["vqa_batch"], bench.sizes["vqa_batch"], cfg.llm.family
    ds = _SyntheticVQA(images(bench, cfg, n_img))
    gen_kwargs = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0, engine=bench.engine)
    if fam == "opt":
        gen_kwargs["max_prompt_len"] = 32  # as the evaluation driver (LAVIS OPT truncation)
    model.eval()

    def run(indices: list[int]) -> GroupedVQA:
        runner = GroupedVQA(model, ds, batch, lambda q: format_prompt(VQA_PROMPTS[fam], q + "?"), gen_kwargs)
        with torch.inference_mode(), bench.amp(cfg):
            runner(indices, lambda rows: None, bench.device)
        return runner

    run(list(range(min(len(ds), 2 * batch))))  # warm-up (kernels, allocator)
    bench.reset_memory()
    t0 = time.perf_counter()
    t = run(list(range(len(ds)))).timing
    wall = time.perf_counter() - t0
    ips, qps = t["images"] / t["vision_s"], t["questions"] / t["generate_s"]
    return dict(row="vqav2_pipeline", unit="questions/s", ours=t["questions"] / wall, mem_ours=bench.peak_gib(),
                batch=batch, engine=bench.engine, images=t["images"], questions=t["questions"], images_per_s=ips,
                questions_per_s=qps, projected_vqav2_val_min=project_vqav2(ips, qps))  # fmt: skip
