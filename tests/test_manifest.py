"""Manifests over tiny fake trees of each real layout, in the real file formats.

Images are non-square wherever the layout allows it, so that an (x, y) / (row, col) mix-up fails.
"""
import json
import os
import pickle
import sys
import types

import cv2
import numpy as np
import pytest

from pipeline.store import fingerprint as F
from pipeline.data.build import build_manifest
from pipeline.data.layouts import human36m as H36
from pipeline.data.manifest import Manifest
from pipeline.data.spec import list_datasets, load_spec
from pipeline.errors import ManifestError

OLD = 1_600_000_000  # past mtime so the memo may keep entries (see fingerprint.RACY_WINDOW_NS)
RNG = np.random.default_rng(0)


def _age(p):
    os.utime(p, (OLD, OLD))


def img(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), RNG.integers(0, 255, (h, w, 3), dtype=np.uint8))
    _age(path)
    return path


@pytest.fixture
def reads(fingerprint_reads):
    """Names of files whose content the fingerprinting reads."""
    return fingerprint_reads


# --------------------------------------------------------------------------------------------------
# shipped descriptions


def test_list_datasets_and_every_description_loads():
    names = list_datasets()
    assert set(names) >= {"human36m", "human36m_wobg", "taichi", "deepfashion", "folder", "synthetic"}
    want = {  # (K, J, protocol, hflip) as AutoLink / Distill-DKP use them
        "human36m": (16, 32, "h36m", True), "human36m_wobg": (16, 32, "h36m", False),
        "taichi": (10, 18, "taichi", True), "deepfashion": (16, 17, "deepfashion", False),
    }
    for n, (k, j, proto, flip) in want.items():
        s = load_spec(n)
        assert (s.n_keypoints, s.n_joints, s.protocol, s.hflip) == (k, j, proto, flip), n
        assert set(s.roles) >= {"train", "regress", "test"}
    assert load_spec("human36m_wobg").files["masks_dir"] == "BackgroudMask"  # sic, as released
    assert load_spec("folder").protocol == "l2"
    assert len({load_spec(n).description_sha256 for n in names}) == len(names)


def test_unknown_dataset_name_lists_valid_ones(tmp_path):
    with pytest.raises(ManifestError, match="unknown dataset 'h36'; valid names: .*human36m.*taichi"):
        build_manifest("h36", tmp_path, progress=False)


def test_custom_yaml_with_unknown_field_is_refused(tmp_path):
    y = tmp_path / "mine.yaml"
    with open(load_spec("folder").source) as f:
        y.write_text(f.read() + "hflipp: true\n")
    with pytest.raises(ManifestError, match="unknown field.*hflipp"):
        build_manifest(str(y), tmp_path, progress=False)


def test_missing_root(tmp_path):
    with pytest.raises(ManifestError, match="not a directory.*--root"):
        build_manifest("folder", tmp_path / "nope", progress=False)


# --------------------------------------------------------------------------------------------------
# folder layout (and synthetic)


def make_folder(root):
    img(root / "images" / "a.png", 40, 24)  # W=40, H=24
    img(root / "images" / "sub" / "b.jpg", 30, 50)
    img(root / "images" / "c.png", 16, 16)
    (root / "keypoints.csv").write_text(
        "frame,split,x0,y0,x1,y1\n"
        "a,train,39,23,,\n"  # bottom-right pixel centre of a 40x24 frame; joint 1 missing
        "sub/b.jpg,test,1.5,2,29,49\n"
    )
    return root


def test_folder_layout_counts_splits_and_xy_convention(tmp_path):
    root = make_folder(tmp_path / "ds")
    m = build_manifest("folder", root, progress=False)
    assert m.frame_ids == ["a", "c", "sub/b"]  # sorted paths
    assert m.paths == ["images/a.png", "images/c.png", "images/sub/b.jpg"]
    assert m.splits == ["train", "train", "test"]
    assert m.sizes.tolist() == [[40, 24], [16, 16], [30, 50]]
    assert m.keypoints.shape == (3, 2, 2) and m.keypoints.dtype == np.float32
    np.testing.assert_array_equal(m.keypoints[0, 0], [39, 23])
    assert np.isnan(m.keypoints[0, 1]).all() and np.isnan(m.keypoints[1]).all()
    np.testing.assert_array_equal(m.keypoints[2], [[1.5, 2], [29, 49]])
    assert m.split("train").tolist() == [0, 1]  # unlabelled c trains too
    assert m.split("regress").tolist() == [0]  # only annotated train frames fit the regressor
    assert m.split("test").tolist() == [2]
    assert m.n_joints == 2 and m.protocol == "l2" and m.hflip is False and m.depth_options is None
    assert m.fingerprints == [F.hash_file(root / p) for p in m.paths]
    assert m.fingerprint == F.combine(m.fingerprints)
    with pytest.raises(ManifestError, match="no depth files"):
        m.depth_fingerprint
    with pytest.raises(ManifestError, match="unknown split 'val'.*regress"):
        m.split("val")


