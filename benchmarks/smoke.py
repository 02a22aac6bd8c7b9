"""The ``--smoke`` flag every benchmark takes: tiny data, one step, results in a temporary folder, so that
``tests/test_benchmarks_smoke.py`` runs each benchmark in CI and a change that breaks one fails there."""
import argparse
import tempfile
from pathlib import Path


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--smoke`` (a CI check, not a measurement) to a benchmark's parser."""
    parser.add_argument("--smoke", action="store_true",
                        help="CI check: tiny data, one step, results written to a temporary folder")


def smoke_folder() -> Path:
    """A fresh temporary folder for a smoke run's outputs (left for the OS to clean, like any temp file)."""
    return Path(tempfile.mkdtemp(prefix="sqs-smoke-"))


# Tiny stand-ins for the language-model assets (SmolLM2, MiniLM, Jane Austen, movie reviews) that CI lacks:
# a character-level tokenizer, random tiny models, and made-up text with some structure to learn.
LETTERS = "abcdefghij ."


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over ``LETTERS`` (pad, unknown, CLS and SEP tokens too)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate([*specials, *LETTERS])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_llama():
    """A random 2-layer, 32-wide ``LlamaForCausalLM`` over the character vocabulary (tied embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4 + len(LETTERS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_bert():
    """A random 2-layer, 32-wide ``BertModel`` over the character vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=4 + len(LETTERS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def made_up_text(words: int, seed: int) -> str:
    """``words`` seeded words of 1-4 letters from ``LETTERS``, a sentence every 8 words."""
    import random

    rng = random.Random(seed)
    out = [("".join(rng.choice(LETTERS[:10]) for _ in range(rng.randint(1, 4)))) for _ in range(words)]
    return " ".join(w + ("." if i % 8 == 7 else "") for i, w in enumerate(out))


def made_up_sentences(n: int) -> tuple[list[str], "torch.Tensor"]:
    """``n`` short sentences and a label each: 1 when the sentence has at least as many a's as b's."""
    import torch

    sentences = [made_up_text(6, seed) for seed in range(n)]
    return sentences, torch.tensor([int(s.count("a") >= s.count("b")) for s in sentences])


def made_up_novels() -> dict[str, str]:
    """Three made-up "novels" under Jane Austen's names, *Persuasion* (the held-out one) among them."""
    return {name: made_up_text(600, i) for i, name in enumerate(("emma", "northangerabbey", "persuasion"))}
