"""Stage `teach` through the CLI on the tiny experiment: outputs, reuse, staleness, progress, errors."""
import json
import re

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

# The test machine has 2 cores shared with other jobs: two intra-op threads contending with them
# made a 6-step tiny run 5x slower (32 s vs 6 s) than one thread.
ENV = {"OMP_NUM_THREADS": "1"}


def _cli(tiny, *args, env=None):
    return run_cli([*args], cwd=tiny["cwd"], env={**ENV, **(env or {})})


def _build_depth(tiny):
    r = _cli(tiny, "run", tiny["yaml"], "--store", tiny["store"], "--until", "depth")
    assert r.returncode == 0, r.stderr + r.stdout


def _teach_dir(tiny):
    dirs = [p for p in (tiny["cwd"] / "store" / "teach").iterdir() if (p / "COMPLETE").exists()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_teach_outputs_reuse_staleness_and_progress(tiny_experiment):
    tiny = tiny_experiment
    _build_depth(tiny)
    r = _cli(tiny, "teach", tiny["yaml"], "--store", tiny["store"])
    assert r.returncode == 0, r.stderr + r.stdout
    out = r.stdout + r.stderr
    assert "teach" in out and "built" in out

    # Progress: the trainer's lines reach a non-interactive stderr (log_every=2, steps=6).
    lines = re.findall(r"step (\d+)/6  loss ([0-9.]+)  ([0-9.]+) steps/s  ETA (\d+:\d\d:\d\d|-)", r.stderr)
    assert [int(s) for s, *_ in lines] == [2, 4, 6], r.stderr
    assert all(float(rate) > 0 for _, _, rate, _ in lines)

    d = _teach_dir(tiny)
    # model.pt: plain tensors only, rebuildable from its own model_args
    payload = torch.load(d / "model.pt", weights_only=True, map_location="cpu")
    assert payload["model_args"]["n_keypoints"] == 4 and payload["model_args"]["width"] == 8
    from pipeline.stages.common import load_trained

    model, _ = load_trained(d)
    assert not model.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    kp = model.detector(x).keypoints
    assert kp.shape == (2, 4, 2) and bool((kp.abs() <= 1).all())
    assert torch.equal(model.state_dict()["links.theta"], payload["state_dict"]["links.theta"])

    # metrics.jsonl: one line per log interval, finite losses, the step function's metric
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows] == [2, 4, 6]
    assert all(np.isfinite(r_["loss"]) and "recon_loss" in r_ for r_ in rows)
    rec = json.loads((d / "artifact.json").read_text())
    res = rec["result"]
    assert res["steps"] == 6 and res["n_train_frames"] > 0
    # synthetic data: the share of heatmap mass on the (re-rendered) figure, for the check
    fig = res["figure_heatmap_mass"]  # eval's own measure (stages.common.figure_mass) on the first test frames
    assert fig["n_frames"] == 10 and 0 < fig["mask_area"] < 1 and 0 <= fig["mass_in_mask"] <= 1
    assert "heatmap mass on the figure" in out
    _check_figure_mass_against_uniform_heatmaps(tiny, model, fig)

    # pictures: loss curve, keypoint grids at each eval interval, keypoints.png = the last grid
    import cv2

    assert cv2.imread(str(d / "loss.png")) is not None
    samples = sorted(p.name for p in (d / "samples").glob("step_*.png"))
    assert samples == ["step_000003.png", "step_000006.png"]
    grid = cv2.imread(str(d / "samples" / "step_000006.png"))
    # 48 frames, test_fraction 0.2 -> 10 test frames shown, 8 per row, 32-px frames drawn 8x (256 px)
    assert grid.shape[1] == 8 * (256 + 2) + 2 and grid.shape[0] == 2 * (256 + 2) + 2, grid.shape
    assert (d / "keypoints.png").read_bytes() == (d / "samples" / "step_000006.png").read_bytes()

    # a second teach does nothing
    mtime = (d / "model.pt").stat().st_mtime_ns
    r2 = _cli(tiny, "teach", tiny["yaml"], "--store", tiny["store"])
    assert r2.returncode == 0, r2.stderr
    assert "reused" in r2.stdout and "nothing to do" in r2.stdout and "step 2/6" not in r2.stderr
    assert (d / "model.pt").stat().st_mtime_ns == mtime

    # changing teach.lr makes teach (and everything below it) stale, and says why
    r3 = _cli(tiny, "status", tiny["yaml"], "--store", tiny["store"], "--set", "teach.lr=0.002", "--json")
    assert r3.returncode == 0, r3.stderr
    st = {s["stage"]: s for s in json.loads(r3.stdout)}
    assert st["depth"]["state"] == "fresh"
    assert st["teach"]["state"] == "stale"
    assert any(w.startswith("config field teach.lr changed") for w in st["teach"]["why"]), st["teach"]["why"]
    r4 = _cli(tiny, "status", tiny["yaml"], "--store", tiny["store"], "--set", "teach.lr=0.002")
    assert "config field teach.lr changed" in " ".join(r4.stdout.split())
    # a non-semantic field (log_every) does not
    r5 = _cli(tiny, "status", tiny["yaml"], "--store", tiny["store"], "--set", "teach.log_every=3", "--json")
    assert {s["stage"]: s["state"] for s in json.loads(r5.stdout)}["teach"] == "fresh"