def test_swapped_axes_on_a_non_square_frame_are_out_of_range(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "keypoints.csv").write_text("frame,split,x0,y0,x1,y1\na,train,23,39,,\n")  # (row, col) by mistake
    with pytest.raises(ManifestError, match=r"joint 0 of frame 'images/a.png'.*\(23.00, 39.00\).*40x24"):
        build_manifest("folder", root, progress=False)


@pytest.mark.parametrize("csv_text, message", [
    ("frame,split,x0,y0\nzzz,train,1,1\n", "frame 'zzz' has no image"),
    ("frame,split,x0,y0\na,val,1,1\n", "split 'val' is not one of train, test"),
    ("frame,split,x0,y0\na,train,1,1\na,test,1,1\n", "duplicate frame id 'a'"),
    ("frame,split,x0,y0\na,train,1,\n", "only one coordinate"),
    ("frame,split,x0,y0\na,train,one,1\n", "not a number"),
    ("frame,split,y0,x0\na,train,1,1\n", "header must be frame,split,x0,y0"),
    ("frame,split,x0,y0\na,train,1\n", "3 cells, the header has 4"),
])
def test_folder_csv_errors_name_the_file_and_line(tmp_path, csv_text, message):
    root = make_folder(tmp_path / "ds")
    (root / "keypoints.csv").write_text(csv_text)
    with pytest.raises(ManifestError, match="keypoints.csv") as e:
        build_manifest("folder", root, progress=False)
    assert message in str(e.value)


def test_duplicate_frame_ids_from_two_image_files(tmp_path):
    root = make_folder(tmp_path / "ds")
    img(root / "images" / "a.jpg", 8, 8)
    with pytest.raises(ManifestError, match="duplicate frame id 'a'.*a.jpg.*a.png"):
        build_manifest("folder", root, progress=False)


def test_symlink_escaping_the_root_is_refused(tmp_path):
    root = make_folder(tmp_path / "ds")
    outside = img(tmp_path / "elsewhere" / "x.png", 8, 8)
    os.symlink(outside, root / "images" / "x.png")
    with pytest.raises(ManifestError, match="outside the root"):
        build_manifest("folder", root, progress=False)
    os.unlink(root / "images" / "x.png")
    os.symlink(tmp_path / "elsewhere", root / "images" / "linked_dir")
    with pytest.raises(ManifestError, match="outside the root"):
        build_manifest("folder", root, progress=False)


def test_unreadable_image_is_named(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "images" / "c.png").write_bytes(b"garbage")
    with pytest.raises(ManifestError, match="c.png"):
        build_manifest("folder", root, progress=False)


def test_rebuild_reads_no_file_and_touch_rereads_one(tmp_path, reads):
    root = make_folder(tmp_path / "ds")
    _age(root / "keypoints.csv")
    m1 = build_manifest("folder", root, progress=False)
    # keypoints.csv is hashed once too: its parse is cached under that hash (folder.read_folder_csv)
    assert sorted(reads) == ["a.png", "b.jpg", "c.png", "keypoints.csv"]
    reads.clear()
    m2 = build_manifest("folder", root, progress=False)
    assert reads == [] and m2.fingerprint == m1.fingerprint and m2.sizes.tolist() == m1.sizes.tolist()
    os.utime(root / "images" / "c.png", (OLD + 5, OLD + 5))
    m3 = build_manifest("folder", root, progress=False)
    assert reads == ["c.png"] and m3.fingerprint == m1.fingerprint
    img(root / "images" / "c.png", 16, 16)  # new content
    os.utime(root / "images" / "c.png", (OLD + 9, OLD + 9))
    assert build_manifest("folder", root, progress=False).fingerprint != m1.fingerprint


