"""Train the digit classifier that judges the diffusion domain's samples, on all ten classes of scikit-learn's
bundled 8×8 digits.

    python data/scripts/train_digit_classifier.py     # ~4 min on a shared 2-core CPU; writes boftlab/pretrained/digit_classifier/

It is an evaluator, never fine-tuned: 80 % of every class trains it (with random ±1-pixel shifts), 20 % give the
test accuracy recorded in config.json.
"""

import datetime
import platform

import torch

from boftlab.reproduce.diffusion import CLASSIFIER, build_digit_classifier
from boftlab.reproduce.data import digits, stratified_split
from boftlab.reproduce.pretrained import save_pretrained, train_digit_model

STEPS, BATCH, LR, SEED = 1500, 64, 2e-3, 0


def main() -> None:
    torch.manual_seed(SEED)
    x, y = digits(list(range(10)))
    train, test = stratified_split(y, 0.2, SEED)
    model = build_digit_classifier()
    train_digit_model(model, x, y, train, STEPS, BATCH, LR, 0.01, SEED)
    with torch.no_grad():
        test_acc = (model(x[test]).argmax(-1) == y[test]).float().mean().item()
    print(f"test accuracy {test_acc:.4f}")
    config = {
        "architecture": "3-conv CNN, see boftlab.reproduce.diffusion.build_digit_classifier; input (N, 1, 8, 8) "
                        "in [0, 1], output 10 logits",
        "task": "scikit-learn load_digits, all ten classes, images/16; stratified 80 % train / 20 % test",
        "train_images": len(train),
        "test_images": len(test),
        "test_accuracy": round(test_acc, 4),
        "training": f"{STEPS} AdamW steps, batch {BATCH}, one-cycle lr {LR}, ±1 px shifts, seed {SEED}",
        "script": "data/scripts/train_digit_classifier.py",
        "made": f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {platform.machine()} CPU",
    }
    print(f"wrote {save_pretrained(CLASSIFIER, model.state_dict(), config)}")


if __name__ == "__main__":
    main()
