"""Train the digit classifier that judges the diffusion domain's samples, on all ten classes of scikit-learn's
bundled 8×8 digits.

    python data/scripts/train_digit_classifier.py     # ~4 min on a shared 2-core CPU; writes data/checkpoints/digit_classifier/

It is an evaluator, never fine-tuned: 80 % of every class trains it (with random ±1-pixel shifts), 20 % give the
test accuracy recorded in config.json.
"""

import datetime
import platform

import torch
import torch.nn.functional as F

from boftlab.reproduce.diffusion import CLASSIFIER, build_digit_classifier
from boftlab.reproduce.runner import batch_indices, digits, save_checkpoint, stratified_split

STEPS, BATCH, LR, SEED = 1500, 64, 2e-3, 0


def shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel in each direction (zero padding): (N, 1, 8, 8) -> same."""
    padded = F.pad(images, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def main() -> None:
    torch.manual_seed(SEED)
    x, y = digits(list(range(10)))
    train, test = stratified_split(y, 0.2, SEED)
    model = build_digit_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
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
    print(f"wrote {save_checkpoint(CLASSIFIER, model.state_dict(), config)}")


if __name__ == "__main__":
    main()
