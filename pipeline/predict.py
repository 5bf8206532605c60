"""`dkp-pipeline predict`: keypoints of a trained student on arbitrary RGB images.

Each image goes through the same square resize/crop as training (docs/conventions.md: shorter side to
the model size S, centre crop), the detector's normalised keypoints are turned into pixels of that
S x S frame and mapped back to the original image with the inverse of
:func:`pipeline.data.images.square_transform`. Keypoints therefore always lie inside the centre square of a
non-square image (the detector never sees the cropped sides).

Videos (``.mp4 .mkv .mov .avi``, :mod:`pipeline.data.video`) are decoded once, in order, a batch of frames at a
time, and each gets ``<stem>.csv`` (one row per frame: ``frame, x0, y0, x1, y1, ...`` in pixels of the original
frame), ``<stem>.coco.json`` (COCO-style keypoints) and, with ``--overlay``, ``<stem>.overlay.mp4``; every file
is written under a temporary name and renamed when complete. What images people have is handled as training
reads it (:mod:`pipeline.data.images`: grayscale, 16-bit, RGBA, EXIF orientation, names that are not UTF-8);
a frame so elongated that the square resize would need more than :data:`MAX_RESIZED_PIXELS` is a named error.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.errors import DkpError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".mkv", ".mov", ".avi")  # pipeline.data.video.VIDEO_EXTS (not imported: --help stays light)
# The square resize enlarges the shorter side to S before the crop: a 1 x 100000 px strip would become
# S x 100000 S. Past this many pixels the frame is refused (crop or pad it) rather than exhausting memory.
MAX_RESIZED_PIXELS = 1 << 26
OVERLAY_MAX_SIDE = 4096  # overlays are enlarged to about 256 px on the shorter side, never past this


def collect_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(images, videos): files as given (a video by its extension, anything else an image), folders expanded to
    their image and video files (sorted, recursively); order kept, duplicates dropped."""
    images: list[Path] = []
    videos: list[Path] = []
    seen: set[Path] = set()
    exts = IMAGE_EXTS + VIDEO_EXTS
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise DkpError(f"folder {p}: no image files ({', '.join(IMAGE_EXTS)}) or videos "
                               f"({', '.join(VIDEO_EXTS)}) in it; pass files or a folder that holds some")
        elif p.is_file():
            found = [p]
        else:
            raise DkpError(f"{p}: no such file or folder")
        for f in found:
            r = f.resolve()
            if r not in seen:
                seen.add(r)
                (videos if f.suffix.lower() in VIDEO_EXTS else images).append(f)
    if not images and not videos:
        raise DkpError("no images given; pass image files, videos or folders")
    return images, videos


def model_input(img: np.ndarray, size: int, name) -> "torch.Tensor":  # noqa: F821
    """(H, W, 3) uint8 -> (3, S, S) float32 in [-1, 1], the training transform; a named error for a frame whose
    resize would exceed MAX_RESIZED_PIXELS."""
    from pipeline.data.datasets import rgb_to_tensor
    from pipeline.data.images import resize_square

    h, w = img.shape[:2]
    s = size / min(h, w)
    if max(size, round(h * s)) * max(size, round(w * s)) > MAX_RESIZED_PIXELS:
        raise DkpError(f"{name}: {w}x{h} px is too elongated for the square model input (the resize would need "
                       f"{round(h * s)}x{round(w * s)} px); crop or pad it to near-square")
    return rgb_to_tensor(resize_square(img, size))


def detect(model, rgbs: Sequence[np.ndarray], names: Sequence, device) -> list[np.ndarray]:
    """Keypoints of each RGB frame: (K, 2) float64 pixels (x, y) of that frame (one batched forward)."""
    import torch

    S = int(model.detector.image_size)
    x = torch.stack([model_input(im, S, n) for im, n in zip(rgbs, names)]).to(device)  # (B, 3, S, S)
    with torch.no_grad():
        u = model.detector(x).keypoints.float().cpu().numpy()  # (B, K, 2) in [-1, 1]
    return [model_to_image((uk + 1) / 2 * (S - 1), im.shape[0], im.shape[1], S) for im, uk in zip(rgbs, u)]


