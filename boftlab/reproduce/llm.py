"""LLM domain: adapt a pretrained causal language model to a different body of text; metric = held-out perplexity.

ci:    a 4-layer Llama-architecture model (width 128, byte-level BPE of 1 024 tokens) that
       ``data/scripts/pretrain_lm.py`` pretrained on Python's own reference documentation (``pydoc_data.topics``,
       shipped with CPython), adapted to scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``,
       shipped with scikit-learn): the first 80 % of that text is training data — its last eighth held back as the
       validation split — and the last 20 % is the test set. CPU, minutes.
colab: ``Qwen/Qwen2.5-0.5B`` adapted to Alpaca instructions (``tatsu-lab/alpaca``), perplexity of held-out
       responses (validation and test instructions disjoint from the training ones), on a GPU; ``four_bit`` turns
       these settings into the BOFT paper's Llama-2-7B with its weights in 4 bits (bitsandbytes nf4, QLoRA-style),
       which a free T4 holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..base_layers import keep_unpacked
from .runner import (
    Domain,
    Method,
    Task,
    adapter_methods,
    autocast_dtype,
    batch_indices,
    fitting,
    hide_weight_loading_bars,
    load_pretrained,
    pretrained_dir,
    transformer_activation_bytes,
)

CHECKPOINT = "lm_pydoc"


@dataclass(frozen=True)
class Settings:
    steps: int
    batch_size: int
    context: int  # tokens per training sequence
    eval_every: int
    seed: int = 0
    train_examples: int | None = None  # colab: Alpaca examples used for training / validation / test
    validation_examples: int | None = None
    test_examples: int | None = None
    mixed_precision: bool = False  # autocast: bf16 where the GPU has it, else fp16 (runner.autocast_dtype)
    gradient_checkpointing: bool = False
    model: str = "Qwen/Qwen2.5-0.5B"  # colab: the hub model adapted
    load_in_4bit: bool = False  # colab: its linear layers' weights in 4 bits (bitsandbytes nf4), frozen


SETTINGS = {
    # 50 steps (150 before issue 24): the full protocol trains every method 5 times, and the committed run had to
    # fit a 2-core machine shared with other jobs (load ≈ 10) in under an hour
    "ci": Settings(steps=50, batch_size=8, context=64, eval_every=10),
    "colab": Settings(steps=300, batch_size=8, context=256, eval_every=50, train_examples=4000,
                      validation_examples=300, test_examples=300, mixed_precision=True, gradient_checkpointing=True),
}
#: the share of the ci training tokens (their end) held back for validation
VALIDATION_FRACTION = 0.125

#: the 4-bit option's model: the LLM the BOFT paper fine-tunes (gated on the hub: accept Meta's licence there first)
FOUR_BIT_MODEL = "meta-llama/Llama-2-7b-hf"


def four_bit(s: Settings, model: str = FOUR_BIT_MODEL) -> Settings:
    """The colab settings ``s`` for a larger LLM loaded with its linear layers' weights in 4 bits (bitsandbytes nf4,
    QLoRA-style): ``model`` (default the BOFT paper's Llama-2-7B, ≈ 3.9 GB in 4 bits), 100 steps of batch 4 and 100
    held-out instructions, so that each method takes minutes, not an hour, on a T4. The adapters train on the frozen
    4-bit weights; full fine-tuning, which would train those weights, is a skipped row."""
    if s.train_examples is None:
        raise ValueError(
            "four_bit: these are the ci profile's settings (a local 0.8 M-parameter model on the CPU); the 4-bit "
            "option loads a hub model onto a GPU: pass the colab profile's settings, llm.settings('colab')")
    return replace(s, model=model, load_in_4bit=True, steps=100, batch_size=4, eval_every=25, validation_examples=100,
                   test_examples=100)


# --- text that ships offline --------------------------------------------------------------------------------------------
def source_text() -> str:
    """The pretraining corpus: CPython's reference documentation topics (``pydoc_data.topics``), in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def target_text() -> str:
    """The downstream corpus: scikit-learn's dataset descriptions (reStructuredText), files in name order."""
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    return "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.rst")))


# --- the ci model -----------------------------------------------------------------------------------------------------
ARCH = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)


def build_ci_lm(**overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**ARCH, **overrides}))


