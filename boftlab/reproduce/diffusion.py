"""Diffusion domain: adapt a pretrained denoising diffusion model to generate something it was not trained on.

ci:    a small diffusers ``UNet2DModel`` + ``DDPMScheduler`` (50 steps) that ``data/scripts/pretrain_unet.py``
       pretrained on scikit-learn's 8×8 digits 0–4, adapted to the training half of digits 5–9 (a quarter of it,
       stratified, held back for validation). Validation metric (curves, learning-rate choice): the denoising loss
       on the validation images at fixed noise and timesteps. Test metric: sample quality, judged by a digit
       classifier trained on all ten classes (``data/scripts/train_digit_classifier.py``): the *target-digit rate*
       is the fraction of 256 samples (fixed noise) it labels 5–9, the *coverage* the effective number of distinct
       target digits among those, over five; the metric is their product, so a model that draws only 5s scores
       0.2, not 1. CPU, minutes.
colab: Stable Diffusion v1.5, subject-driven (DreamBooth-style) on four of the five ``diffusers/dog-example``
       photos with the prompt "a photo of sks dog"; validation: the denoising loss on the fifth photo at fixed
       noise and timesteps; test metric: CLIP image similarity of generated and all five reference photos (CLIP-I).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_indices, digits, stratified_split
from .domain import Domain
from .methods import Method, adapter_methods
from .pretrained import hide_weight_loading_bars, load_pretrained
from .protocol import CLAIMS, FLORA_CLAIM
from .runner import fitting
from .task import Run, Task

CHECKPOINT = "unet_digits04"
CLASSIFIER = "digit_classifier"
SOURCE_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = [5, 6, 7, 8, 9]


@dataclass(frozen=True)
class Settings:
    steps: int
    batch_size: int
    eval_every: int
    n_samples: int  # samples generated for the test metric (fixed noise)
    seed: int = 0
    inference_steps: int | None = None  # colab: sampler steps per image
    mixed_precision: bool = False  # autocast: bf16 where the GPU has it, else fp16 (runner.autocast_dtype)
    gradient_checkpointing: bool = False


SETTINGS = {
    # 40 steps of batch 32 (150 of 64 before issue 24): the full protocol trains every method 5 times, and the
    # committed run had to fit a 2-core machine shared with other jobs (load ≈ 10) in under an hour
    "ci": Settings(steps=40, batch_size=32, eval_every=10, n_samples=256),
    "colab": Settings(steps=400, batch_size=1, eval_every=100, n_samples=4, inference_steps=25, mixed_precision=True,
                      gradient_checkpointing=True),
}
#: the share of the ci training half held back for validation; (noise, timestep) draws per validation image
VALIDATION_FRACTION = 0.25
VALIDATION_DRAWS = 4



# --- the ci models ----------------------------------------------------------------------------------------------------
UNET_ARCH = dict(
    sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=16,
)
SCHEDULER = dict(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")


def build_ci_unet():
    """8×8×1 -> 8×8×1 noise prediction; two resolutions (8×8 with 32 channels, 4×4 with 64), self-attention in the
    4×4 middle block."""
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_ARCH)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER)


def build_digit_classifier() -> nn.Module:
    """(N, 1, 8, 8) images in [0, 1] -> (N, 10) logits. A small CNN used only to judge generated digits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, 64, 4, 4)
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(64 * 16, 10),
    )


def load_ci_unet():
    """(pretrained UNet2DModel, its DDPMScheduler, checkpoint config)."""
    state, config = load_pretrained(CHECKPOINT)
    unet = build_ci_unet()
    unet.load_state_dict(state)
    return unet, build_scheduler(), config


def load_digit_classifier() -> tuple[nn.Module, dict]:
    state, config = load_pretrained(CLASSIFIER)
    model = build_digit_classifier()
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), config


