"""Image paths and pixels, shared by conversion, validation and evaluation inputs.

``image_path``: the one path check. A dataset's image id (or a converted sample's image path)
names a file inside the image folder: absolute ids, ``..``, backslashes, NUL and empty parts
are refused lexically, and the resolved path (symbolic links followed) must stay inside the
folder, so ``../../somewhere/secret`` or ``/etc/ssl/cert.jpg`` never reaches a training file.

``decode``: a full, strict decode as XTuner's loader does it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class BadImagePath(ValueError):
    pass


def image_path(folder: Path, name: str) -> Path:
    """``folder / name`` when ``name`` is a relative path that stays inside ``folder``;
    BadImagePath (saying why) otherwise."""
    if not isinstance(name, str) or not name:
        raise BadImagePath("empty image id")
    if "\0" in name:
        raise BadImagePath("NUL in the image id")
    if "\\" in name:
        raise BadImagePath("backslash in the image id")
    parts = PurePosixPath(name)
    if parts.is_absolute() or name.startswith("/"):
        raise BadImagePath("absolute image path")
    if any(p in ("..", ".") for p in name.split("/")) or "" in name.split("/"):
        raise BadImagePath("'.', '..' or an empty part in the image id")
    if ":" in parts.parts[0] or name.startswith("~"):
        raise BadImagePath("drive or home prefix in the image id")
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise BadImagePath(f"resolves outside {folder} (symbolic link?)")
    return path


def decode(path: str) -> tuple[int, int] | str:
    """Full decode as XTuner's loader does; (width, height) or the error."""
    from PIL import Image, ImageFile

    # Strict whatever an imported library set process-wide (lmdeploy.vl.utils switches
    # LOAD_TRUNCATED_IMAGES on, which would let a cut JPEG pass as grey-padded pixels).
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as img:
            return img.convert("RGB").size
    except Exception as exc:  # noqa: BLE001 -- any decoder failure means XTuner would swap the sample
        return f"{type(exc).__name__}: {exc}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient
