"""Hugging Face transformers as SQS inputs and outputs: offline loading, task wrappers,
perplexity, and transformers models rebuilt from ``.sqs`` files. ``transformers`` itself is
imported only when a model is loaded."""
from sqs_pyro.hf.export import export_transformers
from sqs_pyro.hf.loading import (SMOLLM_GGUF, load_minilm, load_model, load_pretrained, load_smollm,
                                 load_transformers, resolve_model_path)
from sqs_pyro.hf.perplexity import perplexity, text_windows, token_windows
from sqs_pyro.hf.wrappers import CausalLM, SentenceClassifier, encode_sentences, fine_tune

__all__ = ["SMOLLM_GGUF", "CausalLM", "SentenceClassifier", "encode_sentences", "export_transformers", "fine_tune",
           "load_minilm", "load_model", "load_pretrained", "load_smollm", "load_transformers", "perplexity",
           "resolve_model_path", "text_windows", "token_windows"]
