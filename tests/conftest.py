"""Shared fixtures: tiny random models of every supported architecture, built from configs,
with a small byte-level BPE tokenizer trained on the fly. Everything is offline and fast."""

from __future__ import annotations

import importlib
import random
from pathlib import Path

import pytest
import torch
import transformers as T

from tensorpress.models import LoadedModel, adapter_for
from tensorpress.progress import progress_bars

WORDS = (
    "the model compresses weights into parts of quantized codes scales and zeros while the "
    "engine walks every block in order and measures perplexity against the reference on text "
    "windows drawn from a file with a fixed seed so that results repeat exactly"
).split()


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path_factory, monkeypatch):
    """The CLI records runs under $TENSORPRESS_RUNS (default ./runs): tests record into a temporary folder"""
    monkeypatch.setenv("TENSORPRESS_RUNS", str(tmp_path_factory.getbasetemp() / "runs"))
    # and cache reference answers there too, not in the user's cache folder
    tasks_mod = importlib.import_module("tensorpress.eval.tasks")
    monkeypatch.setattr(tasks_mod, "answers_cache_dir", lambda: tmp_path_factory.getbasetemp() / "answers")


def sample_text(n_words: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
    return "\n".join(lines)


def make_tokenizer(kind: str = "causal") -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"] if kind == "causal" else ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sample_text(2000, seed=1)], trainer)
    if kind == "causal":
        return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                     sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")


VOCAB = 320


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB)
    if arch == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **common)
    if arch == "mistral":
        return T.MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **common)
    if arch == "qwen2":
        return T.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **common)
    if arch == "qwen3":
        return T.Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1,
                             eos_token_id=2, **common)
    if arch == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2, **common)
    if arch == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, **common)
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **common)
    if arch in ("gemma", "gemma2", "gemma3_text"):
        cls = {"gemma": T.GemmaConfig, "gemma2": T.Gemma2Config, "gemma3_text": T.Gemma3TextConfig}[arch]
        extra = {} if arch == "gemma" else {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
        return cls(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, **extra, **common)
    if arch in ("granite", "olmo2"):
        cls = T.GraniteConfig if arch == "granite" else T.Olmo2Config
        extra = {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 4.0} if arch == "granite" else {}
        return cls(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra, **common)
    if arch == "phi3":
        return T.Phi3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, **common)
    if arch in ("cohere", "stablelm"):  # Cohere: parallel attention and FFN; StableLM: as its config says
        cls = T.CohereConfig if arch == "cohere" else T.StableLmConfig
        return cls(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common)
    if arch in MOE_ARCHS:  # 4 experts, 2 per token; Qwen2-MoE also a shared expert
        moe = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_experts_per_tok=2)
        if arch == "mixtral":
            return T.MixtralConfig(intermediate_size=96, num_local_experts=4, **moe, **common)
        if arch == "olmoe":
            return T.OlmoeConfig(intermediate_size=96, num_experts=4, **moe, **common)
        if arch == "qwen3_moe":
            return T.Qwen3MoeConfig(intermediate_size=160, moe_intermediate_size=96, num_experts=4, head_dim=16, **moe, **common)
        return T.Qwen2MoeConfig(intermediate_size=160, moe_intermediate_size=96, shared_expert_intermediate_size=128,
                                num_experts=4, **moe, **common)
    if arch == "bert":
        return T.BertConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, **common)
    raise ValueError(arch)


MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
CAUSAL_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "opt", "gpt_neox", "gemma", "gemma2", "gemma3_text", "granite", "olmo2",
                "phi3", "cohere", "stablelm", *MOE_ARCHS]
ALL_ARCHS = CAUSAL_ARCHS + ["bert"]


def tiny_model(arch: str, seed: int = 0) -> LoadedModel:
    config = tiny_config(arch)
    torch.manual_seed(seed)
    cls = T.AutoModel if arch == "bert" else T.AutoModelForCausalLM
    model = cls.from_config(config).eval()
    tokenizer = make_tokenizer("encoder" if arch == "bert" else "causal")
    return LoadedModel(model, tokenizer, adapter_for(config.model_type), f"tiny-{arch}")


def wide_model(arch: str = "llama", scale: float = 1.0) -> LoadedModel:
    """A 2-block model 256 wide (FFN 512), so every linear splits into llama.cpp's 256-weight
    K-quant blocks; ``scale`` multiplies the 2-D weights (distributions far from uniform)."""
    if arch == "llama":
        config = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, vocab_size=VOCAB)
    elif arch == "gpt2":
        config = T.GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=256, vocab_size=VOCAB, bos_token_id=1,
                              eos_token_id=2)
    elif arch == "gpt_neox":
        config = T.GPTNeoXConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=256, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(scale)
    return LoadedModel(model, make_tokenizer(), adapter_for(config.model_type), f"wide-{arch}")


@pytest.fixture(autouse=True)
def _no_progress_bars():
    with progress_bars(False):
        yield


@pytest.fixture(scope="session")
def text_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    path.write_text(sample_text(), encoding="utf-8")
    return path


@pytest.fixture
def tiny_llama() -> LoadedModel:
    return tiny_model("llama")


def save_hf_dir(lm: LoadedModel, path: Path) -> Path:
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
