"""`dkp-pipeline bench frames` and `bench scale` (issue 23) at tiny sizes: the record's cases, ratios and goals.
What they measure is written in docs/benchmarks.md; no time is asserted here."""
import json

import pytest

from pipeline.bench import run_bench
from pipeline.bench.scale import MARKER, write_folder_dataset
from pipeline.data.build import build_manifest
from tests.conftest import quiet_console


def test_bench_frames_record(tmp_path):
    rec = run_bench("frames", batch=4, size=16, steps=1, frames=8, rounds=1)
    sources = ("jpeg128", "png256", "jpeg1000")
    assert set(rec["cases"]) == {f"{s}/{k}/{w}" for s in sources for k in ("rgb", "depth") for w in ("before", "after")}
    for c in rec["cases"].values():
        assert c["samples_per_s"] > 0 and c["ms_per_sample"] == pytest.approx(1000 / c["samples_per_s"])
    assert len(rec["ratios"]) == 6 and all(v > 0 for v in rec["ratios"].values())
    assert all(g["goal"] == 5000 and isinstance(g["met"], bool) for g in rec["goals"].values())
    assert rec["builds"]["jpeg128/rgb"]["bytes_per_frame"] == 3 * 16 * 16
    assert rec["builds"]["png256/depth"]["bytes_per_frame"] == 4 * 16 * 16


def test_scale_dataset_is_a_valid_folder_dataset(tmp_path):
    root = tmp_path / "d"
    write_folder_dataset(root, 25, depth=True)
    m = build_manifest("folder", root, progress=False)
    assert len(m) == 25 and len(m.split("test")) == 3 and m.depth_paths is not None
    assert len(set(m.fingerprints)) == 25  # every frame unique
    assert json.loads((root / MARKER).read_text()) == {"frames": 25, "depth": True, "generator": 1}


def test_bench_scale_record_and_reuse_of_kept_datasets(tmp_path):
    rec = run_bench("scale", batch=1, size=16, steps=1, scale_frames=[20, 40, 60], depth=True, work=str(tmp_path),
                    console=quiet_console())
    for n in (20, 40, 60):
        for c in ("manifest_first", "status_noop", "run_noop", "depth_import"):
            case = rec["cases"][f"{c}@{n}"]
            assert case["seconds"] > 0 and case["peak_rss_mib"] > 0 and case["frames"] == n
    assert "status_noop marginal s_per_frame last/first interval" in rec["ratios"]
    assert set(rec["marginal_us_per_frame"]) == {f"{c} {a}" for c in ("manifest_first", "status_noop", "run_noop",
                                                                       "depth_import") for a in ("20->40", "40->60")}
    assert all(c["cpu_s"] > 0 for c in rec["cases"].values())
    assert {g["op"] for g in rec["goals"].values()} == {"<="}
    # --work keeps the datasets (not the stores nor the memos), and a second run reuses them
    assert (tmp_path / "n20-depth" / "data" / MARKER).exists() and not (tmp_path / "n20-depth" / "store").exists()
    again = run_bench("scale", batch=1, size=16, steps=1, scale_frames=[20], depth=False, work=str(tmp_path))
    assert again["points"][0]["generate"].get("reused") is None  # no depth files there: another dataset
    third = run_bench("scale", batch=1, size=16, steps=1, scale_frames=[20], depth=False, work=str(tmp_path))
    assert third["points"][0]["generate"]["reused"] is True


def test_bench_scale_refuses_bad_sizes():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="frame counts >= 10"):
        run_bench("scale", batch=1, size=16, steps=1, scale_frames=[5])
