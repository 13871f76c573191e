"""Pretrain the ci profile's ViT on the *source* task: scikit-learn digits 0–4 (bundled with scikit-learn).

    python data/scripts/pretrain_vit.py        # ~7 min on a shared 2-core CPU; writes boftlab/pretrained/vit_digits04/

The downstream task in ``boftlab.reproduce.vit`` is digits 5–9, which this script never sees. 20 % of the source
images are held out to report the source accuracy recorded in config.json. Training uses random ±1-pixel shifts.
"""

import datetime
import platform

import torch

from boftlab.reproduce.data import digits, stratified_split
from boftlab.reproduce.pretrained import save_pretrained, train_digit_model
from boftlab.reproduce.vit import CHECKPOINT, SOURCE_CLASSES, build_ci_vit, normalize

STEPS, BATCH, LR, SEED = 2500, 64, 2e-3, 0


def main() -> None:
    torch.manual_seed(SEED)
    images, labels = digits(SOURCE_CLASSES)
    train, test = stratified_split(labels, 0.2, SEED)
    x, y = normalize(images), labels
    model = build_ci_vit(len(SOURCE_CLASSES))
    train_digit_model(model, x, y, train, STEPS, BATCH, LR, 0.05, SEED)
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
    path = save_pretrained(CHECKPOINT, model.state_dict(), config)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
