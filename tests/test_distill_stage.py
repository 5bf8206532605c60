"""Stage `distill` on the tiny experiment (in-process, one teacher shared by the whole file).

gamma = 0 and gamma > 0 run through the same code; the teacher stays in eval() with no gradients; the
teacher-embedding cache gives the same targets and the same kd loss as the live teacher; the layer and
flatten options reach the loss.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import quiet_console


@pytest.fixture(scope="module")
def tiny(tiny_store):
    """The tiny experiment built up to `teach` once for this file."""
    return {**tiny_store(until="teach"), "runs": {}}


def distill(tiny, *overrides: str) -> Path:
    """Build distill with these overrides (memoised per override set); returns the artifact directory."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    key = tuple(sorted(overrides))
    if key not in tiny["runs"]:
        cfg = load_config(tiny["yaml"], ["distill.log_every=1", *overrides])
        plan = run_pipeline(cfg, tiny["store"], until="distill", console=quiet_console())
        tiny["runs"][key] = plan.store.path("distill", plan.stages["distill"].key)
    return tiny["runs"][key]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_gamma_zero_is_the_baseline_through_the_same_code(tiny, monkeypatch):
    import pipeline.stages.distill.run as distill_mod

    calls = []
    real = distill_mod.run
    monkeypatch.setattr(distill_mod, "run", lambda ctx: calls.append(ctx.cfg.distill.gamma) or real(ctx))
    base = distill(tiny, "distill.gamma=0")
    dist = distill(tiny, "distill.gamma=0.4")
    assert calls == [0.0, 0.4] and base != dist
    rb, rd = rows(base), rows(dist)
    assert [r["step"] for r in rb] == [r["step"] for r in rd] == [1, 2, 3, 4, 5, 6]
    assert all("kd_loss" not in r for r in rb)
    assert all(0.0 <= r["kd_loss"] <= 2.0 for r in rd)
    # Step 1: same initial weights, batch and mask -> the same reconstruction loss; the total adds gamma * kd.
    assert rb[0]["recon_loss"] == pytest.approx(rd[0]["recon_loss"], rel=1e-6)
    assert rd[0]["loss"] == pytest.approx(rd[0]["recon_loss"] + 0.4 * rd[0]["kd_loss"], rel=1e-5)
    assert rb[0]["loss"] == pytest.approx(rb[0]["recon_loss"], rel=1e-6)
    # After that the kd term changes the weights, so the runs part
    assert any(abs(a["recon_loss"] - b["recon_loss"]) > 1e-6 for a, b in zip(rb[1:], rd[1:]))
    res_b = json.loads((base / "artifact.json").read_text())["result"]
    res_d = json.loads((dist / "artifact.json").read_text())["result"]
    assert res_b["teacher_cache"] is False and res_d["teacher_cache"] is True
    assert not (base / "teacher_embeddings").exists() and (dist / "teacher_embeddings" / "index.json").is_file()
    for d in (base, dist):
        assert (d / "model.pt").is_file() and (d / "keypoints.png").is_file() and (d / "COMPLETE").exists()


def test_teacher_stays_in_eval_without_gradients(tiny, monkeypatch):
    from dkp_core.keypoints.teacher import FrozenTeacher

    seen = []
    real = FrozenTeacher.embedding

    def spy(frozen, depth, layer):
        out = real(frozen, depth, layer)
        teacher = frozen.model
        seen.append({"training": teacher.training, "any_training": any(m.training for m in teacher.modules()),
                     "requires_grad": any(p.requires_grad for p in teacher.parameters()),
                     "has_grad": any(p.grad is not None for p in teacher.parameters()),
                     "out_requires_grad": out.requires_grad,
                     "checksum": float(sum(p.double().sum() for p in teacher.state_dict().values()
                                           if p.is_floating_point()))})
        return out

    monkeypatch.setattr(FrozenTeacher, "embedding", spy)
    d = distill(tiny, "distill.gamma=0.4", "distill.teacher_cache=false")
    assert len(seen) == 7  # live teacher: the shape check before training, then one forward per step
    assert not any(s["training"] or s["any_training"] or s["requires_grad"] or s["has_grad"] or s["out_requires_grad"]
                   for s in seen), seen
    assert len({s["checksum"] for s in seen}) == 1  # weights and BN statistics never change
    assert not (d / "teacher_embeddings").exists()

    # and the guard itself: a train() call cannot undo the teacher's eval(), and a teacher that was unfrozen behind
    # its back (a parameter made trainable) is refused
    from pipeline.stages.common import load_trained

    teacher, _ = load_trained(_teach_dir(tiny))
    frozen = FrozenTeacher(teacher)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    real(frozen, torch.zeros(1, 3, 32, 32), "logits")
    next(teacher.parameters()).requires_grad_(True)
    with pytest.raises(AssertionError, match="frozen"):
        real(frozen, torch.zeros(1, 3, 32, 32), "logits")


