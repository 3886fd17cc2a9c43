"""Reading a user's image files: every image as the RGB picture a viewer shows, or a clear reason why not.

Shared by training (`distill.training.datamodule`), `distill predict` and the teacher cache, so that the
three can never read a file differently.

- Modes PIL's `convert("RGB")` gets wrong are converted by their range: 16-bit greyscale
  (`I;16`, and `I` holding 0..65535) is scaled to 8 bits instead of clipped to white; float
  images (`F`) in [0, 1] are scaled by 255, in [0, 255] kept; other float ranges are refused
  (a guess would train on the wrong picture). Images with transparency are composited over
  white, as viewers show them, instead of dropping the alpha channel (a black glyph on a
  transparent black background would turn black on black). EXIF orientation is applied.
- Anything that cannot be decoded (truncated, not an image, over PIL's decompression-bomb
  limit, unsupported mode) raises `UnreadableImage` with a one-line reason.
- Hidden files and folders (`.ipynb_checkpoints/`, `.thumbs/`, macOS `._name.jpg`) are not
  images or classes, as in every ImageFolder-style tool users know.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import IO, Any, Optional

import numpy as np
from PIL import ExifTags, Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

from distill.common.errors import UserError

__all__ = ["UnreadableImage", "TooManyPixels", "load_image", "is_hidden", "is_image_file", "list_images", "find_classes",
           "display_name", "IMG_EXTENSIONS", "left_out"]


MAX_ASPECT = 100  # a longer side over 100x the shorter: not a picture to classify (and a memory bomb when resized)


class UnreadableImage(Exception):
    """A file that is not a readable image; the message is the one-line reason."""


class TooManyPixels(UnreadableImage):
    """An image whose header declares more pixels than the caller accepts (checked before decoding)."""


def load_image(path: str | os.PathLike | IO[bytes], max_pixels: Optional[int] = None) -> Image.Image:
    """The image at `path` (or in a binary file object) as RGB (see the module docstring for odd modes);
    `UnreadableImage` if it is not one, `TooManyPixels` if its header declares over `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # over the limit but under 2x: read it
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise TooManyPixels(f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
                if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
                    raise UnreadableImage(f"{width}x{height} pixels: an aspect ratio over {MAX_ASPECT}:1 (resizing "
                                          "its short side to the model's input would take gigabytes)")
                image.load()
                image = _upright(image)
                return _to_rgb(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"larger than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels "
                              "(PIL.Image.MAX_IMAGE_PIXELS); downscale it") from err
    except Exception as err:  # noqa: BLE001 - a file PIL cannot decode fails in many ways (OSError, SyntaxError,
        # struct.error, EOFError, ValueError...): whatever the decoder raised, this file is not a readable image
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        text = re.sub(r" ?<_io\.\w+ object at 0x[0-9a-f]+>", "", text)[:120]  # PIL names a BytesIO by its repr
        raise UnreadableImage(f"{type(err).__name__}: {text}" if text else type(err).__name__) from err


def _upright(image: Image.Image) -> Image.Image:
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
            return image  # stored upright: no copy (exif_transpose would copy every image)
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels are still fine, keep them as stored
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image).astype(np.float64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise UnreadableImage(f"mode {mode} with values in [{pixels.min():g}, {pixels.max():g}], expected 0..65535")
        return _grey_to_rgb(pixels / 257.0)  # 65535 -> 255
    if mode == "F":
        pixels = np.asarray(image).astype(np.float64)
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if not np.isfinite(pixels).all() or low < 0 or high > 255:
            raise UnreadableImage(f"float image with values in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
        return _grey_to_rgb(pixels * 255.0 if high <= 1.0 else pixels)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _grey_to_rgb(pixels: np.ndarray) -> Image.Image:
    grey = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    return grey.convert("RGB")


def is_hidden(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether any part of `path` below `root` starts with a dot."""
    parts = Path(os.path.relpath(path, root)).parts
    return any(part.startswith(".") for part in parts if part not in (".", ".."))


def is_image_file(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """An image by its extension, and not hidden below `root`."""
    return str(path).lower().endswith(IMG_EXTENSIONS) and not is_hidden(path, root)


def list_images(folder: str | os.PathLike, others: list[Path] | None = None) -> list[Path]:
    """Every image file below `folder` (recursively, hidden entries skipped), sorted; `others`, when
    given, receives the files left out for their extension (to tell the user, not to drop them silently).

    Symbolic links to folders are followed, each real folder once, never to a folder above
    `folder`: a link back up the tree (a loop) would otherwise list the same images again and
    again, and other classes' images under this one.
    """
    folder = Path(folder)
    top = os.path.realpath(folder)
    found, visited = [], {top}
    for current, dirs, files in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(current, name))
            if real not in visited and not top.startswith(real + os.sep):  # not seen, not a folder above this one
                visited.add(real)
                kept.append(name)
        dirs[:] = kept
        visible = [Path(current) / f for f in files if not f.startswith(".")]
        found += [f for f in visible if f.name.lower().endswith(IMG_EXTENSIONS)]
        if others is not None:
            others += [f for f in visible if not f.name.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def left_out(others: list[Path], folder: str | os.PathLike) -> str:
    """The sentence naming files `list_images` left out for their extension (count, kinds, an example)."""
    kinds = sorted({f.suffix.lower() or f.name for f in others})
    return (f"left out {len(others)} file(s) under '{folder}' that are not images by their extension "
            f"({', '.join(kinds[:5])}; e.g. '{sorted(others)[0]}'); accepted: {' '.join(IMG_EXTENSIONS)}")


def find_classes(folder: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """Class folders of a split (hidden ones skipped), sorted, and their indices; torchvision's contract."""
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {folder}.")
    return classes, {name: index for index, name in enumerate(classes)}


def display_name(name: str) -> str:
    """A folder name as text every writer accepts: undecodable bytes (a non-UTF-8 name) as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class SkipsUnreadable:
    """For a dataset of images: `__getitem__` reads item `index`, or with `bad_images="skip"` the next readable
    one (a warning names each skipped image and counts them per process); `"error"` stops, naming it.

    The dataset sets `bad_images`, `skipped` and `transform`, and has `_read(index) -> (image, target)`
    (raising `UnreadableImage`) and `_describe(index) -> str` ("image 'path'").
    """

    bad_images: str = "skip"
    skipped: int = 0
    transform: Any = None

    def _read(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        count = len(self)  # type: ignore[arg-type]
        for attempt in range(min(count, 100)):
            row = (index + attempt) % count
            try:
                image, target = self._read(row)
            except UnreadableImage as err:
                if self.bad_images == "error":
                    raise UserError(f"data: cannot read {self._describe(row)} ({err}); fix or remove it, "
                                    "or set data.bad_images=skip") from err
                self.skipped += 1
                warnings.warn(f"data: skipped unreadable {self._describe(row)} ({err}); {self.skipped} skipped so far "
                              "in this process", stacklevel=2)
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise UserError(f"data: no readable image among 100 from {self._describe(index)} on; check the dataset")