def load_ci_lm():
    """(pretrained LlamaForCausalLM, its ``tokenizers.Tokenizer``, checkpoint config)."""
    from tokenizers import Tokenizer

    state, config = load_pretrained(CHECKPOINT)
    model = build_ci_lm()
    missing, unexpected = model.load_state_dict(state, strict=False)  # the tied output embedding is stored once
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise ValueError(f"checkpoint {CHECKPOINT!r} does not fit build_ci_lm(): missing {missing}, unexpected "
                         f"{unexpected}")
    model.tie_weights()
    tokenizer = Tokenizer.from_file(str(pretrained_dir(CHECKPOINT) / "tokenizer.json"))
    return model, tokenizer, config


def windows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """(n,) token stream -> (n // (context+1), context+1) non-overlapping windows (inputs + next-token targets)."""
    n = len(tokens) // (context + 1)
    return tokens[: n * (context + 1)].reshape(n, context + 1)


def mean_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """batch: (B, T+1) token ids -> mean next-token negative log-likelihood over B·T predictions."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def perplexity(model: nn.Module, held_out: torch.Tensor, device: torch.device, batch_size: int = 32) -> float:
    """exp of the mean NLL over all windows of ``held_out``: (N, T+1)."""
    total, count = 0.0, 0
    for batch in held_out.split(batch_size):
        total += mean_nll(model, batch.to(device)).item() * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


# --- methods ----------------------------------------------------------------------------------------------------------
CI_LINEARS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def ci_methods() -> list[Method]:
    """Adapter budgets matched around 30 k parameters where the structure allows (LoRA r=4: 34 816;
    OFT b=16: 30 720; BOFT b=8 m=2: 33 280; BOFT b=4 m=4: 29 184)."""
    return [
        Method("full fine-tuning", "full", lr=5e-4),
        *adapter_methods(CI_LINEARS, 3e-3, lora_rank=4, oft_block_size=16, flora_ranks=4),
    ]


COLAB_LINEARS = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"


def colab_methods() -> list[Method]:
    return [
        Method("full fine-tuning", "full", lr=1e-5),
        *adapter_methods(COLAB_LINEARS, 3e-4, lora_rank=8, oft_block_size=32, flora_ranks=8),
    ]


# --- tasks ------------------------------------------------------------------------------------------------------------
def ci_task(s: Settings) -> tuple[Task, str]:
    model, tokenizer, config = load_ci_lm()
    tokens = torch.tensor(tokenizer.encode(target_text()).ids)
    cut = int(len(tokens) * 0.8)
    val_cut = int(cut * (1 - VALIDATION_FRACTION))
    train, val = windows(tokens[:val_cut], s.context), windows(tokens[val_cut:cut], s.context)
    held_out = windows(tokens[cut:], s.context)
    device = torch.device("cpu")

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        return mean_nll(m, train[batch_indices(len(train), s.batch_size, step, s.seed)].to(device))

    task = Task(model, [], loss, lambda m: perplexity(m, val, device), s.steps, s.eval_every, device, s.seed,
                test=lambda m: perplexity(m, held_out, device), setting=f"batch {s.batch_size} × {s.context} tokens")
    description = (
        f"Pretrained model: a {sum(p.numel() for p in model.parameters()):,}-parameter Llama-architecture LM "
        f"(`boftlab/pretrained/{CHECKPOINT}`) trained by `data/scripts/pretrain_lm.py` on CPython's reference "
        f"documentation (`pydoc_data.topics`; source held-out perplexity {config['source_heldout_perplexity']:.1f}). "
        f"Downstream: scikit-learn's dataset descriptions (`sklearn/datasets/descr/*.rst`), {val_cut:,} training / "
        f"{cut - val_cut:,} validation / {len(tokens) - cut:,} test tokens (the first 80 % is training data, its last "
        f"eighth validates; the last 20 % tests). {s.steps} steps of {s.batch_size} × {s.context} tokens; curves: "
        "validation perplexity; table: test perplexity (lower is better)."
    )
    return task, description


ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def alpaca_example(row: dict, tokenizer, context: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one Alpaca row; the prompt's labels are -100 so only the response is scored."""
    input_block = f"### Input:\n{row['input']}\n\n" if row["input"] else ""
    prompt = tokenizer(ALPACA_PROMPT.format(instruction=row["instruction"], input_block=input_block))["input_ids"]
    response = tokenizer(row["output"] + tokenizer.eos_token)["input_ids"]
    ids = (prompt + response)[:context]
    return ids, ([-100] * len(prompt) + response)[:context]


def pad(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: (input ids, attention mask, labels), each (B, T)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in examples])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in examples])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in examples])
    return ids, mask, labels


