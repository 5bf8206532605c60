"""`dkp-pipeline export STUDENT -o detector.onnx`: the trained detector as one ONNX file, usable without this package.

The graph is the student's detector alone (the decoder and links are training machinery): input ``image``
``(batch, 3, S, S)`` float32 RGB in [-1, 1], outputs ``keypoints`` ``(batch, K, 2)`` (x, y) in [-1, 1] and
``heatmaps`` ``(batch, K, S/4, S/4)``; the batch is dynamic, the spatial size fixed (the soft-argmax grid is a
constant of it). The file's metadata (``metadata_props``, JSON strings) says everything a user needs to feed it and
read it, as docs/conventions.md defines it: input size, resize rule, normalisation, keypoint order, coordinate
convention, links, and where it came from. Exported with torch's ONNX exporter (dynamo; the ``onnx`` extra) as a
single file; :func:`check_onnx` compares onnxruntime with torch on random images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.errors import ConfigError, DkpError

INPUT, OUTPUTS = "image", ("keypoints", "heatmaps")
META_SCHEMA = "dkp.detector-onnx/1"


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch's dynamo exporter writes through it)
    except ImportError:
        raise ConfigError("export needs the ONNX packages: pip install -e '.[onnx]' (onnx, onnxscript, onnxruntime)") \
            from None


class _Detector:
    """Builds the exported module lazily (torch imported inside)."""

    @staticmethod
    def wrap(detector):
        import torch

        class DetectorOnly(torch.nn.Module):
            def __init__(self, det) -> None:
                super().__init__()
                self.det = det

            def forward(self, image):  # (B, 3, S, S) in [-1, 1] -> (B, K, 2), (B, K, S/4, S/4)
                out = self.det(image)
                return out.keypoints, out.heatmaps

        return DetectorOnly(detector).eval()


def metadata(model, source: Path, payload: dict) -> dict[str, str]:
    """The ONNX metadata_props: every value a JSON string (ONNX allows only strings)."""
    from pipeline.store.io import sha256_file

    det = model.detector
    S, K = int(det.image_size), int(det.n_keypoints)
    links = model.links.edge_weights().detach().float().cpu().numpy()
    src = source / "model.pt" if source.is_dir() else source
    meta = {
        "schema": META_SCHEMA,
        "input": {"name": INPUT, "shape": ["batch", 3, S, S], "dtype": "float32", "layout": "NCHW", "channels": "RGB"},
        "preprocess": {"resize": "shorter side to S, then centre crop to S x S (cv2.INTER_AREA when shrinking, "
                                 "cv2.INTER_LINEAR when enlarging)", "S": S,
                       "normalise": "x / 127.5 - 1 on 8-bit RGB (mean 0.5, std 0.5 on [0, 1])"},
        "outputs": {"keypoints": {"shape": ["batch", K, 2], "order": "(x, y)"},
                    "heatmaps": {"shape": ["batch", K, S // 4, S // 4],
                                 "meaning": "spatial softmax, each map sums to 1"}},
        "keypoint_order": [f"k{j}" for j in range(K)],
        "coordinates": ("normalised: u in [-1, 1], -1 and +1 at the centres of the first and last pixel of the S x S "
                        "input; pixels of the input x = (u + 1) / 2 * (S - 1), y likewise; back to the original "
                        "frame: invert the resize/crop (docs/conventions.md, pipeline.predict.model_to_image)"),
        "links": [[round(float(v), 6) for v in row] for row in links],
        "source": {"file": str(src.resolve()), "sha256": sha256_file(src),
                   "trained_by": (payload.get("info") or {}).get("stage") or "distill"},
    }
    return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}


def export_onnx(student: str | Path, output: str | Path, *, opset: Optional[int] = None, check: bool = True,
                console=None) -> dict:
    """Write ``output`` (ONNX, dynamic batch, metadata); with ``check``, compare onnxruntime to torch. Returns
    ``{"path", "metadata", "max_abs_diff"}`` (the parity numbers when checked)."""
    import torch

    from pipeline.predict import trained_by
    from pipeline.stages.common import load_trained

    _require_onnx()
    src = Path(student)
    model, payload = load_trained(src)
    if trained_by(src, payload) == "teach":
        raise DkpError(f"{student} is the depth teacher (a `teach` artifact): its input is a normalised inverse-depth "
                       "map, not an RGB image; export the student, the `distill` artifact")
    det = model.detector.float().eval()
    S = int(det.image_size)
    module = _Detector.wrap(det)
    example = (torch.zeros(2, 3, S, S),)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress chatter; errors still raise
        kw = {"opset_version": opset} if opset else {}
        program = torch.onnx.export(module, example, dynamo=True, input_names=[INPUT], output_names=list(OUTPUTS),
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
                                    verbose=False, **kw)
        program.save(str(tmp), external_data=False)
    import onnx

    m = onnx.load(str(tmp))
    meta = metadata(model, src, payload)
    onnx.helper.set_model_props(m, meta)
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp))
    from pipeline.store.io import replace_durably

    replace_durably(tmp, out)
    result = {"path": str(out), "metadata": meta, "max_abs_diff": None}
    if check:
        result["max_abs_diff"] = check_onnx(out, det)
    if console is not None:
        diff = result["max_abs_diff"]
        console.print(f"wrote {out} (input {INPUT} (batch, 3, {S}, {S}) float32 RGB in [-1, 1]; outputs keypoints, "
                      f"heatmaps" + (f"; onnxruntime vs torch max |diff| keypoints {diff['keypoints']:.2g}, heatmaps "
                                     f"{diff['heatmaps']:.2g}" if diff else "") + ")", markup=False, soft_wrap=True)
    return result


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session of ``path``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("running the ONNX detector needs onnxruntime: pip install -e '.[onnx]'") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path, detector, batches=(1, 3), seed: int = 0) -> dict:
    """Max |onnxruntime - torch| over random images in [-1, 1] at each batch size; a DkpError past 1e-4."""
    import torch

    sess = session(path)
    S = int(detector.image_size)
    g = torch.Generator().manual_seed(seed)
    worst = {"keypoints": 0.0, "heatmaps": 0.0}
    for b in batches:
        x = torch.rand(b, 3, S, S, generator=g) * 2 - 1
        with torch.no_grad():
            ref = detector(x)
        kp, hm = sess.run(list(OUTPUTS), {INPUT: x.numpy()})
        worst["keypoints"] = max(worst["keypoints"], float(np.abs(kp - ref.keypoints.numpy()).max()))
        worst["heatmaps"] = max(worst["heatmaps"], float(np.abs(hm - ref.heatmaps.numpy()).max()))
    if worst["keypoints"] > 1e-4:
        raise DkpError(f"{path}: onnxruntime differs from torch by {worst['keypoints']:.3g} on keypoints (> 1e-4); "
                       "the export is wrong, please report it with the model file")
    return worst


def read_metadata(path: str | Path) -> dict:
    """The exported file's metadata, JSON values decoded."""
    sess = session(path)
    raw = sess.get_modelmeta().custom_metadata_map
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out