def test_save_load_round_trip_and_tamper_detection(tmp_path):
    root = make_folder(tmp_path / "ds")
    m = build_manifest("folder", root, progress=False)
    out = m.save(tmp_path / "out" / "folder.manifest.json")
    side = tmp_path / "out" / "folder.manifest.keypoints.npy"
    assert side.is_file() and not list((tmp_path / "out").glob(".*tmp*"))
    assert b"pickle" not in out.read_bytes()
    back = Manifest.load(out)
    assert back.frame_ids == m.frame_ids and back.paths == m.paths and back.splits == m.splits
    assert back.fingerprint == m.fingerprint and back.description_sha256 == m.description_sha256
    np.testing.assert_array_equal(back.keypoints, m.keypoints)  # NaN == NaN here
    assert back.sizes.tolist() == m.sizes.tolist() and back.split("regress").tolist() == [0]
    assert back.annotation_fingerprint == m.annotation_fingerprint
    assert Manifest.load(out, root=tmp_path / "moved").root == tmp_path / "moved"

    kp = np.load(side)
    kp[0, 0, 0] = 1.0
    np.save(side, kp)
    with pytest.raises(ManifestError, match="keypoints.npy does not match"):
        Manifest.load(out)
    d = json.loads(out.read_text())
    d["frames"]["fingerprint"][0] = "xxh3:" + "0" * 32
    d["keypoints"] = None
    out.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="do not add up"):
        Manifest.load(out)
    out.write_text("{")
    with pytest.raises(ManifestError, match="unreadable"):
        Manifest.load(out)


def make_synthetic(root, n=3):
    for i in range(n):
        img(root / "images" / f"f{i:06d}.png", 32, 24)
        np.save(root / "depth" / f"f{i:06d}.npy", np.full((24, 32), 2.0 + i, np.float32)) if (
            root / "depth").is_dir() else None
    return root


def test_synthetic_layout_with_depth_and_dataset_yaml(tmp_path):
    root = tmp_path / "s"
    (root / "depth").mkdir(parents=True)
    make_synthetic(root)
    (root / "keypoints.csv").write_text(
        "frame,split,x0,y0,x1,y1,x2,y2\n"
        "f000000.png,train,1,2,3,4,5,6\nf000001.png,train,31,23,0,0,7,7\nf000002.png,test,1,1,2,2,3,3\n")
    (root / "dataset.yaml").write_text("depth_kind: depth\ndepth_scale: 1.0\nn_joints: 3\nimage_size: 64\n"
                                       "generator_seed: 5\n")
    m = build_manifest("synthetic", root, progress=False)
    assert len(m) == 3 and m.image_size == 64 and m.n_joints == 3 and m.n_keypoints == 10
    assert m.depth_options == {"kind": "depth", "scale": 1.0}
    assert m.depth_paths == [f"depth/f{i:06d}.npy" for i in range(3)]
    assert m.depth_fingerprint == F.combine([F.hash_file(root / p) for p in m.depth_paths])
    assert m.spec.extra == {"generator_seed": 5}
    assert m.split("test").tolist() == [2]
    np.testing.assert_array_equal(m.keypoints[1, 0], [31, 23])

    (root / "dataset.yaml").write_text("depth_kind: inverse_depth\ndepth_scale: 0.001\nn_joints: 3\n")
    m2 = build_manifest("synthetic", root, progress=False)
    assert m2.depth_options == {"kind": "inverse_depth", "scale": 0.001}
    assert m2.description_sha256 != m.description_sha256
    (root / "dataset.yaml").write_text("depth_kind: inverse_depth\ndepth_scale: 0.001\nn_joints: 3\nnote: hi\n")
    m3 = build_manifest("synthetic", root, progress=False)
    assert m3.description_sha256 == m2.description_sha256  # information-only keys do not change keys