def load_causal_lm(name: str, load_in_4bit: bool, device: torch.device) -> nn.Module:
    """The hub (or local) causal LM ``name`` ready to train: fp32 weights on the CPU (transformers 5 loads bf16 by
    default; the optimizer updates fp32, autocast computes in 16 bits) — or, with ``load_in_4bit``, every linear
    layer's weight in 4 bits (bitsandbytes nf4, quantized as it loads onto ``device``, computing in
    ``autocast_dtype(device)``) and the rest in that dtype, all frozen. That model stays on ``device``: a 4-bit
    weight is quantized where it is placed, and never repacked for CPU inference (``base_layers.keep_unpacked``)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if load_in_4bit:
        compute = autocast_dtype(device) or torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(name, quantization_config=quantization, dtype=compute,
                                                     device_map={"": device})
        keep_unpacked(model)  # a baseline evaluation on a CPU must not repack the weights (no input gradient after)
    else:
        model = AutoModelForCausalLM.from_pretrained(name).float()
    model.config.use_cache = False  # no key/value cache while training (it conflicts with gradient checkpointing)
    return model


def colab_task(s: Settings) -> tuple[Task, str]:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    hide_weight_loading_bars()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = s.model
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = load_causal_lm(name, s.load_in_4bit, device)
    rows = load_dataset("tatsu-lab/alpaca", split="train").shuffle(seed=s.seed)
    rows = rows.select(range(s.train_examples + s.validation_examples + s.test_examples))
    examples = [alpaca_example(row, tokenizer, s.context) for row in rows]
    val_end = s.train_examples + s.validation_examples
    train, val, test = examples[: s.train_examples], examples[s.train_examples:val_end], examples[val_end:]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def response_nll(m: nn.Module, batch: list) -> tuple[torch.Tensor, int]:
        ids, mask, labels = (t.to(device) for t in pad(batch, pad_id))
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return total, int((targets != -100).sum())

    def loss(m: nn.Module, step: int) -> torch.Tensor:
        total, count = response_nll(m, [train[i] for i in batch_indices(len(train), s.batch_size, step, s.seed)])
        return total / count

    def response_perplexity(examples: list) -> Callable[[nn.Module], float]:
        def evaluate(m: nn.Module) -> float:
            sums = [response_nll(m, examples[i:i + s.batch_size]) for i in range(0, len(examples), s.batch_size)]
            return math.exp(sum(t.item() for t, _ in sums) / sum(c for _, c in sums))

        return evaluate

    c = model.config
    activations = transformer_activation_bytes(s.batch_size, s.context, c.hidden_size, c.num_hidden_layers,
                                               c.intermediate_size, c.num_attention_heads, vocab=c.vocab_size,
                                               checkpointed=s.gradient_checkpointing)
    task = Task(model, [], loss, response_perplexity(val), s.steps, s.eval_every, device, s.seed,
                test=response_perplexity(test), **fitting(s, device), activation_bytes=activations,
                setting=f"batch {s.batch_size} × up to {s.context} tokens")
    weights = " (linear layers' weights in 4 bits, bitsandbytes nf4)" if s.load_in_4bit else ""
    description = (
        f"Pretrained model: {name}{weights}. Downstream: Alpaca (tatsu-lab/alpaca), {s.train_examples} training / "
        f"{s.validation_examples} validation / {s.test_examples} test instructions, up to {s.context} tokens; loss "
        f"on the responses only. {s.steps} steps of batch {s.batch_size}; curves: validation response perplexity; "
        "table: test response perplexity (lower is better)."
    )
    return task, description


DOMAIN = Domain(
    name="llm", label="LLM", settings_by_profile=SETTINGS,
    tasks={"ci": ci_task, "colab": colab_task}, methods={"ci": ci_methods, "colab": colab_methods},
    titles={"ci": "LLM: Python docs → scikit-learn dataset docs", "colab": "Hub LLM → Alpaca instructions"},
    metrics={"ci": "test perplexity", "colab": "test perplexity"}, higher_is_better=False,
    validation_metrics={"ci": "validation perplexity", "colab": "validation perplexity"},
    margins={"ci": 2.0, "colab": 0.2},  # perplexity units: ≈ 2 % of the ci LoRA's ≈ 90, of Qwen's ≈ 5 on Alpaca
)
settings, make_task, profile_methods, report, run, run_seeds, run_protocol, figures = (
    DOMAIN.settings, DOMAIN.make_task, DOMAIN.profile_methods, DOMAIN.report, DOMAIN.run, DOMAIN.run_seeds,
    DOMAIN.run_protocol, DOMAIN.figures)
