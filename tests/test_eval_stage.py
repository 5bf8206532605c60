"""Stage `eval` on the tiny experiment (in-process): metrics.json for student and teacher, pictures, the numbers
recomputed from scratch with dkp_core.metrics, the left/right flip option, reuse."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DkpError
from tests.conftest import quiet_console

# The synthetic preset scores with left/right matching (eval.flip_pairs: dataset); the plain score is the base case.
PLAIN = "eval.flip_pairs=none"


@pytest.fixture(scope="module")
def tiny(tiny_store):
    """The tiny experiment built end to end once for this file."""
    t = tiny_store([PLAIN])
    return {**t, "eval": t["plan"].store.path("eval", t["plan"].stages["eval"].key)}


def _run(tiny, *overrides):
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    console = quiet_console()
    plan = run_pipeline(load_config(tiny["yaml"], list(overrides)), tiny["store"], console=console)
    return plan, console.file.getvalue()


def test_metrics_json_and_pictures(tiny):
    import cv2

    d = tiny["eval"]
    m = json.loads((d / "metrics.json").read_text())
    assert m["protocol"] == "l2" and m["dataset"] == "synthetic" and m["protocol_options"] == {}
    for role, inp in (("student", "rgb"), ("teacher", "depth")):
        r = m[role]
        assert r["input"] == inp and r["protocol"] == "normalised_l2" and not r["higher_is_better"]
        assert np.isfinite(r["value"]) and r["value"] > 0
        assert r["n_test"] == 10 and r["n_fit"] == 38  # 48 frames: 38 train (the fit split), 10 test
        assert r["artifact"] == tiny["plan"].stages["distill" if role == "student" else "teach"].key
        fig = r["figure_heatmap_mass"]  # synthetic masks are re-rendered, so this is always there
        assert fig["n_frames"] == 10 and 0 < fig["mask_area"] < 1 and 0 <= fig["mass_in_mask"] <= 1
        assert fig["ratio"] == pytest.approx(fig["mass_in_mask"] / fig["mask_area"])
        img = cv2.imread(str(d / f"{role}_test.png"))
        # 10 test frames, 8 per row, 32 px tiles drawn 8x
        assert img.shape == (2 * (256 + 2) + 2, 8 * (256 + 2) + 2, 3)
    rec = json.loads((d / "artifact.json").read_text())
    assert rec["metrics"]["student"]["value"] == m["student"]["value"]


def test_numbers_equal_dkp_core_metrics_on_fresh_detections(tiny):
    """Detect again from the saved models, map GT independently, score with dkp_core.metrics: same numbers."""
    from dkp_core.metrics import normalised_l2
    from pipeline.data.datasets import FrameDataset
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.stages.common import load_trained

    plan = tiny["plan"]
    m = plan.manifest
    store = plan.store
    metrics = json.loads((tiny["eval"] / "metrics.json").read_text())
    saved = np.load(tiny["eval"] / "detections.npz")
    reader = DepthCacheReader(store.path("depth", plan.stages["depth"].key))
    for role, stage, key in (("student", "distill", "rgb"), ("teacher", "teach", "depth")):
        model, _ = load_trained(store.path(stage, plan.stages[stage].key))
        dets, gts = {}, {}
        for split, idx in (("fit", m.split("regress")), ("test", m.split("test"))):
            ds = FrameDataset(manifest=m, indices=idx, image_size=32, use_rgb=key == "rgb",
                              use_depth=key == "depth", depth_reader=reader)
            x = torch.stack([ds[i][key] for i in range(len(ds))])
            with torch.no_grad():
                u = model.detector(x).keypoints.numpy()
            dets[split] = (u + 1) / 2 * 31  # pixels of the 32 px frame (docs/conventions.md)
            gts[split] = m.keypoints[idx].astype(np.float64)  # 32 px frames at model size 32: identity map
            np.testing.assert_allclose(saved[f"{role}_{split}_det"], dets[split], atol=1e-5)
            np.testing.assert_allclose(saved[f"{role}_{split}_gt"], gts[split], atol=1e-5)
            np.testing.assert_array_equal(saved[f"{role}_{split}_index"], idx)
        r = normalised_l2(dets["fit"], gts["fit"], dets["test"], gts["test"], 32)
        assert metrics[role]["value"] == pytest.approx(r.value, rel=1e-6)
        assert metrics[role]["details"] == json.loads(json.dumps(r.details))


def test_flip_pairs_from_dataset_yaml(tiny):
    from dkp_core.metrics import normalised_l2
    from dkp_core.synthetic import left_right_pairs

    plain = json.loads((tiny["eval"] / "metrics.json").read_text())
    plan, out = _run(tiny, "eval.flip_pairs=dataset")
    assert plan.stages["eval"].key != tiny["plan"].stages["eval"].key
    assert "distill  fresh" in out and "eval     built" in out and "distill  built" not in out  # only eval re-runs
    d = plan.store.path("eval", plan.stages["eval"].key)
    flipped = json.loads((d / "metrics.json").read_text())
    pairs = [list(p) for p in left_right_pairs(16)]
    assert flipped["protocol_options"] == {"flip_pairs": pairs}
    saved = np.load(d / "detections.npz")
    for role in ("student", "teacher"):
        r = normalised_l2(saved[f"{role}_fit_det"], saved[f"{role}_fit_gt"], saved[f"{role}_test_det"],
                          saved[f"{role}_test_gt"], 32, flip_pairs=pairs)
        assert flipped[role]["value"] == pytest.approx(r.value, rel=1e-9)
        assert flipped[role]["details"]["value_without_flip_pairs"] == pytest.approx(plain[role]["value"], rel=1e-9)
        assert flipped[role]["value"] <= plain[role]["value"] + 1e-9


FOLDER_CSV = ("frame,split,x0,y0,x1,y1,x2,y2,x3,y3\n"
              "a,train,1,1,2,2,3,3,4,4\nb,train,2,1,3,2,4,3,5,4\nc,test,1,2,2,3,3,4,4,5\n")


def _folder_with_pairs(root, dataset_yaml, csv=FOLDER_CSV):
    """A 4-joint folder dataset with ``dataset_yaml`` as ROOT/dataset.yaml (None: no file); its manifest."""
    import cv2

    from pipeline.data.build import build_manifest

    (root / "images").mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c"):
        cv2.imwrite(str(root / "images" / f"{name}.png"), np.zeros((16, 16, 3), np.uint8))
    (root / "keypoints.csv").write_text(csv)
    if dataset_yaml is not None:
        (root / "dataset.yaml").write_text(dataset_yaml)
    elif (root / "dataset.yaml").exists():
        (root / "dataset.yaml").unlink()
    return build_manifest("folder", root, progress=False)


def test_flip_pairs_errors(tiny, tmp_path):
    from pipeline.stages.eval.run import dataset_flip_pairs

    with pytest.raises(DkpError, match="works with protocol l2 only"):
        _run(tiny, "eval.flip_pairs=dataset", "eval.protocol=taichi")
    for text in (None, "n_joints: 4\n"):
        with pytest.raises(DkpError, match=r"dataset\.yaml gives no left/right joint pairs; add 'left_right_pairs: "):
            dataset_flip_pairs(_folder_with_pairs(tmp_path, text))
    with pytest.raises(DkpError, match=r"\[2, 9\] is not a pair of joint indices in \[0, 3\]"):
        dataset_flip_pairs(_folder_with_pairs(tmp_path, "left_right_pairs: [[0, 1], [2, 9]]\n"))
    with pytest.raises(DkpError, match=r"entry 3 is not a pair"):
        dataset_flip_pairs(_folder_with_pairs(tmp_path, "left_right_pairs: [3]\n"))


def test_flip_pairs_of_your_own_folder_dataset_and_the_old_synthetic_key(tmp_path, caplog):
    from pipeline.stages.eval.run import dataset_flip_pairs

    with caplog.at_level("WARNING"):
        m = _folder_with_pairs(tmp_path, "left_right_pairs: [[0, 1], [2, 3]]\n")
    assert dataset_flip_pairs(m) == [(0, 1), (2, 3)] and "not dataset options" not in caplog.text
    old = _folder_with_pairs(tmp_path, "synthetic: {left_right_pairs: [[1, 0]]}\n")  # what synth has always written
    assert dataset_flip_pairs(old) == [(1, 0)]
    both = _folder_with_pairs(tmp_path, "left_right_pairs: [[0, 3]]\nsynthetic: {left_right_pairs: [[1, 0]]}\n")
    assert dataset_flip_pairs(both) == [(0, 3)]  # the top-level key wins


def _keys(tmp_path, dataset_yaml, *overrides, csv=FOLDER_CSV):
    """Every stage's key for the 4-joint folder dataset under tmp_path/data."""
    from pipeline.store.artifacts import Store
    from pipeline.config import load_config
    from pipeline.graph import build_plan

    m = _folder_with_pairs(tmp_path / "data", dataset_yaml, csv)
    cfg = load_config(None, ["data.manifest=folder", f"data.root={tmp_path / 'data'}", *overrides])
    return {n: sp.key for n, sp in build_plan(cfg, Store(tmp_path / "store"), manifest=m).stages.items()}