def test_folder_depth_errors(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "depth").mkdir()
    with pytest.raises(ManifestError, match="depth_kind"):
        build_manifest("folder", root, progress=False)
    (root / "dataset.yaml").write_text("depth_kind: metric\n")
    with pytest.raises(ManifestError, match="depth_kind must be 'depth'"):
        build_manifest("folder", root, progress=False)
    (root / "dataset.yaml").write_text("depth_kind: depth\n")
    np.save(root / "depth" / "a.npy", np.ones((24, 40), np.float32))
    with pytest.raises(ManifestError, match="2 frames have no depth file"):
        build_manifest("folder", root, progress=False)
    np.save(root / "depth" / "c.npy", np.ones((16, 16), np.float32))
    (root / "depth" / "sub").mkdir()
    np.save(root / "depth" / "sub" / "b.npy", np.ones((40, 30), np.float32))  # transposed: wrong size
    with pytest.raises(ManifestError, match="depth file 'depth/sub/b.npy' is 30x40 but its frame"):
        build_manifest("folder", root, progress=False)
    np.save(root / "depth" / "sub" / "b.npy", np.ones((50, 30), np.float32))
    assert build_manifest("folder", root, progress=False).depth_options["kind"] == "depth"
    np.save(root / "depth" / "orphan.npy", np.ones((2, 2), np.float32))
    with pytest.raises(ManifestError, match="orphan.npy' has no frame"):
        build_manifest("folder", root, progress=False)


# --------------------------------------------------------------------------------------------------
# Human3.6M


def make_h36m(root, w=128, h=96, wobg=False):
    """S1,5-9 (train) and S11 (test): one kept action (two for S11) and one action AutoLink skips."""
    scipy_io = pytest.importorskip("scipy.io")
    gt = {}
    for s in (1, 5, 6, 7, 8, 9, 11):
        acts = ["Directions 1.54138969"] + (["Walking.60457274"] if s == 11 else [])
        for act in acts:
            for k in range(2 if s == 11 else 1):
                stem = f"{k:06d}"
                img(root / f"S{s}/WithBackground/{act}/{stem}.jpg", w, h)
                kp = RNG.uniform(0, 1, (32, 2))  # (row, col) in [0, 1]
                (root / f"S{s}/Landmarks/{act}").mkdir(parents=True, exist_ok=True)
                scipy_io.savemat(str(root / f"S{s}/Landmarks/{act}/{stem}.mat"), {"keypoints_2d": kp})
                _age(root / f"S{s}/Landmarks/{act}/{stem}.mat")
                gt[f"S{s}/{act}/{stem}"] = kp
                if wobg:
                    mask = root / f"S{s}/BackgroudMask/{act}/{stem}.png"
                    mask.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(mask), np.full((h, w), 255, np.uint8))
                    _age(mask)
        img(root / f"S{s}/WithBackground/Eating 2.1/000000.jpg", w, h)  # not one of the 6 actions: no .mat
    return gt


def test_human36m_layout_splits_and_rowcol_to_xy(tmp_path):
    root = tmp_path / "human_images"
    gt = make_h36m(root, w=128, h=96)
    m = build_manifest("human36m", root, progress=False)
    assert len(m) == 6 + 2 * 2 and not any("Eating" in p for p in m.paths)
    assert m.split("train").tolist() == m.split("regress").tolist() == list(range(6))
    assert [m.frame_ids[i].split("/")[0] for i in m.split("test")] == ["S11"] * 4
    assert m.paths[0] == "S1/WithBackground/Directions 1.54138969/000000.jpg"
    assert m.sizes[0].tolist() == [128, 96] and m.mask_paths is None and m.hflip is True
    for i, fid in enumerate(m.frame_ids):
        rc = gt[fid]
        want = np.stack([rc[:, 1] * 127, rc[:, 0] * 95], axis=1)  # x = col (W-1), y = row (H-1)
        np.testing.assert_allclose(m.keypoints[i], want, rtol=1e-6, atol=1e-4)


def test_human36m_rebuild_parses_and_reads_nothing(tmp_path, reads, monkeypatch):
    root = tmp_path / "h"
    make_h36m(root)
    m1 = build_manifest("human36m", root, progress=False)
    parsed = []
    real = H36._read_h36m_mat
    monkeypatch.setattr(H36, "_read_h36m_mat", lambda p, k: parsed.append(p) or real(p, k))
    reads.clear()
    m2 = build_manifest("human36m", root, progress=False)
    assert reads == [] and parsed == []
    np.testing.assert_array_equal(m1.keypoints, m2.keypoints)


def test_human36m_reads_matlab_v73_landmarks_too(tmp_path):
    h5py = pytest.importorskip("h5py")
    root = tmp_path / "h"
    make_h36m(root)
    rel = "S1/Landmarks/Directions 1.54138969/000000.mat"
    rc = RNG.uniform(0, 1, (32, 2))
    with h5py.File(root / rel, "w", userblock_size=512) as f:  # v7.3 = HDF5 after a 512-byte header
        f["keypoints_2d"] = rc.T  # MATLAB writes column-major: (32, 2) is stored as (2, 32)
    _age(root / rel)
    m = build_manifest("human36m", root, progress=False)
    i = m.frame_ids.index("S1/Directions 1.54138969/000000")
    np.testing.assert_allclose(m.keypoints[i], np.stack([rc[:, 1] * 127, rc[:, 0] * 95], axis=1), rtol=1e-5)