def fixed_noise(x0: torch.Tensor, scheduler, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``draws`` seeded (noise, timestep) pairs per image of x0 (N, C, H, W): noise (draws·N, C, H, W), timesteps
    (draws·N,) uniform over the scheduler's training timesteps — the same for every method and every evaluation."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((draws * len(x0), *x0.shape[1:]), generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (draws * len(x0),), generator=gen)
    return noise, t


def denoising_loss(unet: nn.Module, scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   batch_size: int = 256, text: torch.Tensor | None = None) -> float:
    """The DDPM objective at fixed draws: x0 (N, C, H, W) repeated to len(noise) rows -> mean squared error between
    the noise and the UNet's prediction of it; ``text`` (1, tokens, width): a conditional UNet's prompt embedding.
    O(len(noise)) UNet rows."""
    x0 = x0.repeat(len(noise) // len(x0), *([1] * (x0.dim() - 1))).to(noise.device)
    total = 0.0
    for i in range(0, len(noise), batch_size):
        x, n, step = x0[i:i + batch_size], noise[i:i + batch_size], t[i:i + batch_size]
        options = {} if text is None else {"encoder_hidden_states": text.expand(len(x), -1, -1)}
        predicted = unet(scheduler.add_noise(x, n, step), step, **options).sample
        total += F.mse_loss(predicted.float(), n, reduction="sum").item()
    return total / noise.numel()


def diffusion_loss(unet: nn.Module, scheduler, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The DDPM objective: x0 (B, C, H, W) in [-1, 1] -> MSE between the noise and the UNet's prediction of it at
    a uniformly drawn timestep."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
    return F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)


@torch.no_grad()
def sample(unet: nn.Module, scheduler, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """n images (n, 1, 8, 8) in [0, 1] by ancestral DDPM sampling over every training timestep; the noise comes
    from ``seed``, so two models given the same seed start from the same noise. O(T) UNet calls."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    gen = torch.Generator().manual_seed(seed)
    size = UNET_ARCH["sample_size"]
    x = torch.randn(n, 1, size, size, generator=gen).to(device)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, generator=gen).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2).cpu()


def target_rate(classifier: nn.Module, images: torch.Tensor, classes: list[int]) -> float:
    """Fraction of ``images`` (N, 1, 8, 8) in [0, 1] that ``classifier`` labels as one of ``classes``."""
    predicted = classifier(images).argmax(-1)
    return torch.isin(predicted, torch.tensor(classes)).float().mean().item()


def coverage(classifier: nn.Module, images: torch.Tensor, classes: list[int]) -> float:
    """How evenly the ``images`` labelled as one of ``classes`` spread over them: exp(entropy of their label
    histogram) — the effective number of distinct classes drawn — divided by len(classes). 1 when every class is
    equally frequent, 1/len(classes) when one class is all there is, 0 when no image is labelled as any of them."""
    predicted = classifier(images).argmax(-1)
    counts = torch.stack([(predicted == c).sum() for c in classes]).float()  # (len(classes),)
    if counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return torch.exp(-(p * p.log()).sum()).item() / len(classes)


def covered_target_rate(classifier: nn.Module, images: torch.Tensor, classes: list[int]) -> float:
    """The ci metric: ``target_rate × coverage``. Drawing only one of five target digits scores at most 0.2; 1 needs
    every sample to be a target digit and the five to be equally frequent. O(N) classifier calls."""
    return target_rate(classifier, images, classes) * coverage(classifier, images, classes)


def sample_labels(classifier: nn.Module, images: torch.Tensor) -> list[int]:
    """How many of ``images`` ``classifier`` labels 0, 1, …, 9."""
    return torch.bincount(classifier(images).argmax(-1), minlength=10).tolist()


# --- methods ----------------------------------------------------------------------------------------------------------
CI_ATTENTION = r".*attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)"
CI_LAYERS = rf".*resnets\.\d+\.conv[12]|{CI_ATTENTION}"


def ci_methods() -> list[Method]:
    """Every method targets the 16 resnet convolutions (3×3) and the 4 attention projections of the UNet. Budgets:
    LoRA r=6 61 632, OFT b=16 68 880, BOFT b=8 m=2 65 376, BOFT b=4 m=4 56 192, FLoRA 28 448; SURM is smaller by
    construction (circulant 9 184: one n-vector per layer; Kronecker 5 972)."""
    return [
        Method("full fine-tuning", "full", lr=5e-4),
        *adapter_methods(CI_LAYERS, 3e-3, lora_rank=6, oft_block_size=16, flora_ranks=8),
    ]


SD_ATTENTION = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"


def colab_methods() -> list[Method]:
    """BOFT on the attention projections, as in the BOFT paper's subject-driven experiments. Full fine-tuning of the
    860 M-parameter UNet needs ≈ 14 GB for its weights, gradients and AdamW states alone: the runner's memory gate
    skips it on a GPU where that does not fit (a free T4), with the estimate in its row."""
    return [Method("full fine-tuning", "full", lr=5e-6),
            *adapter_methods(SD_ATTENTION, 1e-4, lora_rank=4, lora_alpha=4, oft_block_size=32, flora_ranks=4,
                             orthogonal_lr=3e-5)]


#: activation memory of one 512×512 training image through the SD v1.5 UNet under fp16 autocast with gradient
#: checkpointing: a rough estimate for the memory gate (an out-of-memory error is still caught)
SD_ACTIVATION_BYTES = 2 * 2**30
#: (noise, timestep) draws of the colab validation photo
COLAB_VALIDATION_DRAWS = 8


# --- tasks ------------------------------------------------------------------------------------------------------------
def ci_task(s: Settings) -> tuple[Task, str]:
    unet, scheduler, config = load_ci_unet()
    classifier, classifier_config = load_digit_classifier()
    images, labels = digits(TARGET_CLASSES)
    train, _ = stratified_split(labels, 0.5, s.seed)  # the same training half the ViT domain uses
    fit, held = stratified_split(labels[train], VALIDATION_FRACTION, s.seed)  # positions within ``train``
    x0, val = images[train[fit]] * 2 - 1, images[train[held]] * 2 - 1
    val_noise, val_t = fixed_noise(val, scheduler, VALIDATION_DRAWS, s.seed)
    device = torch.device("cpu")
    samples: list[torch.Tensor] = []  # the test's samples, for ``after``
    before: list[torch.Tensor] = []  # the pretrained model's samples from the same noise, drawn once

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(s.seed * 100_003 + step)
        return diffusion_loss(m, scheduler, x0[batch_indices(len(x0), s.batch_size, step, s.seed)].to(device), gen)

    def test(m: nn.Module) -> float:
        samples[:] = [sample(m, scheduler, s.n_samples, s.seed, device)]
        return covered_target_rate(classifier, samples[0], TARGET_CLASSES)

    def after(m: nn.Module, run: Run) -> None:
        if not samples:  # not tested: nothing was sampled
            return
        if not before:
            before.append(sample(unet, scheduler, s.n_samples, s.seed, device))
        run.extra["samples_before"], run.extra["samples_after"] = before[0], samples[0]
        run.extra["target_rate"] = target_rate(classifier, samples[0], TARGET_CLASSES)
        run.extra["coverage"] = coverage(classifier, samples[0], TARGET_CLASSES)
        run.extra["labels"] = sample_labels(classifier, samples[0])
        samples.clear()

    task = Task(unet, [], loss, lambda m: denoising_loss(m, scheduler, val, val_noise, val_t), s.steps, s.eval_every,
                device, s.seed, after, test=test, setting=f"batch {s.batch_size} images")
    description = (
        f"Pretrained model: a {sum(p.numel() for p in unet.parameters()):,}-parameter diffusers `UNet2DModel` with "
        f"a {SCHEDULER['num_train_timesteps']}-step `DDPMScheduler` (`boftlab/pretrained/{CHECKPOINT}`), trained by "
        f"`data/scripts/pretrain_unet.py` on scikit-learn digits {SOURCE_CLASSES}. Downstream: generate digits "
        f"{TARGET_CLASSES}, from {len(x0)} training images ({len(val)} more, stratified, validate: their denoising "
        f"loss at {VALIDATION_DRAWS} fixed (noise, timestep) draws each is the curves' metric, by which learning "
        "rates are chosen). Test metric: target rate × coverage — the fraction of "
        f"{s.n_samples} samples (same noise for every method) that a digit classifier trained on all ten classes "
        f"(`boftlab/pretrained/{CLASSIFIER}`, test accuracy {classifier_config['test_accuracy']:.3f}) labels 5–9, "
        "times the effective number of distinct digits among those (exp of their label entropy) over 5: samples "
        "that are all one digit score at most 0.2. "
        f"Before adaptation, {config['target_rate_of_pretrained']:.2f} of the pretrained model's samples got such a "
        f"label in the pretraining script's check. {s.steps} steps of batch {s.batch_size}."
    )
    return task, description


def square_pixels(photo, size: int) -> torch.Tensor:
    """A PIL photo -> (3, size, size) in [-1, 1], as DreamBooth prepares its photos: the shorter side scaled to
    ``size``, then the centre square cut out, so the subject keeps its proportions (a plain resize would squash a
    3:4 photo into a square). O(size²)."""
    import numpy as np
    from PIL import Image, ImageOps

    square = ImageOps.fit(photo.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(square)).permute(2, 0, 1)  # (H, W, 3) uint8 -> (3, size, size)
    return pixels.float() / 127.5 - 1


def colab_task(s: Settings) -> tuple[Task, str]:
    """DreamBooth-style subject-driven generation with Stable Diffusion v1.5: fp32 weights, training and sampling
    under autocast. The frozen VAE and text encoder live on the GPU; the pretrained UNet stays on the CPU, and each
    method's copy is the only UNet on the GPU (the pipeline samples with it, then lets it go)."""
    from datasets import load_dataset
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPModel, CLIPProcessor

    hide_weight_loading_bars()
    diffusers_logging.disable_progress_bar()  # and diffusers' "Loading pipeline components" bar
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                   safety_checker=None, requires_safety_checker=False)
    base = pipe.unet  # (CPU) copied by every method
    pipe.vae.to(device).requires_grad_(False)
    pipe.text_encoder.to(device).requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch32").to(device).eval()
    clip_processor = CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32")
    photos = [row["image"].convert("RGB") for row in load_dataset("diffusers/dog-example", split="train")]
    # the last photo validates (its denoising loss), the others train; the test compares samples with all five
    prompt, eval_prompt = "a photo of sks dog", "a photo of sks dog on the beach"
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # 512: train at the resolution the pipeline samples

    def clip_embed(images) -> torch.Tensor:
        inputs = clip_processor(images=images, return_tensors="pt").to(device)
        features = clip.get_image_features(**inputs)  # a tensor, or (transformers ≥ 5) an output object
        return F.normalize(getattr(features, "pooler_output", features), dim=-1)

    with torch.no_grad():
        reference = clip_embed(photos)
        pixels = torch.stack([square_pixels(p, size) for p in photos]).to(device)  # (5, 3, 512, 512)
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # (5, 4, 64, 64)
        latents, val_latents = latents[:-1], latents[-1:]
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(device)
        text = pipe.text_encoder(ids)[0]  # (1, 77, 768)

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(s.seed * 100_003 + step)
        x0 = latents[batch_indices(len(latents), s.batch_size, step, s.seed)]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
        noisy = pipe.scheduler.add_noise(x0, noise, t)
        return F.mse_loss(m(noisy, t, encoder_hidden_states=text.expand(len(x0), -1, -1)).sample, noise)

    val_noise, val_t = fixed_noise(val_latents, pipe.scheduler, COLAB_VALIDATION_DRAWS, s.seed)
    val_noise, val_t = val_noise.to(device), val_t.to(device)

    def validate(m: nn.Module) -> float:
        return denoising_loss(m, pipe.scheduler, val_latents, val_noise, val_t, batch_size=s.batch_size, text=text)

    def test(m: nn.Module) -> float:
        pipe.unet = m  # the pipeline samples with the adapted UNet (under the runner's autocast) ...
        try:
            images = pipe(eval_prompt, num_images_per_prompt=s.n_samples, num_inference_steps=s.inference_steps,
                          generator=torch.Generator(device).manual_seed(s.seed)).images
        finally:
            pipe.unet = base  # ... and keeps no reference to it, so it leaves the GPU with its method
        return (clip_embed(images) @ reference.T).mean().item()

    task = Task(base, [], loss, validate, s.steps, s.eval_every, device, s.seed, test=test, **fitting(s, device),
                activation_bytes=SD_ACTIVATION_BYTES * s.batch_size,
                setting=f"batch {s.batch_size} images at {size}×{size}")
    description = (
        "Pretrained model: Stable Diffusion v1.5. Downstream: four of the five photos of `diffusers/dog-example` "
        f"with the prompt {prompt!r} (DreamBooth-style, no prior preservation); {s.steps} steps of batch "
        f"{s.batch_size}. Curves: the denoising loss on the fifth photo at {COLAB_VALIDATION_DRAWS} fixed (noise, "
        f"timestep) draws. Test metric: CLIP-I — mean CLIP ViT-B/32 cosine similarity between {s.n_samples} images "
        f"generated for {eval_prompt!r} and all five reference photos."
    )
    return task, description


# --- figures ----------------------------------------------------------------------------------------------------------
def plot_samples(rows: dict[str, torch.Tensor], per_row: int = 16):
    """One row of ``per_row`` samples (each (1, 8, 8) in [0, 1]) per label: before / after grids (a matplotlib
    ``Figure``, outside pyplot, like ``results.plot_curves``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(per_row * 0.45, len(rows) * 0.6))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        strip = F.pad(images[:per_row, 0], (1, 1, 1, 1), value=0.0)  # (n, 10, 10); gray_r draws 0 white
        ax.imshow(torch.cat(list(strip), dim=1).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def diversity_table(runs: list[Run]) -> str:
    """Markdown: per tested method, what its test samples were labelled — the target-digit rate, the coverage, their
    product (the test metric, ``run.test``) and how many samples got each label 0–9."""
    from ..report import markdown_table

    done = [r for r in runs if not r.skipped and "labels" in r.extra]
    header = ["method", "target-digit rate", "coverage", "rate × coverage", *(f"# {d}" for d in range(10))]
    rows = [[r.method.name, r.extra["target_rate"], r.extra["coverage"], r.test, *r.extra["labels"]] for r in done]
    return markdown_table(header, rows)


def sample_grids(runs: list[Run]) -> dict:
    """The ci profile's before / after sample grid (one row per method); none for colab (CLIP-I only)."""
    done = [r for r in runs if not r.skipped and "samples_after" in r.extra]
    if not done:
        return {}
    rows = {"pretrained (before)": done[0].extra["samples_before"]}
    rows |= {r.method.name: r.extra["samples_after"] for r in done}
    return {"diffusion_samples": plot_samples(rows)}


DOMAIN = Domain(
    name="diffusion", label="Diffusion", settings_by_profile=SETTINGS,
    tasks={"ci": ci_task, "colab": colab_task}, methods={"ci": ci_methods, "colab": colab_methods},
    titles={"ci": "Diffusion: digits 0–4 → 5–9", "colab": "Stable Diffusion v1.5, subject-driven (sks dog)"},
    metrics={"ci": "target rate × coverage", "colab": "CLIP-I"}, higher_is_better=True, extra_figures=sample_grids,
    validation_metrics={"ci": "validation denoising loss", "colab": "validation denoising loss"},
    validation_higher_is_better=False, margins={"ci": 0.03, "colab": 0.02},
    claims=(*CLAIMS, FLORA_CLAIM),
)
settings, make_task, profile_methods, report, run, run_seeds, run_protocol, figures = (
    DOMAIN.settings, DOMAIN.make_task, DOMAIN.profile_methods, DOMAIN.report, DOMAIN.run, DOMAIN.run_seeds,
    DOMAIN.run_protocol, DOMAIN.figures)