def _teach_dir(tiny) -> Path:
    dirs = [p for p in (Path(tiny["store"]) / "teach").iterdir() if (p / "COMPLETE").exists()]
    assert len(dirs) == 1
    return dirs[0]


def test_embedding_cache_equals_live_teacher(tiny):
    """Cached targets = live targets per (frame, flip), and a distill step gives the same kd loss either way."""
    from pipeline.config import load_config
    from pipeline.data.datasets import FrameDataset, valid_train_indices
    from pipeline.depth_cache import DepthCacheReader
    from pipeline.data.build import build_manifest
    from pipeline.stages.common import load_trained
    from dkp_core.keypoints.teacher import FrozenTeacher
    from pipeline.stages.distill.teacher_cache import EmbeddingCache

    cached = distill(tiny, "distill.gamma=0.4", "distill.hflip=true")
    live = distill(tiny, "distill.gamma=0.4", "distill.hflip=true", "distill.teacher_cache=false")
    rc, rl = rows(cached), rows(live)
    for a, b in zip(rc, rl):
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=1e-4, abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)

    cfg = load_config(tiny["yaml"])
    m = build_manifest(cfg.data.manifest, cfg.data.root, progress=False)
    reader = DepthCacheReader(next(p for p in (Path(tiny["store"]) / "depth").iterdir() if (p / "COMPLETE").exists()))
    idx = valid_train_indices(m, reader, "train")
    ds = FrameDataset(manifest=m, indices=idx, image_size=32, use_rgb=False, use_depth=True, depth_reader=reader)
    teacher, _ = load_trained(_teach_dir(tiny))
    cache = EmbeddingCache(cached / "teacher_embeddings")
    picks = [(0, False), (0, True), (5, True), (len(ds) - 1, False)]
    depth = torch.stack([ds.load(i, f)["depth"] for i, f in picks])
    want = FrozenTeacher(teacher).embedding(depth, "logits")
    got = cache.lookup(torch.tensor([int(idx[i]) for i, _ in picks]), torch.tensor([f for _, f in picks]))
    assert got.shape == want.shape == (4, 4, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])  # the mirrored frame has its own targets
    # indices stay on the CPU: a device index would make the host wait for the GPU at every lookup
    meta = torch.zeros(2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="indices on the CPU"):
        cache.lookup(meta, meta)
    with pytest.raises(KeyError, match="not in the teacher embedding cache"):
        cache.lookup(torch.tensor([int(m.split("test")[0])]), torch.tensor([False]))


@pytest.mark.parametrize("layer,flatten,cache,shape", [
    ("down2", "location", "true", (16, 8, 8)),  # width 8: down2 has 2w channels at S/4
    ("heatmaps", "keypoint", "false", None),
    ("heatmaps", "keypoint", "true", (4, 8, 8)),  # the synthetic preset's choice, through the embedding cache
])
def test_layer_and_flatten_options(tiny, layer, flatten, cache, shape):
    from pipeline.stages.distill.teacher_cache import EmbeddingCache

    d = distill(tiny, "distill.gamma=0.4", f"distill.layer={layer}", f"distill.flatten={flatten}",
                f"distill.teacher_cache={cache}")
    r = rows(d)
    assert all(0.0 <= x["kd_loss"] <= 2.0 for x in r)
    rec = json.loads((d / "artifact.json").read_text())
    assert rec["config"]["layer"] == layer and rec["config"]["flatten"] == flatten
    if shape is not None:
        c = EmbeddingCache(d / "teacher_embeddings")
        assert c.layer == layer and c.n_flip == 1 and c.shape == shape  # no flips on the synthetic data
        part = np.load(d / "teacher_embeddings" / "part-00000-of-00001.npy")
        assert part.shape[1:] == (1, *shape) and np.isfinite(part).all()
    # a different layer is a different artifact than the default one
    assert d != distill(tiny, "distill.gamma=0.4")