def test_human36m_wobg_lists_masks_and_requires_them(tmp_path):
    root = tmp_path / "h"
    make_h36m(root, wobg=True)
    m = build_manifest("human36m_wobg", root, progress=False)
    assert m.hflip is False
    assert m.mask_paths[0] == "S1/BackgroudMask/Directions 1.54138969/000000.png"
    assert all(fp.startswith("xxh3:") for fp in m.mask_fingerprints) and m.mask_fingerprint
    os.remove(root / "S11/BackgroudMask/Walking.60457274/000001.png")
    with pytest.raises(ManifestError, match="mask 'S11/BackgroudMask/Walking.60457274/000001.png'.*not found"):
        build_manifest("human36m_wobg", root, progress=False)


def test_human36m_missing_and_broken_files(tmp_path):
    root = tmp_path / "h"
    make_h36m(root)
    os.remove(root / "S5/Landmarks/Directions 1.54138969/000000.mat")
    with pytest.raises(ManifestError, match="landmark file 'S5/Landmarks/Directions 1.54138969/000000.mat'.*not found"):
        build_manifest("human36m", root, progress=False)
    (root / "S5/Landmarks/Directions 1.54138969/000000.mat").write_bytes(b"MATLAB 5.0 but broken")
    with pytest.raises(ManifestError, match="000000.mat' unreadable"):
        build_manifest("human36m", root, progress=False)
    import shutil

    shutil.rmtree(root / "S9")
    with pytest.raises(ManifestError, match="'S9/WithBackground' not found.*human_images"):
        build_manifest("human36m", root, progress=False)


# --------------------------------------------------------------------------------------------------
# Taichi: GT pickles in pandas' format, written here without pandas


def _fake_pandas_modules():
    mods = {n: types.ModuleType(n) for n in (
        "pandas", "pandas.core", "pandas.core.frame", "pandas.core.internals", "pandas.core.internals.managers",
        "pandas.core.indexes", "pandas.core.indexes.base", "pandas.core.indexes.range", "pandas._libs",
        "pandas._libs.internals")}

    def put(mod, obj):
        obj.__module__ = mod
        obj.__qualname__ = obj.__name__  # pickle looks globals up by qualified name
        setattr(mods[mod], obj.__name__, obj)
        return obj

    def _new_Index(cls, d):
        raise AssertionError("never called when reading")

    def _unpickle_block(values, placement, ndim):
        raise AssertionError("never called when reading")

    put("pandas.core.indexes.base", _new_Index)
    put("pandas._libs.internals", _unpickle_block)

    class Index:
        def __init__(self, data):
            self.data = np.asarray(data, dtype=object)

        def __reduce__(self):
            return _new_Index, (Index, {"data": self.data, "name": None})

    class RangeIndex:
        def __init__(self, n):
            self.n = n

        def __reduce__(self):
            return _new_Index, (RangeIndex, {"name": None, "start": 0, "stop": self.n, "step": 1})

    class Block:
        def __init__(self, values, locs):
            self.values, self.locs = values, locs

        def __reduce__(self):
            return _unpickle_block, (self.values, self.locs, 2)

    class BlockManager:
        style = "0.14.1"

        def __init__(self, axes, blocks):
            self.axes, self.blocks = axes, blocks

        def __getstate__(self):  # pandas < 1.3: pure-Python BlockManager
            return (self.axes, [b.values for b in self.blocks], [None for _ in self.blocks],
                    {"0.14.1": {"axes": self.axes,
                                "blocks": [{"values": b.values, "mgr_locs": b.locs} for b in self.blocks]}})

        def __reduce_ex__(self, proto):
            if BlockManager.style == "reduce":  # pandas >= 1.3: Cython BlockManager.__reduce__
                return BlockManager, (self.blocks, self.axes)
            return super().__reduce_ex__(proto)

    class DataFrame:
        def __init__(self, mgr):
            self._mgr = mgr

        def __getstate__(self):
            return {"_mgr": self._mgr, "_typ": "dataframe", "_metadata": [], "attrs": {},
                    "_flags": {"allows_duplicate_labels": True}}

    put("pandas.core.indexes.base", Index)
    put("pandas.core.indexes.range", RangeIndex)
    put("pandas._libs.internals", Block)
    put("pandas.core.internals.managers", BlockManager)
    put("pandas.core.frame", DataFrame)
    return mods, Index, RangeIndex, Block, BlockManager, DataFrame


