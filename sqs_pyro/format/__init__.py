"""The ``.sqs`` file: the container (:mod:`.container`), its entropy codecs (:mod:`.codecs`),
the optional posterior section's coding (:mod:`.posterior`) and atomic writes (:mod:`.atomic`)."""
from sqs_pyro.format.container import load_compressed, read_header, save_compressed

__all__ = ["load_compressed", "read_header", "save_compressed"]
