"""``bench gpu``: the record's ratios and goals, and the record as markdown tables (docs/benchmarks.md's GPU section)."""
from __future__ import annotations

from typing import Any, Optional

from pipeline.bench.depth import DEPTH_GOALS
from pipeline.bench.harness import ratio, speed

GOALS_CUDA = {"frames_per_s stage/bare_model": 0.95, "frames_per_s stage/run_py_loop": 4.0}
BEIT_L_GOAL_FPS = 300.0  # dpt_beit_large_512, bf16, one H200
AMP_GOAL = 1.5  # training steps/s AMP / fp32
DATA_GOAL = 3.0  # samples/s the trainer's DataLoader delivers / samples/s the paper's fp16 step consumes (issue 23)
SYNC_GOAL = 1.0  # host reads (CUDA syncs) of the trainer's loop per log_every steps, at most (issue 23)


def ratios_and_goals(cases: dict, models, device, p_stage: str, b_stage: int,
                     frame_sizes=(1000,)) -> tuple[dict, dict, dict]:
    """The record's ratios, goals and, per model and frame size, ``limits``: the ceilings the stage runs under
    (the bare model, the data side with the stage's workers, the writer), the lowest named, beside what the
    stage's own record says held it back."""
    def fps(name: str) -> Optional[float]:
        c = cases.get(name) or {}
        return c.get("frames_per_s")

    ratios: dict[str, Optional[float]] = {}
    goals: dict[str, dict] = {}
    limits: dict[str, dict] = {}
    goal_values = GOALS_CUDA if device.type == "cuda" else DEPTH_GOALS["cpu"]
    cuda = device.type == "cuda"
    for m in models:
        bare = fps(f"{m}/bare/{p_stage}/b{b_stage}")
        for fs in frame_sizes:
            pre = f"{m}/{fs}"
            for setting in ("best", "defaults"):
                ratios[f"{pre} frames_per_s stage_{setting}/bare_model"] = ratio(fps(f"{m}/stage/{fs}/{setting}"), bare)
            ratios[f"{pre} frames_per_s stage_defaults/stage_best"] = ratio(fps(f"{m}/stage/{fs}/defaults"),
                                                                            fps(f"{m}/stage/{fs}/best"))
            ds = cases.get(f"{m}/data_side/{fs}") or {}
            ceilings = {"model": bare, "data side": fps(f"{m}/loader/{fs}"), "writer": fps(f"{m}/writer/{fs}")}
            if cuda and ds.get("device_frames_per_s"):  # device preprocessing: the device's decode + resize too
                ceilings["device decode"] = ds["device_frames_per_s"]
            for k, v in ceilings.items():
                if k != "model":
                    ratios[f"{pre} frames_per_s {k.replace(' ', '_')}/bare_model"] = ratio(v, bare)
            known = {k: v for k, v in ceilings.items() if v}
            best = cases.get(f"{m}/stage/{fs}/best") or {}
            limits[pre] = {"ceilings_frames_per_s": {k: (round(v, 1) if v else None) for k, v in ceilings.items()},
                           "lowest": min(known, key=known.get) if known else None,
                           "stage_best_says": best.get("limit"), "stage_defaults_says":
                           (cases.get(f"{m}/stage/{fs}/defaults") or {}).get("limit")}
            key = "frames_per_s stage/bare_model"
            if key in goal_values:
                v = ratios[f"{pre} frames_per_s stage_best/bare_model"]
                goals[f"{pre} {key}"] = {"goal": goal_values[key], "value": v, "met": v is not None and
                                         v >= goal_values[key], "via": "stage/best", "limit": limits[pre]["lowest"]}
        rp = fps(f"{m}/run_py_loop")
        fs = (cases.get(f"{m}/run_py_loop") or {}).get("frame_size", frame_sizes[-1])
        ratios[f"{m}/{fs} frames_per_s stage_best/run_py_loop"] = ratio(fps(f"{m}/stage/{fs}/best"), rp)
        key = "frames_per_s stage/run_py_loop"
        v = ratios[f"{m}/{fs} frames_per_s stage_best/run_py_loop"]
        goals[f"{m}/{fs} {key}"] = {"goal": goal_values[key], "value": v, "met": v is not None and v >= goal_values[key],
                                    "via": "stage/best"}
        ratios[f"{m} workers needed for the bare model"] = ratio(
            bare, (cases.get(f"{m}/data_side/{frame_sizes[-1]}") or {}).get("cpu_frames_per_s_per_worker"))
    if cuda and "dpt_beit_large_512" in models:
        m = "dpt_beit_large_512"
        for fs in frame_sizes:
            v = fps(f"{m}/stage/{fs}/best")
            goals[f"{m}/{fs} stage frames_per_s ({p_stage})"] = {"goal": BEIT_L_GOAL_FPS, "value": v,
                                                                "met": v is not None and v >= BEIT_L_GOAL_FPS}
    pairs = [("teach steps_per_s amp/fp32", "teach/amp", "teach/fp32"),
             ("paper steps_per_s fp16/fp32", "paper/fp16", "paper/fp32")]
    pairs += [(f"distill {mode} steps_per_s amp/fp32", f"distill/{mode}/amp", f"distill/{mode}/fp32")
              for mode in ("live", "cached")]
    pairs += [(f"distill {a} steps_per_s cached/live", f"distill/cached/{a}", f"distill/live/{a}")
              for a in ("fp32", "amp")]
    for key, a, b in pairs:
        ca, cb = cases.get(a) or {}, cases.get(b) or {}
        ratios[key] = ratio(speed(ca), speed(cb)) if "interleaved" in ca and "interleaved" in cb else None
        if device.type == "cuda" and ("amp/fp32" in key or "fp16/fp32" in key):
            goals[key] = {"goal": AMP_GOAL, "value": ratios[key], "met": ratios[key] is not None
                          and ratios[key] >= AMP_GOAL}
    # the data side against the GPU's demand: samples/s the DataLoader delivers / samples/s the paper's step uses
    data, demand = cases.get("data") or {}, cases.get("paper/fp16") or {}
    key = "data samples_per_s / paper fp16 samples_per_s"
    ratios[key] = (ratio(data["samples_per_s"], speed(demand) * data["batch"])
                   if "samples_per_s" in data and "interleaved" in demand else None)
    if device.type == "cuda":
        goals[key] = {"goal": DATA_GOAL, "value": ratios[key], "met": ratios[key] is not None
                      and ratios[key] >= DATA_GOAL, "via": f"{data.get('workers')} workers"}
    syncs = cases.get("syncs") or {}
    for key, field in (("trainer host reads per log interval (project code)", "host_reads_per_log_interval"),
                       ("trainer CUDA syncs per log interval", "cuda_syncs_per_log_interval")):
        if field == "cuda_syncs_per_log_interval" and device.type != "cuda":
            continue
        v = syncs.get(field)
        ratios[key] = v
        goals[key] = {"goal": SYNC_GOAL, "op": "<=", "value": v, "met": v is not None and v <= SYNC_GOAL}
    return ratios, goals, limits