def write_taichi_pickle(path, names, values, style="0.14.1"):
    """A DataFrame(file_name, frame_number, value) pickled the way pandas does, via stand-in modules."""
    mods, Index, RangeIndex, Block, BlockManager, DataFrame = _fake_pandas_modules()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        n = len(names)
        obj = np.empty((2, n), dtype=object)  # object block: columns 0 (file_name) and 2 (value)
        for i in range(n):
            obj[0, i] = names[i]
            obj[1, i] = np.asarray(values[i], dtype=np.float64)
        ints = np.arange(n, dtype=np.int64).reshape(1, n)  # int block: column 1 (frame_number)
        mgr = BlockManager([Index(["file_name", "frame_number", "value"]), RangeIndex(n)],
                           [Block(obj, np.array([0, 2])), Block(ints, slice(1, 2, 1))])
        BlockManager.style = style
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(DataFrame(mgr), protocol=4))
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def make_taichi(root, style="0.14.1"):
    img(root / "train/vid1.mp4/0000000.png", 64, 48)
    img(root / "train/vid1.mp4/0000001.png", 64, 48)
    img(root / "train/vid0.mp4/0000000.png", 64, 48)
    (root / "train/vid0.mp4/notes.txt").write_text("not an image")
    img(root / "train/stray.png", 64, 48)  # not inside a video folder: ImageFolder ignores it
    for name in ("b.png", "a.png"):
        img(root / "eval_images/taichi-256/train" / name, 64, 48)
    img(root / "eval_images/taichi-256/test/c.png", 64, 48)
    reg = RNG.uniform(0, 47, (2, 18, 2))
    reg[0, 3] = -1  # a missing joint
    write_taichi_pickle(root / "landmark/taichi_train_gt.pkl", ["b.png", "a.png"], reg, style)
    test = RNG.uniform(0, 47, (1, 18, 2))
    write_taichi_pickle(root / "landmark/taichi_test_gt.pkl", ["c.png"], test, style)
    return reg, test


@pytest.mark.parametrize("style", ["0.14.1", "reduce"])
def test_taichi_layout_reads_the_pandas_pickle_without_pandas(tmp_path, style):
    root = tmp_path / "taichi"
    reg, test = make_taichi(root, style)
    had_pandas = "pandas" in sys.modules
    m = build_manifest("taichi", root, progress=False)
    assert had_pandas or "pandas" not in sys.modules  # nothing imported pandas
    assert m.paths[:3] == ["train/vid0.mp4/0000000.png", "train/vid1.mp4/0000000.png", "train/vid1.mp4/0000001.png"]
    assert m.splits == ["train"] * 3 + ["regress"] * 2 + ["test"]
    assert m.paths[3:] == ["eval_images/taichi-256/train/b.png", "eval_images/taichi-256/train/a.png",
                           "eval_images/taichi-256/test/c.png"]  # pickle order, as AutoLink
    assert m.split("train").tolist() == [0, 1, 2] and m.split("regress").tolist() == [3, 4]
    assert m.split("test").tolist() == [5]
    assert np.isnan(m.keypoints[:3]).all()
    assert np.isnan(m.keypoints[3, 3]).all()  # -1 -> NaN in both components
    np.testing.assert_allclose(m.keypoints[3, 4], reg[0, 4], rtol=1e-6)  # already (x, y) pixels
    np.testing.assert_allclose(m.keypoints[5], test[0], rtol=1e-6)
    assert m.mask_paths is None and m.hflip is True and m.n_joints == 18