def _check_figure_mass_against_uniform_heatmaps(tiny, model, fig):
    """Uniform heatmaps put exactly the figure's area fraction on it; the stage's number uses the same masks."""
    from types import SimpleNamespace

    from pipeline.depth_cache import DepthCacheReader
    from pipeline.data.build import build_manifest
    from pipeline.stages.common import figure_mass

    m = build_manifest("synthetic", tiny["root"], progress=False)
    reader = DepthCacheReader(next(p for p in (tiny["cwd"] / "store" / "depth").iterdir()))

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.detector = lambda x: SimpleNamespace(heatmaps=torch.full((len(x), 4, 8, 8), 1 / 64))

    u = figure_mass(Uniform(), m, m.split("test"), 32, "depth", reader, "cpu")
    assert u["n_frames"] == 10 and u["mask_area"] == fig["mask_area"]
    assert u["mass_in_mask"] == pytest.approx(u["mask_area"], abs=1e-4)
    assert figure_mass(model, m, m.split("test"), 32, "depth", reader, "cpu")["mass_in_mask"] == pytest.approx(
        fig["mass_in_mask"], abs=1e-4)


def test_perceptual_loss_without_vgg_weights_is_a_clear_error(tiny_experiment, tmp_path):
    tiny = tiny_experiment
    _build_depth(tiny)
    empty_hub = tmp_path / "torch-home"  # torchvision's cache, empty: no VGG16 there
    r = _cli(tiny, "teach", tiny["yaml"], "--store", tiny["store"], "--set", "teach.recon_loss=perceptual",
             env={"TORCH_HOME": str(empty_hub)})
    assert r.returncode == 2, r.stdout + r.stderr
    msg = " ".join(r.stderr.split())
    assert "VGG16" in msg and str(empty_hub / "hub" / "checkpoints" / "vgg16-397923af.pth") in msg
    assert "l1ssim" in msg and "Traceback" not in r.stderr

    missing = tmp_path / "nowhere" / "vgg16.pth"
    r = _cli(tiny, "teach", tiny["yaml"], "--store", tiny["store"], "--set", "teach.recon_loss=perceptual",
             "--set", f"teach.vgg_weights={missing}")
    assert r.returncode == 2 and str(missing) in " ".join(r.stderr.split()), r.stderr
    # refusing before any work leaves no empty "interrupted" teach artifact behind
    st = _cli(tiny, "status", tiny["yaml"], "--store", tiny["store"], "--json", "--set",
              "teach.recon_loss=perceptual", "--set", f"teach.vgg_weights={missing}")
    teach = [s for s in __import__("json").loads(st.stdout) if s["stage"] == "teach"][0]
    assert teach["state"] == "missing", teach


def test_keypoint_grid_draws_keypoints_and_the_learned_links(tmp_path):
    """One strong link (0-1) on a black background: white pixels appear only along that segment."""
    import cv2

    from pipeline.stages.common import build_model, keypoint_grid
    from pipeline.viz import colour

    torch.manual_seed(0)
    model = build_model(dict(n_keypoints=3, in_channels=3, image_size=32, heatmap_size=8, thick=2e-3, sklr=512.0,
                             mask_ratio=0.8, mask_blocks=4, width=4)).eval()
    with torch.no_grad():
        model.links.theta.fill_(-1.0)  # softplus(-512) ~ 0: no link
        model.links.theta[0, 1] = 0.01  # softplus(5.12) ~ 5: one strong link
    imgs = torch.full((2, 3, 32, 32), -1.0)  # black
    out = tmp_path / "g.png"
    keypoint_grid(model, imgs, out_png=out)
    g = cv2.imread(str(out))[:, :, ::-1]  # RGB
    tile = g[2:2 + 256, 2:2 + 256]  # first tile (scale 256 // 32 = 8)
    white = np.argwhere((tile == 255).all(-1))
    assert len(white) > 20, "the strong link was not drawn"
    kp = model.detector(imgs[:1]).keypoints[0].detach().numpy()
    p = ((kp + 1) / 2 * 31 + 0.5) * 8 - 0.5  # (K, 2) x, y in the enlarged tile
    a, b = p[0], p[1]
    ab = b - a
    t = np.clip(((white[:, ::-1] - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    dist = np.linalg.norm(white[:, ::-1] - (a + t[:, None] * ab), axis=1)
    assert dist.max() < 4, "white pixels away from the 0-1 segment: a weak link was drawn"
    for k in range(3):  # every keypoint's colour is in the tile
        assert (tile == np.array(colour(k), np.uint8)).all(-1).any(), k
