"""Human3.6M without background (`human36m_wobg`): every model input is multiplied by the frame's mask.

AutoLink's h36m_wobg computes ``Normalize(0.5, 0.5)(ToTensor(img)) * ToTensor(mask)`` in its train, regress
and test sets; the reference below is that torchvision pipeline, on the same decoded pixels.
"""
import cv2
import numpy as np
import pytest
import torch

from pipeline.data.build import build_manifest
from pipeline.data.spec import load_spec
from pipeline.data.datasets import FrameDataset, normalise_inverse_depth
from pipeline.errors import ManifestError
from tests.test_manifest import _age, make_h36m

S = 128  # the release's frame size, which is AutoLink's image_size: no resize on either side


def _mask(rng, h=S, w=S, channels=1):
    """Background 0, a figure of 255, and a strip of values in between (a soft edge must not be thresholded)."""
    m = np.zeros((h, w, channels), np.uint8)
    m[20:100, 40:90] = 255
    m[20:100, 90:94] = rng.integers(1, 255, (80, 4, channels), dtype=np.uint8)
    return m[:, :, 0] if channels == 1 else m


class RampDepth:
    """Depth cache stand-in: a left-to-right ramp of inverse depth, different per frame."""

    def read(self, i):
        return np.broadcast_to(np.linspace(0.0, 1.0 + i, S, dtype=np.float32), (S, S)).copy()

    def is_valid(self, i):
        return True


@pytest.fixture
def wobg(tmp_path):
    root = tmp_path / "human_images"
    make_h36m(root, w=S, h=S, wobg=True)
    rng = np.random.default_rng(1)
    m = build_manifest("human36m_wobg", root, progress=False)
    for i, rel in enumerate(m.mask_paths):  # a real mask per frame; the first RGB, as a colour PNG may be
        assert cv2.imwrite(str(root / rel), _mask(rng, channels=3 if i == 0 else 1))
        _age(root / rel)
    return build_manifest("human36m_wobg", root, progress=False)


def _autolink_input(frame_rgb: np.ndarray, mask_path) -> torch.Tensor:
    """(3, S, S): what AutoLink's h36m_wobg returns as 'img' for these decoded frame pixels and this mask file."""
    from PIL import Image
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize(S), transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    return t(Image.fromarray(frame_rgb)) * transforms.ToTensor()(Image.open(mask_path))


@pytest.mark.parametrize("split", ["train", "regress", "test"])
def test_rgb_is_masked_exactly_as_autolink_does(wobg, split):
    from pipeline.data.images import read_rgb

    assert wobg.apply_masks
    ds = FrameDataset(manifest=wobg, indices=wobg.split(split), image_size=S, use_rgb=True, use_depth=False)
    for j, m in enumerate(wobg.split(split)):
        mask_path = wobg.root / wobg.mask_paths[m]
        want = _autolink_input(read_rgb(wobg.path_of(m)), mask_path)
        got = ds[j]["rgb"]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        outside = torch.from_numpy(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) == 0)
        assert outside.any() and (got[:, outside] == 0).all()  # background: exactly 0 (mid-grey) in every channel
        assert (got[:, ~outside] != 0).any()


def test_depth_is_masked_after_its_normalisation_and_flips_with_the_rgb(wobg):
    from pipeline.data.images import read_mask

    idx = wobg.split("train")
    ds = FrameDataset(manifest=wobg, indices=idx, image_size=S, use_rgb=True, use_depth=True,
                      depth_reader=RampDepth())
    for j, m in enumerate(idx):
        factor = torch.from_numpy(read_mask(wobg.root / wobg.mask_paths[m]).transpose(2, 0, 1))
        plain = torch.from_numpy(normalise_inverse_depth(RampDepth().read(int(m)))).expand(3, S, S)
        torch.testing.assert_close(ds[j]["depth"], plain * factor, atol=1e-6, rtol=0)
        flipped = ds.load(j, True)
        torch.testing.assert_close(flipped["depth"], ds[j]["depth"].flip(-1))
        torch.testing.assert_close(flipped["rgb"], ds[j]["rgb"].flip(-1))


def test_without_background_variant_masks_and_with_background_does_not(wobg):
    plain = build_manifest("human36m", wobg.root, progress=False)
    assert not plain.apply_masks and plain.mask_paths is None
    a = FrameDataset(manifest=plain, indices=[0], image_size=S, use_rgb=True, use_depth=False)[0]["rgb"]
    b = FrameDataset(manifest=wobg, indices=[0], image_size=S, use_rgb=True, use_depth=False)[0]["rgb"]
    assert (a != 0).float().mean() > 0.9 and (b == 0).float().mean() > 0.5


def test_masks_are_in_the_keys_of_the_stages_that_read_them(wobg, tmp_path):
    from pipeline.store.artifacts import Store
    from pipeline.config import load_config
    from pipeline.graph import build_plan

    def keys():
        cfg = load_config("human36m_wobg", [f"data.root={wobg.root}"])
        plan = build_plan(cfg, Store(tmp_path / "store"), progress=False)
        return {name: sp.key for name, sp in plan.stages.items()}

    before = keys()
    rel = wobg.mask_paths[-1]
    m = cv2.imread(str(wobg.root / rel), cv2.IMREAD_UNCHANGED)
    m[0, 0] = 255 - m[0, 0]
    cv2.imwrite(str(wobg.root / rel), m)
    after = keys()
    # MiDaS runs on the whole frame, so the depth cache does not depend on masks (the manifest, which lists
    # everything, does)
    assert before["depth"] == after["depth"] and before["manifest"] != after["manifest"]
    for stage in ("teach", "distill", "eval"):
        assert before[stage] != after[stage], stage


def test_mask_problems_are_named(wobg, tmp_path):
    from pipeline.data.images import read_mask

    rel = wobg.mask_paths[0]
    cv2.imwrite(str(wobg.root / rel), np.zeros((S, S - 1), np.uint8))
    with pytest.raises(ManifestError, match=f"mask '{rel}' is 127x128 but its frame .* is 128x128"):
        build_manifest("human36m_wobg", wobg.root, progress=False)
    p = tmp_path / "m16.png"
    cv2.imwrite(str(p), np.zeros((4, 4), np.uint16))
    with pytest.raises(ManifestError, match="m16.png: uint16 .* expected an 8-bit gray or RGB PNG"):
        read_mask(p)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ManifestError, match="empty.png: missing, empty or not a decodable image"):
        read_mask(tmp_path / "empty.png")
    import data_manifests

    y = tmp_path / "no_masks.yaml"
    y.write_text(data_manifests.yaml_path("human36m").read_text() + "apply_masks: true\n")
    with pytest.raises(ManifestError, match="apply_masks: true but not every frame has a mask"):
        build_manifest(str(y), wobg.root, progress=False)
    y.write_text(data_manifests.yaml_path("human36m").read_text() + "apply_masks: 1\n")
    with pytest.raises(ManifestError, match="'apply_masks' must be true or false"):
        build_manifest(str(y), wobg.root, progress=False)


def test_descriptions_that_do_not_mask_keep_their_identity():
    # apply_masks only enters a description (and so every artifact key) where it is set
    assert "apply_masks" not in load_spec("human36m").to_dict()
    assert load_spec("human36m_wobg").to_dict()["apply_masks"] is True