def test_unknown_layer_is_a_config_error(tiny):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="down1, down2"):
        load_config(tiny["yaml"], ["distill.layer=conv9"])


def test_teacher_and_student_shapes_must_match(tiny):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"distill.layer=logits: the teacher's tensor is \(4, 8, 8\) but the "
                                          r"student's would be \(5, 8, 8\)"):
        distill(tiny, "distill.gamma=0.4", "distill.model.n_keypoints=5")
    # gamma = 0 needs no teacher tensor, so any student shape is fine
    assert (distill(tiny, "distill.gamma=0", "distill.model.n_keypoints=5") / "model.pt").is_file()


def test_init_from_teacher_copies_its_weights(tiny):
    """distill.init: teacher_detector starts the student's detector at the teacher's (links and decoder random),
    teacher the whole model; a student of another width is refused with the field named."""
    from pipeline.errors import ConfigError
    from pipeline.stages.common import build_model, load_trained
    from pipeline.stages.distill.run import init_from_teacher

    teacher, payload = load_trained(_teach_dir(tiny))
    args = payload["model_args"]

    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return all(torch.equal(sa[k], sb[k]) for k in sa)

    torch.manual_seed(1)
    s = build_model(args)
    assert not same(s.detector, teacher.detector)
    init_from_teacher(s, teacher, "teacher_detector")
    assert same(s.detector, teacher.detector) and not same(s.decoder, teacher.decoder)
    init_from_teacher(s, teacher, "teacher")
    assert same(s.decoder, teacher.decoder) and same(s.links, teacher.links)
    s.detector.state_dict()[next(iter(s.detector.state_dict()))].add_(1.0)  # a copy, not the teacher's tensors
    assert not same(s.detector, teacher.detector)
    with pytest.raises(ConfigError, match="distill.init=teacher_detector: the teacher's detector does not fit"):
        init_from_teacher(build_model({**args, "width": args["width"] * 2}), teacher, "teacher_detector")


def test_init_teacher_trains_another_student_and_leaves_the_baseline_alone(tiny):
    from pipeline.config import load_config
    from pipeline.graph import build_plan
    from pipeline.stages.common import load_trained
    from pipeline.store.artifacts import Store

    d = distill(tiny, "distill.gamma=0.4", "distill.init=teacher_detector", "distill.steps=1")
    assert d != distill(tiny, "distill.gamma=0.4", "distill.steps=1")
    assert json.loads((d / "artifact.json").read_text())["config"]["init"] == "teacher_detector"
    # scratch is keyed as before the option existed (no "init" in the key), any other value is in it
    def plan_of(*overrides):
        return build_plan(load_config(tiny["yaml"], ["eval.baseline=true", *overrides]), Store(Path(tiny["store"])),
                          progress=False)

    plan = plan_of("distill.init=teacher")
    assert plan.stages["distill"].inputs["config"]["init"] == "teacher"
    assert "init" not in plan.stages["baseline"].inputs["config"]  # the gamma = 0 baseline starts from scratch
    assert plan.stages["baseline"].key == plan_of().stages["baseline"].key
    assert plan_of("distill.keypoint_weight=5", "distill.layer=heatmaps").stages["baseline"].key == \
        plan_of("distill.layer=heatmaps").stages["baseline"].key  # nor the keypoint term
    assert "init" not in plan_of().stages["distill"].inputs["config"]
    load_trained(d)  # a complete student model


def test_keypoint_term_is_logged_keyed_and_checked(tiny):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    d = distill(tiny, "distill.gamma=0.4", "distill.layer=heatmaps", "distill.flatten=keypoint",
                "distill.keypoint_weight=5", "distill.steps=2")
    r = rows(d)
    assert len(r) == 2 and all(x["kp_loss"] > 0 for x in r)
    assert d != distill(tiny, "distill.gamma=0.4", "distill.layer=heatmaps", "distill.flatten=keypoint",
                        "distill.steps=2")
    assert "kp_loss" not in rows(distill(tiny, "distill.gamma=0.4", "distill.steps=2"))[0]
    with pytest.raises(ConfigError, match="distill.keypoint_weight: 5.0 needs the teacher's keypoints"):
        load_config(tiny["yaml"], ["distill.keypoint_weight=5", "distill.layer=down2"])
