"""Pretrain the ci profile's diffusion model on the *source* task: generating scikit-learn digits 0–4.

    python data/scripts/train_digit_classifier.py   # first: the classifier that judges samples
    python data/scripts/pretrain_unet.py            # ~21 min on a shared 2-core CPU; writes boftlab/pretrained/unet_digits04/

A diffusers UNet2DModel (``boftlab.reproduce.diffusion.build_ci_unet``) learns the DDPM objective on every image of
digits 0–4 (the downstream task, digits 5–9, is never seen); the saved weights are an exponential moving average
(decay 0.995) of the trained ones. config.json records how the digit classifier labels 256 of its samples: the
share it calls 0–4 (the source classes) and 5–9 (the downstream target).
"""

import copy
import datetime
import platform

import torch

from boftlab.reproduce.diffusion import (
    CHECKPOINT,
    SCHEDULER,
    SOURCE_CLASSES,
    TARGET_CLASSES,
    UNET_ARCH,
    build_ci_unet,
    build_scheduler,
    diffusion_loss,
    load_digit_classifier,
    sample,
    target_rate,
)
from boftlab.reproduce.data import batch_indices, digits
from boftlab.reproduce.pretrained import save_pretrained

STEPS, BATCH, LR, EMA, SEED = 1500, 128, 2e-3, 0.995, 0


def main() -> None:
    torch.manual_seed(SEED)
    images, _ = digits(SOURCE_CLASSES)
    x0 = images * 2 - 1
    unet, scheduler = build_ci_unet(), build_scheduler()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=STEPS, pct_start=0.05)
    gen = torch.Generator().manual_seed(SEED)
    for step in range(STEPS):
        loss = diffusion_loss(unet, scheduler, x0[batch_indices(len(x0), BATCH, step, SEED)], gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - EMA)
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    ema.eval()
    classifier, _ = load_digit_classifier()
    with torch.no_grad():
        samples = sample(ema, scheduler, 256, SEED + 1, torch.device("cpu"))
        source_rate = target_rate(classifier, samples, SOURCE_CLASSES)
        target = target_rate(classifier, samples, TARGET_CLASSES)
    print(f"classifier labels {source_rate:.3f} of 256 samples as 0-4 and {target:.3f} as 5-9")
    config = {
        "architecture": {"class": "diffusers UNet2DModel", **UNET_ARCH},
        "scheduler": {"class": "diffusers DDPMScheduler", **SCHEDULER},
        "source_task": "DDPM noise prediction on scikit-learn load_digits classes 0-4 (all images), "
                       "images/16 mapped to [-1, 1]",
        "source_images": len(x0),
        "source_rate_of_pretrained": round(source_rate, 4),
        "target_rate_of_pretrained": round(target, 4),
        "training": f"{STEPS} AdamW steps, batch {BATCH}, one-cycle lr {LR}, EMA {EMA} (saved), seed {SEED}",
        "script": "data/scripts/pretrain_unet.py",
        "made": f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {platform.machine()} CPU",
    }
    print(f"wrote {save_pretrained(CHECKPOINT, ema.state_dict(), config)}")


if __name__ == "__main__":
    main()
