"""Tiny transformers shared by the transformers tests (no downloads): a word-level tokenizer over 30
made-up words, and seeded tiny Llama and BERT models. ``setup.cfg`` puts this folder on the path."""
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(30)]


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")


def tiny_llama(layers: int = 2, tied: bool = True, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 40-token, 16-wide Llama with ``layers`` blocks (grouped-query attention: 2 heads, 1 KV head)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg)


def tiny_bert(vocab_size: int = 40) -> transformers.BertModel:
    """A 16-wide, 2-layer BERT encoder."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(cfg)
