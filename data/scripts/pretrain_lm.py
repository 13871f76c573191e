"""Pretrain the ci profile's language model (and its tokenizer) on the *source* text: CPython's reference
documentation, ``pydoc_data.topics`` (it ships with every CPython).

    python data/scripts/pretrain_lm.py     # ~12 min on a shared 2-core CPU; writes boftlab/pretrained/lm_pydoc/

1. a byte-level BPE tokenizer with 1 024 tokens is trained on the source text only;
2. a 4-layer Llama-architecture model (``boftlab.reproduce.llm.build_ci_lm``) is trained on 95 % of the source
   tokens; the last 5 % give the source held-out perplexity recorded in config.json, next to the zero-shot
   perplexity on the downstream held-out text (scikit-learn's dataset descriptions, never trained on here).
Weights are stored in float16 to keep the checkpoint small; they are loaded back as float32.
"""

import datetime
import platform

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from boftlab.reproduce.llm import (
    ARCH,
    CHECKPOINT,
    build_ci_lm,
    mean_nll,
    perplexity,
    source_text,
    target_text,
    windows,
)
from boftlab.reproduce.data import batch_indices
from boftlab.reproduce.pretrained import save_pretrained

STEPS, BATCH, CONTEXT, LR, SEED = 600, 16, 64, 3e-3, 0


def train_tokenizer(text: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ARCH["vocab_size"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text], trainer)  # byte-level: any text encodes, nothing is unknown
    return tokenizer


def main() -> None:
    torch.manual_seed(SEED)
    text = source_text()
    tokenizer = train_tokenizer(text)
    tokens = torch.tensor(tokenizer.encode(text).ids)
    cut = int(len(tokens) * 0.95)
    train, held_out = windows(tokens[:cut], CONTEXT), windows(tokens[cut:], CONTEXT)
    print(f"source: {len(text):,} characters, {len(tokens):,} tokens; {len(train)} training windows")
    model = build_ci_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=STEPS, pct_start=0.05)
    for step in range(STEPS):
        loss = mean_nll(model, train[batch_indices(len(train), BATCH, step, SEED)])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model.eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        source_ppl = perplexity(model, held_out, cpu)
        target = torch.tensor(tokenizer.encode(target_text()).ids)
        target_ppl = perplexity(model, windows(target[int(len(target) * 0.8):], CONTEXT), cpu)
    print(f"source held-out perplexity {source_ppl:.2f}; downstream held-out perplexity (zero-shot) {target_ppl:.2f}")
    config = {
        "architecture": {"class": "transformers LlamaForCausalLM", **ARCH},
        "tokenizer": f"byte-level BPE, {ARCH['vocab_size']} tokens, trained on the source text (tokenizer.json)",
        "source_task": "next-token prediction on pydoc_data.topics.topics (CPython reference documentation), "
                       "topics joined in key order; first 95 % of tokens train, last 5 % held out",
        "source_tokens": len(tokens),
        "source_heldout_perplexity": round(source_ppl, 3),
        "downstream_zero_shot_perplexity": round(target_ppl, 3),
        "training": f"{STEPS} AdamW steps of {BATCH} x {CONTEXT} tokens, one-cycle lr {LR}, weight decay 0.1, "
                    f"grad clip 1.0, seed {SEED}",
        "stored_dtype": "float16",
        "script": "data/scripts/pretrain_lm.py",
        "made": f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {platform.machine()} CPU, "
                f"Python {platform.python_version()}",
    }
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    path = save_pretrained(CHECKPOINT, state, config, dtype=torch.float16)
    tokenizer.save(str(path / "tokenizer.json"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