def test_taichi_missing_coordinates_stay_separate_as_in_autolink(tmp_path):
    """A -1 in one coordinate hides that coordinate only: the protocol (per-coordinate fits) then gets the same
    numbers from the manifest as AutoLink gets from the raw pickle values."""
    from dkp_core.metrics import taichi_mae

    root = tmp_path / "taichi"
    make_taichi(root)
    rng = np.random.default_rng(5)
    n_reg, n_test = 40, 12
    names = {"regress": [f"r{i}.png" for i in range(n_reg)], "test": [f"t{i}.png" for i in range(n_test)]}
    raw = {part: rng.uniform(0, 255, (len(names[part]), 18, 2)) for part in names}
    for part, (i, j, c) in (("regress", (0, 3, 0)), ("regress", (5, 7, 1)), ("test", (2, 3, 1)), ("test", (4, 9, 0))):
        raw[part][i, j, c] = -1  # one coordinate missing, the other known
    raw["test"][6, 11] = -1  # a whole joint missing
    for part, sub, gt in (("regress", "train", "taichi_train_gt.pkl"), ("test", "test", "taichi_test_gt.pkl")):
        for name in names[part]:
            img(root / f"eval_images/taichi-256/{sub}" / name, 256, 256)
        write_taichi_pickle(root / "landmark" / gt, names[part], raw[part])
    m = build_manifest("taichi", root, progress=False)
    reg, test = m.split("regress"), m.split("test")
    kp_reg, kp_test = m.keypoints[reg], m.keypoints[test]
    assert np.isnan(kp_reg[0, 3, 0]) and kp_reg[0, 3, 1] == np.float32(raw["regress"][0, 3, 1])
    assert np.isnan(kp_test[2, 3, 1]) and kp_test[2, 3, 0] == np.float32(raw["test"][2, 3, 0])
    assert np.isnan(kp_test[6, 11]).all()
    assert int(np.isnan(m.keypoints[np.concatenate([reg, test])]).sum()) == 4 + 2
    det_reg, det_test = rng.uniform(0, 255, (n_reg, 10, 2)), rng.uniform(0, 255, (n_test, 10, 2))
    ours = taichi_mae(det_reg, kp_reg, det_test, kp_test, 256).value
    autolink = taichi_mae(det_reg, raw["regress"], det_test, raw["test"], 256).value  # -1 codes, per coordinate
    assert ours == pytest.approx(autolink, rel=1e-6)
    whole = [np.where(np.isnan(k).any(axis=2, keepdims=True), np.nan, k) for k in (kp_reg, kp_test)]
    assert abs(taichi_mae(det_reg, whole[0], det_test, whole[1], 256).value - autolink) > 1e-3  # the old reading


def test_taichi_test_masks_are_listed_when_present(tmp_path):
    root = tmp_path / "taichi"
    make_taichi(root)
    img(root / "taichi-test-masks/c.png", 64, 48)
    m = build_manifest("taichi", root, progress=False)
    assert m.mask_paths == [None] * 5 + ["taichi-test-masks/c.png"]


def test_taichi_plain_dict_pickle_is_accepted(tmp_path):
    root = tmp_path / "taichi"
    make_taichi(root)
    vals = RNG.uniform(0, 40, (1, 18, 2))
    (root / "landmark/taichi_test_gt.pkl").write_bytes(pickle.dumps({"file_name": ["c.png"], "value": [vals[0]]}))
    m = build_manifest("taichi", root, progress=False)
    np.testing.assert_allclose(m.keypoints[-1], vals[0], rtol=1e-6)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_taichi_pickle_that_names_code_is_refused_and_never_runs(tmp_path):
    root = tmp_path / "taichi"
    make_taichi(root)
    target = tmp_path / "pwned"
    (root / "landmark/taichi_train_gt.pkl").write_bytes(pickle.dumps(_Evil(str(target))))
    with pytest.raises(ManifestError, match="taichi_train_gt.pkl unreadable.*refusing to load global"):
        build_manifest("taichi", root, progress=False)
    assert not target.exists()


def test_taichi_errors(tmp_path):
    root = tmp_path / "taichi"
    make_taichi(root)
    write_taichi_pickle(root / "landmark/taichi_test_gt.pkl", ["missing.png"], np.zeros((1, 18, 2)))
    with pytest.raises(ManifestError, match="frame 'eval_images/taichi-256/test/missing.png' not found"):
        build_manifest("taichi", root, progress=False)
    write_taichi_pickle(root / "landmark/taichi_test_gt.pkl", ["c.png"], np.full((1, 18, 2), 300.0))
    with pytest.raises(ManifestError, match="outside the 64x48 frame"):
        build_manifest("taichi", root, progress=False)
    write_taichi_pickle(root / "landmark/taichi_test_gt.pkl", ["c.png", "c.png"], np.zeros((2, 18, 2)))
    with pytest.raises(ManifestError, match="duplicate frame id"):
        build_manifest("taichi", root, progress=False)
    os.remove(root / "landmark/taichi_test_gt.pkl")
    with pytest.raises(ManifestError, match="GT file 'landmark/taichi_test_gt.pkl' not found"):
        build_manifest("taichi", root, progress=False)


