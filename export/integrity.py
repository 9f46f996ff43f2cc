"""What an exported ONNX file is vouched for by, checked before anything runs it.

``gkd export`` records every file it wrote, with its SHA-256, in the ``export.json`` beside it. A file that sits in
such a folder under a name the manifest lists, but whose bytes are no longer the recorded ones (flipped on disk,
replaced, "optimised" in place), is not the model that was exported and verified: ``gkd eval``, ``gkd predict`` and
``gkd bench`` refuse it in one line instead of reporting its numbers (an mAP of 0 with exit status 0) as the
export's. A file outside any export folder is taken as it is: nothing vouches for it, and nothing contradicts it.
"""
from __future__ import annotations

from pathlib import Path

from gkd.core.errors import GkdError

__all__ = ["check_unchanged_since_export", "require_label_space"]


def check_unchanged_since_export(path: str | Path) -> None:
    """Refuse ``path`` when the ``export.json`` beside it lists a file of that name with another SHA-256.

    Raises:
        GkdError: the file changed since it was exported (or the manifest lists it and it is unreadable).
    """
    from gkd.core.io import file_sha256

    from .manifest import MANIFEST_NAME, load_export_manifest

    path = Path(path)
    if not (path.parent / MANIFEST_NAME).is_file():
        return
    try:
        manifest = load_export_manifest(path.parent)
    except GkdError:
        return  # an unreadable manifest vouches for nothing; the file is taken as it is
    listed = [f for f in manifest.files.values() if f.path.name == path.name]
    if not listed:
        return
    try:
        have = file_sha256(path)
    except OSError as exc:
        raise GkdError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if have != listed[0].sha256:
        raise GkdError(f"{path}: changed since gkd export wrote and verified it (sha256 {have[:12]}, "
                       f"{path.parent / MANIFEST_NAME} records {listed[0].sha256[:12]}); export again, or copy the "
                       f"file out of the export folder to use it as it is now")


def require_label_space(path: str | Path, classes, category_ids, what: str = "ONNX model") -> None:
    """Refuse a model that does not say which classes its labels are: its detections could not be checked against
    the data's categories, and an mAP in another label space is a wrong number (typically 0), not a measurement.

    Raises:
        GkdError: neither class names nor category ids are known.
    """
    if not classes and not category_ids:
        raise GkdError(f"{path}: this {what} carries no gkd metadata (class names, category ids), so what its labels "
                       f"mean cannot be checked; export it with gkd export (ONNX optimisers that drop "
                       f"metadata_props drop it too: copy the metadata over from the exported file)")
