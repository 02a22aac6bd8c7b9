"""A word-level tokenizer over 30 made-up words, shared by the transformers tests (no downloads)."""
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(30)]


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")