# --------------------------------------------------------------------------------------------------
# DeepFashion


def make_deepfashion(root, n_train=3, n_test=1):
    files = {"train": [], "test": []}
    for part, n in (("train", n_train), ("test", n_test)):
        entries = []
        for i in range(n):
            rel = f"{'MEN' if i % 2 else 'WOMEN'}/Denim/id_{i:08d}/0{i}_1_{part}.jpg"
            img(root / "img" / rel, 48, 64)  # W=48, H=64
            files[part].append(rel)
            entries.append({"image_path": rel, "train": part == "train",
                            "keypoints": RNG.uniform(0, 47, (17, 2)).tolist(), "person_id": i})
        (root / f"data_{part}.csv").write_text("id,filename\n" + "".join(f"{i},{f}\n" for i, f in enumerate(files[part])))
        (root / f"data_{part}.json").write_text(json.dumps(entries))
    return files


def test_deepfashion_layout(tmp_path):
    root = tmp_path / "df"
    files = make_deepfashion(root)
    m = build_manifest("deepfashion", root, progress=False)
    assert len(m) == 4 and m.split("train").tolist() == m.split("regress").tolist() == [0, 1, 2]
    assert m.split("test").tolist() == [3] and m.hflip is False and m.protocol == "deepfashion"
    assert m.paths[0] == "img/" + files["train"][0] and m.sizes[0].tolist() == [48, 64]
    entries = json.loads((root / "data_train.json").read_text())
    np.testing.assert_allclose(m.keypoints[1], entries[1]["keypoints"], rtol=1e-6)  # (x, y) kept


def test_deepfashion_errors(tmp_path):
    root = tmp_path / "df"
    make_deepfashion(root)
    (root / "data_test.csv").write_text("id,filename\n0,../outside.jpg\n")
    with pytest.raises(ManifestError, match="escapes the root"):
        build_manifest("deepfashion", root, progress=False)
    (root / "data_test.csv").write_text("id,filename\n0,MEN/x.jpg\n1,MEN/y.jpg\n")
    with pytest.raises(ManifestError, match="data_test.json' has 1 entries but 'data_test.csv' has 2 rows"):
        build_manifest("deepfashion", root, progress=False)
    (root / "data_test.csv").write_text("id,filename\n0,MEN/x.jpg\n")
    with pytest.raises(ManifestError, match="frame 'img/MEN/x.jpg' not found under root"):
        build_manifest("deepfashion", root, progress=False)
    (root / "data_test.json").write_text("[{")
    with pytest.raises(ManifestError, match="data_test.json' unreadable"):
        build_manifest("deepfashion", root, progress=False)
    (root / "data_test.csv").write_text("idx;filename\n")
    with pytest.raises(ManifestError, match="expected the header 'id,filename'"):
        build_manifest("deepfashion", root, progress=False)
    os.remove(root / "data_train.csv")
    with pytest.raises(ManifestError, match="split file 'data_train.csv' not found"):
        build_manifest("deepfashion", root, progress=False)


def test_manifest_of_what_synth_writes(tmp_path, caplog):
    synth = pytest.importorskip("pipeline.data.synth")
    out = tmp_path / "s"
    synth.write_synthetic(out, n=6, seed=0, image_size=32, progress=False, clip_length=2, test_fraction=0.34)
    with caplog.at_level("WARNING", logger="pipeline.data.spec"):
        m = build_manifest("synthetic", out, progress=False)
    assert "not dataset options" not in caplog.text  # synth's own keys are understood
    assert len(m) == 6 and m.depth_options == {"kind": "depth", "scale": 1.0}
    assert m.sizes.tolist() == [[32, 32]] * 6 and m.n_joints == m.spec.n_joints
    assert len(m.split("test")) >= 1 and len(m.split("train")) + len(m.split("test")) == 6
    assert m.depth_fingerprint.startswith("xxh3:") and "synthetic" in m.spec.extra


def test_every_layout_has_one_registered_walker():
    from pipeline.data.layouts import WALKERS
    from pipeline.data.spec import LAYOUTS

    assert sorted(WALKERS) == sorted(LAYOUTS)
    assert all(w.__module__ == f"pipeline.data.layouts.{name}" for name, w in WALKERS.items())