def test_metric_input_errors_become_dkp_errors(tiny):
    # Human3.6M's protocol needs its 32 joints; the synthetic data have 16: a named user error, not a traceback
    with pytest.raises(DkpError, match=r"eval protocol h36m on dataset synthetic \(student, distill artifact\): .*32"):
        _run(tiny, PLAIN, "eval.protocol=h36m")


def test_floor_row_and_ratios(tiny):
    """The mean-pose floor is scored through the same protocol on the same frames, and every model gets its ratio."""
    from dkp_core.metrics import normalised_l2

    m = json.loads((tiny["eval"] / "metrics.json").read_text())
    saved = np.load(tiny["eval"] / "detections.npz")
    gf, gt = saved["student_fit_gt"], saved["student_test_gt"]
    # by hand: the least-squares constant is the fit mean (NaN skipped); score it as a detector would be
    mean = np.nanmean(gf, axis=0)
    const = normalised_l2(np.full((len(gf), 1, 2), 5.0), gf, np.full((len(gt), 1, 2), 5.0), gt, 32)
    np.testing.assert_allclose(const.pred_test[0], mean, atol=1e-9)
    assert m["floor"]["value"] == pytest.approx(const.value, rel=1e-9)
    assert m["floor"]["n_fit"] == 38 and m["floor"]["n_test"] == 10
    for role in ("student", "teacher"):
        r = m[role]
        assert r["ratio_to_floor"] == pytest.approx(r["value"] / r["floor_value"])
        assert r["beats_floor"] == (r["value"] < r["floor_value"])
    assert "baseline" not in m and "ratio_to_baseline" not in m["student"]


