"""A ``.sqs`` file's transformers model written out as a plain transformers folder
(``config.json``, ``model.safetensors`` of the decompressed weights, ``generation_config.json``
for generative models, optionally the tokenizer) that ``transformers`` loads without sqs-pyro."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sqs_pyro.errors import SQSInputError
from sqs_pyro.format.atomic import FILE_MODE, fsync_folder
from sqs_pyro.format.container import read_header
from sqs_pyro.hf.loading import load_transformers, resolve_model_path


def export_transformers(sqs_path: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False,
                        tokenizer: str | os.PathLike | None = None) -> Path:
    """Write the transformers model of ``sqs_path`` (as :func:`load_transformers` rebuilds it, so
    ``from_pretrained(out_dir)`` gives the same outputs) into ``out_dir`` and return ``out_dir``.

    Every input is checked before any work: the file must exist and hold a transformers model,
    ``out_dir`` must not exist, be an empty folder, or (with ``force``) be a folder holding
    neither input, and ``tokenizer`` (a tokenizer or model folder, a ``.gguf`` file or an
    installed package name) must load. The folder is written beside ``out_dir`` under a temporary
    name and renamed into place, so ``out_dir`` never holds a partial export; with ``force`` a
    previous ``out_dir`` is removed only after the new one is complete."""
    sqs_path, out_dir = Path(sqs_path), Path(os.path.abspath(out_dir))  # "." and ".." get a name and a parent
    if not sqs_path.is_file():
        raise SQSInputError(f"no such file: {sqs_path}")
    hints = read_header(sqs_path).get("architecture", {})
    if not isinstance(hints, dict) or "transformers_config" not in hints:
        raise SQSInputError(f"{sqs_path} holds no transformers model (no transformers_config in its header); "
                            "only files written from a transformers model (compress --hf) can be exported")
    _check_target(out_dir, force, [sqs_path] + ([Path(tokenizer)] if tokenizer is not None else []))
    tok = _load_tokenizer(tokenizer) if tokenizer is not None else None
    model = load_transformers(sqs_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)  # safetensors (the default since transformers 4.35); a tied head saved once
        if tok is not None:
            tok.save_pretrained(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())
                os.chmod(f, FILE_MODE)  # safetensors writes through a 0o600 temporary file
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide the export from other users
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_target(out_dir: Path, force: bool, inputs: list[Path]) -> None:
    if not out_dir.name:
        raise SQSInputError(f"cannot export into the file system's root {out_dir}")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise SQSInputError(f"{out_dir} exists and is a link or not a folder")
    cwd = Path.cwd().resolve()
    if out_dir.exists() and (out_dir.resolve() == cwd or out_dir.resolve() in cwd.parents):
        raise SQSInputError(f"{out_dir} is or holds the current folder, which the export would replace; "
                            "export into a new folder")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not force:
        raise SQSInputError(f"{out_dir} exists and is not empty (pass --force, or force=True, to replace it)")
    target = out_dir.resolve()
    for path in inputs:
        if path.exists() and (path.resolve() == target or target in path.resolve().parents):
            raise SQSInputError(f"{out_dir} holds the input {path}; --force would delete it, export elsewhere")


def _load_tokenizer(path: str | os.PathLike):
    """The tokenizer in a tokenizer folder, a model folder, a ``.gguf`` file or an installed package."""
    from transformers import AutoTokenizer

    try:
        folder, gguf_file = resolve_model_path(path)
    except SQSInputError:
        if not Path(path).is_dir():
            raise SQSInputError(f"tokenizer {path}: no such folder, .gguf file or installed package") from None
        folder, gguf_file = Path(path), None  # a folder of tokenizer files without config.json
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for what it cannot read
        raise SQSInputError(f"tokenizer {path}: cannot load a tokenizer from it ({exc})") from exc


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; a previous ``out_dir`` is moved aside first and removed
    after the rename (put back if the rename fails)."""
    trash = None
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
        os.rename(out_dir, trash / out_dir.name)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if trash is not None:
            os.rename(trash / out_dir.name, out_dir)
            trash.rmdir()
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    fsync_folder(out_dir.parent)
