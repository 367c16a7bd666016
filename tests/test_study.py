"""fluid_ops.study: the quick study end to end (outputs, protocol equal across variants, resume,
refusal of another protocol), the power-law fit, the seed-spread check, and bad arguments."""
from __future__ import annotations

import json
import math

import pytest

from fluid_ops import study as S
from fluid_ops.cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    res = S.run_study(out, quick=True, jobs=1, progress=False)
    return out, res


def _strip_variant(cfg: dict) -> dict:
    """A run's config without what the variant is allowed to change."""
    c = json.loads(json.dumps(cfg))
    for k in ("token_kind", "order"):
        c.pop(k)
    c["image"].pop("tokenizer")    # pixel patches (continuous) / k-means codes (discrete)
    c.pop("sampling")              # the paper's per-variant CFG / temperature, checked below
    return c


def test_quick_study_writes_every_output(quick):
    out, res = quick
    for name in ("study.json", "table.md", "protocol.json", "score_vs_steps.png", "score_per_category.png",
                 "val_loss_vs_params.png", "score_vs_params.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["complete"] and set(on_disk["summary"]) == set(S.VARIANTS)
    p = on_disk["protocol"]
    cats = p["eval"]["categories"]
    assert len(cats) == 6 and set(p["data"]["kinds"]) == {"single", "two", "count", "position", "attribution"}
    for v, s in on_disk["summary"].items():
        assert s["seeds"] == p["seeds"] and len(p["seeds"]) >= 2
        assert set(s["categories"]) == set(cats)
        assert all(0 <= s["categories"][c]["mean"] <= 1 for c in cats)
        assert len(s["curve"]) == len(p["eval"]["fractions"])
    for r in on_disk["runs"].values():
        fr = p["eval"]["fractions"] if r["width"] == p["model"]["base_width"] else p["scaling"]["eval_fractions"]
        assert [e["step"] for e in r["evals"]] == sorted({round(f * p["train"]["steps"]) for f in fr})
        assert r["steps"] == p["train"]["steps"] and r["params"] > 0 and r["precision"] in ("fp32", "bf16")
        assert all(math.isfinite(e["val_loss"]) for e in r["evals"])
    assert on_disk["best_discrete"] in ("discrete-random", "discrete-raster")
    assert set(on_disk["scaling"]) == {"continuous-random", "continuous-raster", on_disk["best_discrete"]}
    for s in on_disk["scaling"].values():
        assert len(s["points"]) == len(p["scaling"]["widths"]) >= 2
        assert math.isfinite(s["fit"]["alpha"])
    assert isinstance(on_disk["machine"]["cpu_simd_flags"], list) and on_disk["machine"]["cpu"]
    assert on_disk["total"]["cpu_seconds"] > 0 and "overall" in (out / "table.md").read_text()


def test_protocol_is_the_same_across_variants_but_token_kind_and_order(quick):
    out, res = quick
    runs = res["runs"]
    base, seed = res["protocol"]["model"]["base_width"], res["protocol"]["seeds"][0]
    cfgs = {v: runs[f"{v}-w{base}-s{seed}"]["config"] for v in S.VARIANTS}
    ref = _strip_variant(cfgs["continuous-random"])
    for v, c in cfgs.items():
        assert _strip_variant(c) == ref, v
        assert (c["token_kind"], c["order"]) == S.VARIANTS[v][:2]
    # sampling: the paper's per variant, the null text for all, never the demo's tuned setting
    from fluid_ops.models.fluid_config import PAPER_SAMPLING
    for v, c in cfgs.items():
        s = c["sampling"]
        assert (s["cfg"], s["temperature"]) == PAPER_SAMPLING[S.VARIANTS[v][:2]] and s["cfg_uncond"] == "text"
    assert cfgs["continuous-random"]["sampling"]["num_diffusion_steps"] == \
        cfgs["continuous-raster"]["sampling"]["num_diffusion_steps"]
    # same steps, seeds, precision for every variant
    for key in ("steps", "precision"):
        assert len({r[key] for r in runs.values()}) == 1, key


def test_rerun_resumes_without_training_and_refuses_another_protocol(quick, monkeypatch):
    out, _ = quick

    def no_training(*a, **k):
        raise AssertionError("a finished study trained again")
    monkeypatch.setattr("fluid_ops.training.train", no_training)
    monkeypatch.setattr(S, "_run_task", lambda task: (_ for _ in ()).throw(AssertionError("ran " + task["folder"])))
    again = S.run_study(out, quick=True, jobs=1, progress=False)
    assert again["summary"].keys() == set(S.VARIANTS) and len(again["calls"]) == 2
    with pytest.raises(S.StudyError, match="another protocol.*per_category"):
        S.run_study(out, quick=True, per_category=3, jobs=1, progress=False)


def test_check_passes_on_itself_and_fails_on_a_shifted_mean(quick, tmp_path):
    out, res = quick
    lines, ok = S.check_study(res, res)
    assert ok and len(lines) > 4
    moved = json.loads(json.dumps(res))
    # the quick study scores one prompt per category, so the allowed slack is a whole 1.0
    moved["summary"]["continuous-random"]["overall"]["mean"] += 1.5
    lines, ok = S.check_study(moved, res)
    assert not ok and any("NO" in ln for ln in lines)
    (tmp_path / "c.json").write_text(json.dumps(moved))
    # the CLI: resumes (no work), compares, exits 1 when a mean leaves the committed spread
    assert main(["study", "--quick", "--out", str(out), "--jobs", "1", "--no-progress", "--check",
                 str(tmp_path / "c.json")]) == 1
    assert main(["study", "--quick", "--out", str(out), "--jobs", "1", "--no-progress", "--check",
                 str(out / "study.json")]) == 0


def test_power_law_fit_recovers_a_known_exponent():
    import numpy as np
    n = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    rng = np.random.default_rng(0)
    for alpha in (0.05, 0.3, 0.7):
        loss = 2.5 * n ** -alpha * np.exp(rng.normal(0, 0.002, n.size))
        fit = S.fit_power_law(n, loss)
        assert fit["alpha"] == pytest.approx(alpha, abs=0.01) and fit["a"] == pytest.approx(2.5, rel=0.1)
        assert fit["r2"] > 0.99 and fit["points"] == 5
    bad = S.fit_power_law(n, [1.0, 0.5, 1.0, 0.5, 1.0])    # no power law: a poor fit says so
    assert bad["r2"] < 0.5
    with pytest.raises(ValueError):
        S.fit_power_law([1e6], [1.0])


@pytest.mark.parametrize("argv,match", [
    (["--seeds", "0"], "seeds"),
    (["--seeds", "1,1"], "seeds"),
    (["--per-category", "0"], "per-category"),
    (["--steps", "1"], "steps"),
    (["--steps", "10", "--minutes", "1"], "not both"),
    (["--widths", "30"], "widths"),
    (["--jobs", "0"], "jobs"),
    (["--check", "/nonexistent/study.json"], "check"),
])
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path, argv, match, capsys):
    out = tmp_path / "s"
    with pytest.raises(SystemExit, match=match):
        main(["study", "--quick", "--out", str(out), *argv])
    assert not out.exists()