def overlay_scale(h: int, w: int) -> int:
    """Enlargement of an overlay: about 256 px on the shorter side, the longer side at most OVERLAY_MAX_SIDE."""
    return max(1, min(256 // max(1, min(h, w)), OVERLAY_MAX_SIDE // max(1, h, w)))


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
    model = model.to(device).eval()
    results: list[np.ndarray] = []
    for s in range(0, len(images), batch):
        chunk = images[s:s + batch]
        results += detect(model, [_read_image(p) for p in chunk], chunk, device)
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
    as its model.pt records it (``info``); for a model.pt written before it did, from the artifact's record, else
    from the config saved beside the weights (only distill's has ``gamma``)."""
    stage = (payload.get("info") or {}).get("stage")
    if stage in ("teach", "distill"):
        return stage
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


def _unique(stem: str, suffix: str, used: set[str]) -> str:
    name = f"{stem}{suffix}"
    n = 1
    while name in used:  # two inputs with the same stem from different folders
        name = f"{stem}_{n}{suffix}"
        n += 1
    used.add(name)
    return name


def _overlay_name(p: Path, used: set[str]) -> str:
    return _unique(p.stem, ".png", used)


def coco_document(name: str, n_keypoints: int, links: np.ndarray, frames: list[dict], source: str) -> dict:
    """COCO-style keypoints: one image per frame (``file_name`` = ``<video>/<k>``, the frame id a folder dataset
    would give it), one annotation each, visibility 2 for every keypoint (the detector always places all K)."""
    names = [f"k{j}" for j in range(n_keypoints)]
    w = np.asarray(links, dtype=np.float64)
    strong = [[a + 1, b + 1] for a in range(n_keypoints) for b in range(a + 1, n_keypoints)
              if w.size and w[a, b] > 0.1 * w.max()]  # COCO's skeleton is 1-based
    images, annotations = [], []
    for f in frames:
        kp = np.asarray(f["keypoints"], dtype=np.float64)  # (K, 2)
        x0, y0 = kp.min(axis=0)
        x1, y1 = kp.max(axis=0)
        images.append({"id": f["frame"] + 1, "file_name": f"{name}/{f['frame']}", "frame_index": f["frame"],
                       "time_s": f["time_s"], "width": f["width"], "height": f["height"]})
        annotations.append({"id": f["frame"] + 1, "image_id": f["frame"] + 1, "category_id": 1, "iscrowd": 0,
                            "num_keypoints": n_keypoints,
                            "keypoints": [round(float(v), 3) for xy in kp for v in (*xy, 2)],
                            "bbox": [round(float(v), 3) for v in (x0, y0, x1 - x0, y1 - y0)],
                            "area": round(float((x1 - x0) * (y1 - y0)), 3)})
    return {"info": {"description": f"distill-dkp keypoints of {source}",
                     "coordinates": "pixels (x, y) of the original frame; integer values are pixel centres "
                                    "(docs/conventions.md)"},
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person", "keypoints": names,
                            "skeleton": strong}]}


def predict_video(model, path: Path, out: Path, stem: str, device, *, links: np.ndarray, overlay: bool,
                  batch: int = 16) -> dict:
    """Keypoints of every frame of the video ``path``: ``out/<stem>.csv``, ``out/<stem>.coco.json`` and, with
    ``overlay``, ``out/<stem>.overlay.mp4`` (the source's timing kept, VFR included, to the millisecond)."""
    import csv

    from pipeline.data.video import VideoWriter, iter_video
    from pipeline.store.io import replace_durably, write_json_atomic
    from pipeline.viz import draw_keypoints

    K = int(model.detector.n_keypoints)
    csv_path, coco_path, video_path = out / f"{stem}.csv", out / f"{stem}.coco.json", out / f"{stem}.overlay.mp4"
    tmp_csv, tmp_video = out / f".{stem}.csv.tmp", out / f".{stem}.overlay.mp4.tmp.mp4"
    frames: list[dict] = []
    writer = None
    ok = False
    try:
        with open(tmp_csv, "w", newline="") as fh:
            rows = csv.writer(fh)
            rows.writerow(["frame"] + [f"{a}{j}" for j in range(K) for a in ("x", "y")])
            pending: list[tuple[int, float, np.ndarray]] = []

            def flush() -> None:
                nonlocal writer
                kps = detect(model, [f for _, _, f in pending], [f"{path} frame {k}" for k, _, _ in pending], device)
                for (k, t, img), kp in zip(pending, kps):
                    rows.writerow([k] + [f"{v:.3f}" for xy in kp for v in xy])
                    frames.append({"frame": k, "time_s": None if t != t else round(t, 6), "width": img.shape[1],
                                   "height": img.shape[0], "keypoints": kp.tolist()})
                    if overlay:
                        if writer is None:
                            writer = VideoWriter(tmp_video, encoding="x264", time_base=1 / 1000)
                        scale = min(4, overlay_scale(*img.shape[:2]))
                        ms = round(t * 1000) if t == t else k * 40
                        writer.write(draw_keypoints(img, kp, links=links, scale=scale), pts=ms)
                pending.clear()

            for item in iter_video(path):
                pending.append(item)
                if len(pending) >= batch:
                    flush()
            if pending:
                flush()
        if not frames:
            raise DkpError(f"{path}: no decodable frame in the video")
        if writer is not None:
            writer.close()
            writer = None
            replace_durably(tmp_video, video_path)
        replace_durably(tmp_csv, csv_path)
        write_json_atomic(coco_path, coco_document(path.name, K, links, frames, str(path)))
        ok = True
    finally:
        if writer is not None:
            writer.close(abort=True)
        if not ok:
            for t in (tmp_csv, tmp_video):
                t.unlink(missing_ok=True)
    return {"video": str(path), "frames": len(frames), "csv": csv_path.name, "coco": coco_path.name,
            "overlay": video_path.name if overlay else None}


def _check_video(path: Path) -> None:
    """Refuse a video that cannot be opened or has no decodable frame before anything is written."""
    from pipeline.data.video import probe_video

    try:
        probe_video(b"", path)
    except ValueError as e:
        raise DkpError(f"{path}: {e}; pass videos FFmpeg can read ({', '.join(VIDEO_EXTS)})") from None


def predict_command(student: str, inputs: Sequence[str], output: str, device: str, console, *,
                    overlay: bool = False, batch: int = 16) -> dict:
    """Images: OUT/keypoints.json and OUT/overlays/<stem>.png; videos: OUT/<stem>.csv, .coco.json (and
    .overlay.mp4 with ``overlay``), listed in keypoints.json. Returns the keypoints.json document."""
    from pipeline.store.io import write_json_atomic
    from pipeline.stages.common import load_trained
    from pipeline.training import resolve_device
    from pipeline.viz import draw_keypoints, save_png

    files, videos = collect_inputs(inputs)
    model, payload = load_trained(Path(student))
    if trained_by(Path(student), payload) == "teach":
        raise DkpError(f"{student} is the depth teacher (a `teach` artifact): it expects min-max normalised inverse "
                       "depth maps, not the RGB images `predict` reads; pass the student, the `distill` artifact "
                       "(`dkp-pipeline status CONFIG` shows its path)")
    for v in videos:
        _check_video(v)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    kps = predict_images(model, files, dev, batch=batch) if files else []
    links = model.links.edge_weights().detach().float().cpu().numpy()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    entries = []
    if files:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    for f, kp in zip(files, kps):
        img = _read_image(f)
        name = _overlay_name(f, used)
        save_png(out / "overlays" / name, draw_keypoints(img, kp, links=links, scale=overlay_scale(*img.shape[:2])))
        entries.append({"image": str(f), "width": int(img.shape[1]), "height": int(img.shape[0]),
                        "keypoints": [[float(x), float(y)] for x, y in kp], "overlay": f"overlays/{name}"})
    video_entries = []
    for v in videos:
        stem = _unique(v.stem, "", used)
        video_entries.append(predict_video(model, v, out, stem, dev, links=links, overlay=overlay, batch=batch))
        console.print(f"{v}: {video_entries[-1]['frames']} frames -> {out / (stem + '.csv')}", markup=False,
                      soft_wrap=True)
    doc = {"model": str(Path(student).resolve()), "n_keypoints": int(model.detector.n_keypoints),
           "model_image_size": int(model.detector.image_size),
           "coordinates": "pixels (x, y) of the original image; integer values are pixel centres",
           "images": entries, **({"videos": video_entries} if videos else {})}
    write_json_atomic(out / "keypoints.json", doc)
    console.print(f"{len(entries)} image(s), {len(video_entries)} video(s): keypoints -> {out / 'keypoints.json'}"
                  + (f", overlays -> {out / 'overlays'}" if entries else ""), markup=False, soft_wrap=True)
    return doc
