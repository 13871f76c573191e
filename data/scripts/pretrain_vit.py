"""Pretrain the ci profile's ViT on the *source* task: scikit-learn digits 0–4 (bundled with scikit-learn).

    python data/scripts/pretrain_vit.py        # ~7 min on a shared 2-core CPU; writes data/checkpoints/vit_digits04/

The downstream task in ``boftlab.reproduce.vit`` is digits 5–9, which this script never sees. 20 % of the source
images are held out to report the source accuracy recorded in config.json. Training uses random ±1-pixel shifts.
"""

import datetime
import platform

import torch
import torch.nn.functional as F

from boftlab.reproduce.runner import batch_indices, digits, save_checkpoint, stratified_split
from boftlab.reproduce.vit import CHECKPOINT, SOURCE_CLASSES, build_ci_vit, normalize

STEPS, BATCH, LR, SEED = 2500, 64, 2e-3, 0


def shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel in each direction (zero padding): (N, 1, 8, 8) -> same."""
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def main() -> None:
    torch.manual_seed(SEED)
    images, labels = digits(SOURCE_CLASSES)
    train, test = stratified_split(labels, 0.2, SEED)
    x, y = normalize(images), labels
    model = build_ci_vit(len(SOURCE_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=STEPS, pct_start=0.05)
    gen = torch.Generator().manual_seed(SEED)
    for step in range(STEPS):
        idx = train[batch_indices(len(train), BATCH, step, SEED)]
        loss = F.cross_entropy(model(shift(x[idx], gen)), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        test_acc = (model(x[test]).argmax(-1) == y[test]).float().mean().item()
        train_acc = (model(x[train]).argmax(-1) == y[train]).float().mean().item()
    print(f"source train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}")
    config = {
        "architecture": "timm VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, "
                        "num_heads=4, mlp_ratio=2.0, num_classes=5); see boftlab.reproduce.vit.build_ci_vit",
        "source_task": "scikit-learn load_digits, classes 0-4 (labels 0-4), images/16 mapped to [-1, 1]",
        "source_train_images": len(train),
        "source_test_images": len(test),
        "source_train_accuracy": round(train_acc, 4),
        "source_test_accuracy": round(test_acc, 4),
        "training": f"{STEPS} AdamW steps, batch {BATCH}, one-cycle lr {LR}, weight decay 0.05, ±1 px shifts, "
                    f"seed {SEED}",
        "script": "data/scripts/pretrain_vit.py",
        "made": f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {platform.machine()} CPU",
    }
    path = save_checkpoint(CHECKPOINT, model.state_dict(), config)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
