"""`dkp-pipeline predict`: keypoints of a trained student on arbitrary RGB images.

Each image goes through the same square resize/crop as training (docs/conventions.md: shorter side to
the model size S, centre crop), the detector's normalised keypoints are turned into pixels of that
S x S frame and mapped back to the original image with the inverse of
:func:`pipeline.data.images.square_transform`. Keypoints therefore always lie inside the centre square of a
non-square image (the detector never sees the cropped sides).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import DkpError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted, recursively); order kept, duplicates dropped.

    A file given explicitly is taken whatever its extension (it is decoded later and refused by name if it is
    not an image); a folder with no image file is an error.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise DkpError(f"folder {p}: no image files ({', '.join(IMAGE_EXTS)}) in it; pass image files or a "
                               "folder that holds some")
        elif p.is_file():
            found = [p]
        else:
            raise DkpError(f"{p}: no such file or folder")
        for f in found:
            r = f.resolve()
            if r not in seen:
                seen.add(r)
                out.append(f)
    if not out:
        raise DkpError("no images given; pass image files or folders")
    return out


def model_to_image(kp_model: np.ndarray, h: int, w: int, size: int) -> np.ndarray:
    """(K, 2) pixels (x, y) of the S x S model frame -> (K, 2) pixels of the original h x w image."""
    from pipeline.data.images import square_transform

    sx, sy, ox, oy = square_transform(h, w, size)
    out = np.empty_like(np.asarray(kp_model, dtype=np.float64))
    out[:, 0] = (kp_model[:, 0] - ox) / sx
    out[:, 1] = (kp_model[:, 1] - oy) / sy
    return out


def predict_images(model, images: Sequence[Path], device, batch: int = 16) -> list[np.ndarray]:
    """Detect keypoints on each image. Returns a list of (K, 2) float64 arrays, pixels (x, y) of each original image.

    A file that is not a decodable image raises :class:`~pipeline.errors.DkpError` naming it.
    """
    import torch

    from pipeline.data.datasets import rgb_to_tensor
    from pipeline.data.images import resize_square

    S = int(model.detector.image_size)
    model = model.to(device).eval()
    results: list[np.ndarray] = []
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        rgbs = [_read_image(p) for p in chunk]
        x = torch.stack([rgb_to_tensor(resize_square(im, S)) for im in rgbs]).to(device)  # (B, 3, S, S)
        with torch.no_grad():
            u = model.detector(x).keypoints.float().cpu().numpy()  # (B, K, 2) in [-1, 1]
        for im, uk in zip(rgbs, u):
            results.append(model_to_image((uk + 1) / 2 * (S - 1), im.shape[0], im.shape[1], S))
    return results


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; a file that is not a decodable image is a DkpError naming it."""
    from pipeline.errors import ManifestError
    from pipeline.data.images import read_rgb

    try:
        return read_rgb(path)
    except ManifestError as e:
        reason = str(e).split(": ", 1)[-1].split(";")[0]
        raise DkpError(f"{path}: {reason}; pass only image files (PNG/JPEG) or folders of them") from None


def trained_by(path: Path, payload: dict) -> str | None:
    """"teach" or "distill": the stage that trained the model at ``path`` (a model.pt or its artifact directory),
    from the artifact's record, else from the config saved in model.pt (only distill's has ``gamma``)."""
    record = (path if path.is_dir() else path.parent) / "artifact.json"
    try:
        stage = json.loads(record.read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    if stage in ("teach", "distill"):
        return stage
    config = payload.get("config")
    if isinstance(config, dict):
        return "distill" if "gamma" in config else "teach"
    return None


def _overlay_name(p: Path, used: set[str]) -> str:
    name = f"{p.stem}.png"
    n = 1
    while name in used:  # two inputs with the same stem from different folders
        name = f"{p.stem}_{n}.png"
        n += 1
    used.add(name)
    return name


def predict_command(student: str, images: Sequence[str], output: str, device: str, console) -> dict:
    """Write OUT/keypoints.json and OUT/overlays/<stem>.png for every image; returns the JSON document."""
    from pipeline.store.io import write_json_atomic
    from pipeline.stages.common import load_trained
    from pipeline.training import resolve_device
    from pipeline.viz import draw_keypoints, save_png

    files = collect_images(images)
    model, payload = load_trained(Path(student))
    if trained_by(Path(student), payload) == "teach":
        raise DkpError(f"{student} is the depth teacher (a `teach` artifact): it expects min-max normalised inverse "
                       "depth maps, not the RGB images `predict` reads; pass the student, the `distill` artifact "
                       "(`dkp-pipeline status CONFIG` shows its path)")
    dev = resolve_device(device)
    kps = predict_images(model, files, dev)
    links = model.links.edge_weights().detach().float().cpu().numpy()
    out = Path(output)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    entries = []
    for f, kp in zip(files, kps):
        img = _read_image(f)
        name = _overlay_name(f, used)
        scale = max(1, 256 // max(1, min(img.shape[:2])))
        save_png(out / "overlays" / name, draw_keypoints(img, kp, links=links, scale=scale))
        entries.append({"image": str(f), "width": int(img.shape[1]), "height": int(img.shape[0]),
                        "keypoints": [[float(x), float(y)] for x, y in kp], "overlay": f"overlays/{name}"})
    doc = {"model": str(Path(student).resolve()), "n_keypoints": int(model.detector.n_keypoints),
           "model_image_size": int(model.detector.image_size),
           "coordinates": "pixels (x, y) of the original image; integer values are pixel centres",
           "images": entries}
    write_json_atomic(out / "keypoints.json", doc)
    console.print(f"{len(entries)} image(s): keypoints -> {out / 'keypoints.json'}, overlays -> {out / 'overlays'}")
    return doc