def test_samples_grid_of_a_finished_study(quick, tmp_path, capsys):
    """benchmarks/study_samples.py: one row per variant from the study's own snapshots, images the
    study scored (its per-prompt verdicts), refused in one line without a study."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "study_samples.py"
    spec = importlib.util.spec_from_file_location("study_samples", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, res = quick
    png = tmp_path / "grid.png"
    assert mod.main(["--study", str(out), "--out", str(png), "--per-category", "1"]) == 0
    from PIL import Image
    w, h = Image.open(png).size
    assert w > 6 * 32 * 3 and h > 4 * 32 * 3    # 6 prompts x 4 variants at scale 3, plus labels
    rows = [ln for ln in capsys.readouterr().out.splitlines() if " on these 6" in ln]
    assert [r.split(",")[0] for r in rows] == list(S.VARIANTS)
    # the grid's verdicts are the study's: the score over its prompts equals the final evaluation's
    # when the grid covers every prompt (quick: one per category)
    for r in rows:
        v = r.split(",")[0]
        final = res["runs"][f"{v}-w{res['protocol']['model']['base_width']}-s{res['protocol']['seeds'][0]}"]["evals"][-1]
        assert float(r.split(": ")[1].split()[0]) == pytest.approx(final["overall"], abs=0.005)
    with pytest.raises(SystemExit, match="study.json"):
        mod.main(["--study", str(tmp_path / "none"), "--out", str(png)])
