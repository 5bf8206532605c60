"""Pictures people would rather look at than read: keypoint grids and loss curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipeline.store.io import write_atomic

# Distinct colours for up to 32 keypoints (RGB), cycled beyond.
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
     [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40],
     [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]],
    dtype=np.uint8,
)


def colour(k: int) -> tuple[int, int, int]:
    c = _PALETTE[k % len(_PALETTE)]
    return int(c[0]), int(c[1]), int(c[2])


def draw_keypoints(img: np.ndarray, kps: np.ndarray, *, links: Optional[np.ndarray] = None, radius: int = 2,
                   gt: Optional[np.ndarray] = None, scale: int = 2, link_threshold: float = 0.1) -> np.ndarray:
    """Overlay keypoints (K, 2) pixels (x, y) on an RGB uint8 image, enlarged ``scale`` times.

    ``links`` (K, K) edge weights draw the learned skeleton (edges above ``link_threshold`` x max);
    ``gt`` (J, 2) draws ground truth as white crosses. Returns RGB uint8.
    """
    import cv2

    out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST).copy()
    p = (np.asarray(kps, dtype=np.float64) + 0.5) * scale - 0.5

    def pt(xy):
        return int(round(xy[0])), int(round(xy[1]))

    if links is not None and len(p) > 1:
        w = np.asarray(links, dtype=np.float64)
        wmax = float(np.nanmax(np.triu(w, 1))) or 1.0
        for i in range(len(p)):
            for j in range(i + 1, len(p)):
                if w[i, j] > link_threshold * wmax:
                    t = max(1, int(round(2 * w[i, j] / wmax)))
                    cv2.line(out, pt(p[i]), pt(p[j]), (255, 255, 255), t, cv2.LINE_AA)
    if gt is not None:
        for xy in (np.asarray(gt, dtype=np.float64) + 0.5) * scale - 0.5:
            if np.isfinite(xy).all():
                cv2.drawMarker(out, pt(xy), (255, 255, 255), cv2.MARKER_CROSS, 3 * scale, 1)
    for k, xy in enumerate(p):
        if np.isfinite(xy).all():
            cv2.circle(out, pt(xy), radius * scale // 2 + 1, colour(k), -1, cv2.LINE_AA)
    return out


def grid(images: Sequence[np.ndarray], cols: int = 8, pad: int = 2) -> np.ndarray:
    """Tile equally sized RGB images into one picture (white padding)."""
    if not images:
        raise ValueError("no images to tile")
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    cols = min(cols, len(images))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


def save_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    write_atomic(Path(path), buf.tobytes())


def loss_curve(metrics_jsonl: Path, out_png: Path, keys: Optional[Sequence[str]] = None, title: str = "") -> None:
    """Plot every numeric series of a metrics.jsonl (one JSON object per line, with 'step') to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in Path(metrics_jsonl).read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "step" in r]
    if not rows:
        return
    names = keys or sorted({k for r in rows for k, v in r.items()
                            if k != "step" and isinstance(v, (int, float)) and ("loss" in k)})
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for k in names:
        xs = [r["step"] for r in rows if k in r]
        ys = [r[k] for r in rows if k in r]
        ax.plot(xs, ys, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    # Same atomic write as every other file, so a killed run's temp is one the lock takeover cleans up.
    write_atomic(Path(out_png), buf.getvalue())