# --------------------------------------------------------------------------------------------------------- markdown
def _f(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 10 ** nd else f"{v:.0f}"
    return str(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_f(v) for v in r) + " |" for r in rows]


def gpu_markdown(rec: dict) -> str:
    """The record of ``bench gpu`` as markdown tables (what docs/benchmarks.md's GPU section shows)."""
    st, cases = rec["setup"], rec["cases"]
    out = [f"## bench gpu: {rec['device_name']} ({rec['device']}), torch {rec['torch']}, {rec['time']}", "",
           f"{rec['wall_s']} s of a {rec['budget']['budget_s']:.0f} s budget (estimated >= "
           f"{rec['budget']['estimate_lower_bound_s']} s); stage precision {st['stage_precision']}, batch "
           f"{st['stage_batch']}, {st['num_workers']} workers; {st['frames']} frames of each of "
           f"{', '.join(f'{fs}x{fs}' for fs in st['frame_sizes'])} ({st['frame_format']}); TF32 {st['tf32']}. Peak "
           f"memory: "
           f"torch.cuda.max_memory_allocated per case on CUDA; on a CPU the process's peak RSS (not per case).", ""]
    for m in st["models"]:
        rows = []
        for name, c in cases.items():
            if name.startswith(f"{m}/bare/"):
                d = c.get("vs_fp32") or {}
                rows.append([name[len(m) + 1:], c.get("precision"), c.get("batch"), c.get("memory_format"),
                             c.get("compile"), c.get("frames_per_s"), c.get("tflops_per_s"), c.get("peak_mem_mib"),
                             d.get("max_rel"), d.get("mean_rel"), c.get("compile_s"), c.get("error")])
        if rows:
            out += [f"### {m}: bare model ({st['flops_per_frame'][m] / 1e9:.1f} GFLOP/frame)", ""]
            out += _table(["case", "precision", "batch", "format", "compile", "frames/s", "TFLOP/s", "peak MiB",
                           "max rel vs fp32", "mean rel vs fp32", "compile s", "error"], rows) + [""]
    rows = []
    for m in st["models"]:
        bare = (cases.get(f"{m}/bare/{st['stage_precision']}/b{st['stage_batch']}") or {}).get("frames_per_s")
        for fs in st["frame_sizes"]:
            sb, sd = (cases.get(f"{m}/stage/{fs}/{k}") or {} for k in ("best", "defaults"))
            lim = (rec.get("limits") or {}).get(f"{m}/{fs}") or {}
            ceil = lim.get("ceilings_frames_per_s") or {}
            util = (sb.get("gpu_utilisation") or {}).get("mean_pct")
            rows.append([m, fs, bare, ceil.get("data side"), ceil.get("writer"), ceil.get("device decode"),
                         sb.get("frames_per_s"), sd.get("frames_per_s"), sd.get("batch"), sd.get("num_workers"),
                         rec["ratios"].get(f"{m}/{fs} frames_per_s stage_best/bare_model"),
                         rec["ratios"].get(f"{m}/{fs} frames_per_s stage_defaults/bare_model"), lim.get("lowest"),
                         sb.get("limit"), sb.get("fetches_per_batch"), util, sb.get("peak_mem_mib")])
    out += ["### depth stage: ceilings, the stage at its best settings and at the user's defaults (frames/s)", ""]
    out += _table(["model", "frame", "bare model", "data side", "writer", "device decode", "stage best",
                   "stage defaults", "defaults' batch", "defaults' workers", "best/bare", "defaults/bare",
                   "lowest ceiling", "stage says", "waits/batch", "GPU util %", "peak MiB"], rows) + [""]
    rows = []
    for m in st["models"]:
        rp = cases.get(f"{m}/run_py_loop") or {}
        fs = rp.get("frame_size", st["frame_sizes"][-1])
        rows.append([m, fs, rp.get("frames_per_s"), (cases.get(f"{m}/stage/{fs}/best") or {}).get("frames_per_s"),
                     rec["ratios"].get(f"{m}/{fs} frames_per_s stage_best/run_py_loop")])
    out += ["### depth stage vs MiDaS run.py's loop (frames/s)", ""]
    out += _table(["model", "frame", "run.py", "stage best", "stage/run.py"], rows) + [""]
    rows = []
    for m in st["models"]:
        for fs in st["frame_sizes"]:
            ds = cases.get(f"{m}/data_side/{fs}") or {}
            if ds and "error" not in ds:
                rows.append([m, fs, ds["read_ms"], ds["decode_ms"], ds["cpu_preprocess_old_ms"], ds["cpu_preprocess_ms"],
                             ds["cpu_new_equals_old"], ds["cpu_old_frames_per_s_per_worker"],
                             ds["cpu_frames_per_s_per_worker"], ds["device_frames_per_s"],
                             (ds.get("device_vs_cpu_depth_fp32") or {}).get("max_rel"),
                             (ds.get("device_vs_cpu_depth_fp32") or {}).get("mean_rel")])
    out += ["### data side alone (one worker = one core; device: decode + resize on the device)", ""]
    out += _table(["model", "frame", "read ms", "decode ms", "preprocess old ms", "preprocess ms", "bit-identical",
                   "old frames/s/worker", "frames/s/worker", "device frames/s", "depth max rel (device vs cpu)",
                   "depth mean rel"], rows) + [""]
    rows = [[n, c.get("amp"), c.get("recon_loss"), speed(c) if "interleaved" in c else None, c.get("peak_mem_mib"),
             c.get("host_reads_project"), c.get("cuda_syncs"), c.get("error")]
            for n, c in cases.items() if n.split("/")[0] in ("teach", "paper", "distill")]
    out += [f"### training steps/s (width {st['train']['width']}, {st['train']['size']} px, batch "
            f"{st['train']['batch']}; interleaved; host reads / CUDA syncs of one step)", ""]
    out += _table(["case", "amp", "loss", "steps/s", "peak MiB", "host reads", "CUDA syncs", "error"], rows) + [""]
    sy, da = cases.get("syncs") or {}, cases.get("data") or {}
    out += ["### the trainer's loop and its data side", ""]
    out += _table(["case", "what", "value"], [
        ["syncs", f"host reads (project) in {sy.get('steps')} steps, log_every {sy.get('log_every')}",
         sy.get("host_reads_project")],
        ["syncs", "CUDA syncs per log interval", sy.get("cuda_syncs_per_log_interval")],
        ["syncs", "trainer steps/s", sy.get("steps_per_s")],
        ["data", f"samples/s, {da.get('workers')} workers, batch {da.get('batch')}", da.get("samples_per_s")],
        ["data", "samples/s per worker", da.get("samples_per_s_per_worker")]]) + [""]
    out += ["### ratios and goals", ""]
    out += _table(["ratio", "value"], [[k, v] for k, v in rec["ratios"].items() if v is not None]) + [""]
    out += _table(["goal", "target", "value", "met"], [[k, f"{g.get('op', '>=')} {g['goal']}", g["value"], g["met"]]
                                                       for k, g in rec.get("goals", {}).items()]) + [""]
    log = rec["budget"]["log"]
    out += ["### budget: estimate vs actual per case", ""]
    out += _table(["part", "case", "estimate s", "actual s", "skipped / error"],
                  [[r["part"], r["case"], r.get("estimate_s"), r.get("actual_s"), r.get("skipped") or r.get("error")]
                   for r in log]) + [""]
    return "\n".join(out)