def test_print_comparison_says_when_a_model_does_not_beat_the_floor():
    from pipeline.stages.eval.run import print_comparison

    def role(v, floor=10.0):
        return {"value": v, "unit": "%", "higher_is_better": False, "ratio_to_floor": v / floor,
                "beats_floor": v < floor}

    summary = {"protocol": "l2", "dataset": "d", "gamma": 0.4,
               "floor": {"value": 10.0, "unit": "%", "higher_is_better": False},
               "baseline": role(12.0), "student": role(6.0) | {"ratio_to_baseline": 0.5}, "teacher": role(3.0)}
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    print_comparison(summary, console)
    out = console.file.getvalue()
    for label in ("floor: mean pose", "baseline: RGB, gamma 0", "student: RGB, gamma 0.4", "teacher: depth"):
        assert label in out
    assert "baseline does NOT beat the floor: 12.00 vs 10.00" in out
    assert "student does NOT" not in out and "teacher does NOT" not in out
    assert "0.500" in out and "1.200" in out  # ratio to the baseline, ratio to the floor


def test_baseline_switch_builds_the_gamma0_distill_and_scores_it(tiny):
    """eval.baseline: the gamma = 0 student is built as a second distill artifact (the key a plain
    `--set distill.gamma=0` run has), depth and teach are shared, and eval scores four rows."""
    from pipeline.config import load_config
    from pipeline.graph import build_plan

    plan, out = _run(tiny, PLAIN, "eval.baseline=true")
    assert [n for n in plan.stages] == ["manifest", "depth", "teach", "distill", "baseline", "eval"]
    b = plan.stages["baseline"]
    assert b.stage == "distill" and b.cfg.distill.gamma == 0.0
    g0 = build_plan(load_config(tiny["yaml"], [PLAIN, "distill.gamma=0"]), plan.store, progress=False)
    assert b.key == g0.stages["distill"].key and g0.stages["distill"].state == "fresh"  # the same artifact
    assert "teach    fresh" in out and "distill  fresh" in out and "baseline built" in out
    assert plan.stages["eval"].inputs["upstream"]["baseline"] == b.key
    m = json.loads((plan.store.path("eval", plan.stages["eval"].key) / "metrics.json").read_text())
    assert m["baseline"]["artifact"] == b.key and m["baseline"]["input"] == "rgb"
    assert m["student"]["ratio_to_baseline"] == pytest.approx(m["student"]["value"] / m["baseline"]["value"])
    assert "baseline: RGB, gamma 0" in out and "floor: mean pose" in out
    # a second run reuses everything, the baseline included
    _, out2 = _run(tiny, PLAIN, "eval.baseline=true")
    assert "nothing to do" in out2 and "baseline fresh" in out2


def test_the_pairs_eval_reads_are_in_its_key(tmp_path):
    a = _keys(tmp_path, "left_right_pairs: [[0, 1]]\n", "eval.flip_pairs=dataset")
    b = _keys(tmp_path, "left_right_pairs: [[0, 1], [2, 3]]\n", "eval.flip_pairs=dataset")
    assert a["eval"] != b["eval"] and all(a[s] == b[s] for s in ("manifest", "depth", "teach", "distill"))
    # unread (flip_pairs: none): not keyed
    assert _keys(tmp_path, "left_right_pairs: [[0, 1]]\n")["eval"] == _keys(tmp_path, "")["eval"]


def test_the_ground_truth_eval_reads_is_in_its_key(tmp_path):
    before = _keys(tmp_path, None)
    after = _keys(tmp_path, None, csv=FOLDER_CSV.replace("c,test,1,2,", "c,test,1.5,2,"))  # one test GT coordinate
    assert before["eval"] != after["eval"]
    # the frames did not change: depth and the trained models stand; the manifest key covers the GT too
    assert all(before[s] == after[s] for s in ("depth", "teach", "distill")) and before["manifest"] != after["manifest"]
