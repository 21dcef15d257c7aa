"""experiments/study_methods.py: every arm is a valid run, and the table is computed right."""

import dataclasses

import numpy as np
import pytest

from entropy_rl import analysis, config_lib
from experiments import common, study_methods


@pytest.mark.parametrize("quick", [True, False])
def test_every_arm_is_a_valid_config(quick):
  settings = study_methods.validation_settings(quick, 600, 20, 1024)
  specs = study_methods.arm_specs(settings, 2, quick)
  assert set(specs) == set(study_methods.ARMS) and all(len(v) == 2 for v in specs.values())
  names = [s.name for v in specs.values() for s in v]
  assert len(set(names)) == len(names)
  for s0, _ in specs.values():
    c = common.load_config(s0.family, s0.arg, s0.config_overrides())
    config_lib.validate(c, 1)
    if not quick:
      assert c.eval.num_prompts == 1024 and tuple(c.eval.extra_temperatures) == (0.6,)
  random = specs["clip_cov_random"][0]
  assert common.load_config(random.family, random.arg, {}).loss.clip_cov_tokens == "random"
  random_r = common.load_config(*_family_arg(specs["clip_cov_random_r0.02"][0]))
  assert random_r.loss.clip_cov_tokens == "random" and random_r.loss.clip_cov_ratio == 0.02
  matched = specs["entropy_matched"][0]
  loss = common.load_config(matched.family, matched.arg, matched.config_overrides()).loss
  assert loss.adaptive_entropy and loss.entropy_target == 0.17
  kl = specs["reference_kl"][0]
  assert common.load_config(kl.family, kl.arg, kl.config_overrides()).loss.kl_ref_coef > 0
  for arm, rho in (("top_10%", 0.1), ("top_20%", 0.2), ("top_50%", 0.5)):
    top = common.load_config(*_family_arg(specs[arm][0])).loss
    assert top.token_mask == "top_entropy" and top.token_mask_rho == rho


def test_first_seed_names_and_seeds_the_runs():
  settings = study_methods.validation_settings(False, 600, 25, 1024, "steps")
  base = study_methods.arm_specs(settings, 5, False, setting="steps")
  later = study_methods.arm_specs(settings, 3, False, setting="steps", first_seed=2)
  for arm, specs in later.items():
    assert specs == base[arm][2:]  # the same runs, so archived ones are reused
  assert [dict(s.overrides)["seed"] for s in later["grpo"]] == [2, 3, 4]
  assert [s.name for s in later["bottom_80%"]] == [f"mf_steps_bottom_80pct_s{i}" for i in (2, 3, 4)]


def _family_arg(spec):
  return spec.family, spec.arg, spec.config_overrides()


def _records(level, entropy_end, seed):
  rng = np.random.default_rng(seed)
  out = []
  for step in range(0, 101, 10):
    h = 0.6 + (entropy_end - 0.6) * step / 100
    out.append(
        {
            "step": step,
            "entropy/token_mean": h,
            "eval/pass@1": level - 0.3 * np.exp(h) + rng.normal(0, 0.002),
            "eval/avg@8": 0.3,
            "eval/pass@8": 0.8,
            "time/update": 1.0,
            "time/rollout": 0.5,
        }
    )
  return out


def test_report_pairs_seeds_against_grpo(tmp_path):
  runs = {
      "grpo": [_records(0.9, 0.1, s) for s in range(3)],
      "clip_cov": [_records(0.95, 0.3, 10 + s) for s in range(3)],
  }
  rows, fit = study_methods.report_rows(runs, 8)
  assert fit is not None and abs(fit["a"] - 0.3) < 0.05
  grpo, clip = rows
  assert grpo[2] == "-" and clip[0] == "clip_cov"
  final = [common.last_value(r, "eval/pass@1") for r in runs["clip_cov"]]
  ref = [common.last_value(r, "eval/pass@1") for r in runs["grpo"]]
  d = np.subtract(final, ref)
  assert clip[2] == f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(3):.3f}"
  assert float(clip[9].split()[0]) == pytest.approx(0.05, abs=0.01)  # +0.05 above GRPO's law
  assert clip[-1] == "1.50" and len(clip) == len(study_methods.HEADER)
  runs["archer"] = [
      [{**x, "select/n_high_entropy": 240.0 + s} for x in _records(0.9, 0.1, 20 + s)]
      for s in range(3)
  ]
  archer = study_methods.report_rows(runs, 8)[0][2]
  col = study_methods.HEADER.index("high-entropy tokens (Archer) / micro-batch")
  assert archer[col] == "241.000 ± 1.000" and clip[col] == "n/a"  # only Archer logs it here
  png = study_methods.plot_frontier(runs, str(tmp_path / "frontier.png"))
  assert (tmp_path / "frontier.png").stat().st_size > 1000 and png.endswith("frontier.png")


def test_the_frontier_averages_the_seeds_at_the_evaluations_all_reached():
  H, V = study_methods.H, study_methods.V
  a = [{"step": t, H: 0.2 - t / 1000, V: 0.1 + t / 1000} for t in (0, 25, 50)] + [{"step": 60}]
  b = [{"step": t, H: 0.1, V: 0.3} for t in (0, 25)]
  h, v = study_methods.mean_trajectory([a, b])
  np.testing.assert_allclose(h, [0.15, (0.175 + 0.1) / 2])
  np.testing.assert_allclose(v, [0.2, (0.125 + 0.3) / 2])
  assert study_methods.last_window_mean(a, 30) == pytest.approx((0.125 + 0.15) / 2)


def _saturating(level, seed, entropy_end=0.08):
  """Validation accuracy rising to `level` by step ~100, then flat; entropy falling 0.2 -> end."""
  rng = np.random.default_rng(seed)
  out = []
  for step in range(0, 301, 25):
    h = entropy_end + (0.2 - entropy_end) * np.exp(-step / 60)
    out.append(
        {
            "step": step,
            "entropy/token_mean": h,
            "eval/pass@1": level - 0.1 * np.exp(-step / 30) + rng.normal(0, 0.004),
            "eval/entropy": 0.95 * h,
        }
    )
    out += [{"step": step + i, "entropy/token_mean": h} for i in range(1, 25)]
  return out


def test_findings_measure_the_plateau_the_law_and_the_paired_gains():
  runs = {
      "grpo": [_saturating(0.30, s) for s in range(3)],
      "clip_cov": [_saturating(0.34, 10 + s) for s in range(3)],
  }
  lines = study_methods.findings(runs, 1024)
  assert "**plateaued**" in lines[0] and "3 seeds pooled" in lines[0], lines[0]
  assert lines[1].startswith("The other methods' plateaus, by the same test: clip_cov plateaued")
  assert lines[2].endswith("(target <= 0.5: yes)"), lines[2]
  law = "Law on GRPO's validation accuracy against the "
  assert lines[3].startswith(law + "validation entropy, 39 points"), lines[3]
  assert "; one a and an intercept per seed: a = " in lines[3], lines[3]
  assert "on 35 dof" in lines[3], lines[3]  # 39 points, one a, 3 intercepts
  assert lines[4].startswith(law + "training batch's entropy, 39 points"), lines[4]
  assert lines[5].startswith(law + "training batch's entropy with its noise counted ("), lines[5]
  assert lines[6].startswith("Early fit on the validation entropy (15% of"), lines[6]
  assert lines[7].startswith("Early fit on the validation entropy (30% of"), lines[7]
  averaged, gain = lines[-2:]
  assert gain.startswith("clip_cov - GRPO, final validation greedy accuracy: +0.0"), gain
  assert float(gain.split("(")[1].split(" SE")[0]) > 2
  prefix = "clip_cov - grpo, 3 paired seeds: val. greedy (last 100 steps) +0.04"
  assert averaged.startswith(prefix), averaged  # 0.34 - 0.30 on the flat part
  mean, se = averaged.split("(last 100 steps) ")[1].split(" (p")[0].split(" ± ")
  assert float(mean) / float(se) > 2, averaged
  assert sum("val. greedy (last 100 steps)" in x for x in lines) == 1, lines  # stated once


def test_the_law_counts_the_noise_of_a_one_batch_entropy():
  """Accuracy follows the law of the validation entropy; the training batch's entropy is that
  plus one batch's noise: the law passes against the first, fails against the second unless its
  noise is counted."""
  rng = np.random.default_rng(0)
  H, V, E = study_methods.H, study_methods.V, study_methods.E
  grpo = []
  for _ in range(3):
    records = []
    for step in range(601):
      e = 0.05 + 0.13 * np.exp(-step / 200)
      records.append({"step": step, H: e + rng.normal(0, 0.015)})
      if step % 25 == 0 and step:
        v = -1.3 * np.exp(e) + 1.8
        records[-1].update({E: e, V: v + rng.normal(0, analysis.accuracy_se(v, 1024))})
    grpo.append(records)
  valid, batch, counted = study_methods._law_lines(grpo, 1024)

  def p_values(line):
    return [float(x.split(",")[0].split(" (")[0]) for x in line.split("p = ")[1:]]

  assert min(p_values(valid)) > 0.05 and "72 points" in valid, valid
  assert max(p_values(batch)) < 1e-3, batch
  assert min(p_values(counted)) > 0.05, counted
  noise = [float(x) for x in counted.split("counted (")[1].split(" nats")[0].split(", ")]
  np.testing.assert_allclose(noise, 0.015, rtol=0.1)


def test_controls_are_paired_with_the_method_they_control():
  runs = {
      "grpo": [_records(0.9, 0.1, s) for s in range(3)],
      "clip_cov_r0.02": [_records(0.95, 0.3, 10 + s) for s in range(3)],
      "entropy_matched": [_records(0.92, 0.3, 20 + s) for s in range(3)],
      "clip_cov_random": [_records(0.9, 0.1, 30 + s) for s in range(3)],  # its method is absent
  }
  lines = study_methods.control_findings(runs, 8, window=30)
  assert len(lines) == 1 and lines[0].startswith(
      "clip_cov_r0.02 - entropy_matched, 3 paired seeds: "
  )
  greedy, entropy, residual, pass8 = lines[0].split(": ", 1)[1].split("; ")
  method = [study_methods.last_window_mean(r, 30) for r in runs["clip_cov_r0.02"]]
  control = [study_methods.last_window_mean(r, 30) for r in runs["entropy_matched"]]
  d = np.subtract(method, control)
  assert greedy.startswith(f"val. greedy (last 30 steps) {d.mean():+.3f} ± ")
  assert entropy.startswith("final entropy +0.000 ± 0.000")  # both end at entropy 0.3
  assert float(residual.split()[4]) == pytest.approx(0.03, abs=0.005)  # 0.95 - 0.92 on one law
  assert pass8.startswith("final pass@8 +0.000")
  assert lines[0] in study_methods.findings(runs, 1024, window=30, k=8)


def test_findings_pair_every_method_with_grpo_on_entropy_residual_and_pass_at_k():
  runs = {
      "grpo": [_records(0.9, 0.1, s) for s in range(3)],
      "top_10%": [_records(0.9, 0.3, 10 + s) for s in range(3)],
  }
  lines = study_methods.findings(runs, 1024, window=30, k=8)
  vs_grpo = [x for x in lines if x.startswith("top_10% - grpo, 3 paired seeds: ")]
  assert len(vs_grpo) == 1, lines
  greedy, entropy, residual, pass8 = vs_grpo[0].split(": ", 1)[1].split("; ")
  assert greedy.startswith("val. greedy (last 30 steps) ")
  # the last 10 records (steps 10-100) differ by 0.2 x step / 100: 0.11 on average
  assert entropy.startswith("final entropy +0.110 ± 0.000")
  assert residual.startswith("residual at matched entropy ")
  assert pass8.startswith("final pass@8 ")


def test_the_report_regenerates_from_archived_runs_alone(tmp_path, monkeypatch):
  import json
  import os
  import sys

  settings = study_methods.validation_settings(False, 100, 10, 1024, "steps")
  specs = study_methods.arm_specs(settings, 2, False, setting="steps")
  archive = str(tmp_path / "archive")
  for level, arm in [(0.9, "grpo"), (0.95, "clip_cov")]:
    for seed, s in enumerate(specs[arm]):
      path = str(tmp_path / "elsewhere" / s.name)
      os.makedirs(path)
      with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(
            json.dumps({**r, "step": r["step"] or 1}) + "\n" for r in _records(level, 0.2, seed)
        )
      with open(os.path.join(path, "summary.md"), "w") as f:
        f.write("done\n")
      with open(os.path.join(path, "spec.json"), "w") as f:
        cpu = {"machine": "EPYC (avx2)"} if arm == "grpo" else {}  # clip_cov's predate the stamp
        json.dump({**dataclasses.asdict(s), "code": {"commit": "abc", "dirty": False}, **cpu}, f)
      common.archive_run(path, archive)
  monkeypatch.setattr(common.subprocess, "call", lambda *a, **k: pytest.fail("a run launched"))
  out = tmp_path / "out"
  argv = ["study_methods", "--setting", "steps", "--seeds", "2", "--steps", "100"]
  argv += ["--eval_every", "10", "--arms", "clip_cov,grpo", "--root", str(tmp_path / "runs")]
  monkeypatch.setattr(sys, "argv", argv + ["--archive", archive, "--out", str(out)])
  study_methods.main()
  report = (out / "report.md").read_text()
  assert "code: abc: 4 runs" in report
  assert "machine: EPYC (avx2): 2 runs; unrecorded: 2 runs." in report
  rows = [x.split(" | ")[0] for x in report.splitlines() if x.startswith("| ") and " | " in x]
  assert rows[1:] == ["| grpo", "| clip_cov"]  # below the header: the baseline first
  # --report_only: what is finished, never a launch; an arm's seeds stop at its first missing one.
  os.remove(os.path.join(archive, specs["clip_cov"][1].name, "spec.json"))
  argv[argv.index("--root") + 1] = str(tmp_path / "fresh")
  monkeypatch.setattr(
      sys, "argv", argv + ["--archive", archive, "--out", str(out), "--report_only"]
  )
  study_methods.main()
  report = (out / "report.md").read_text()
  assert "of 2 seeds, finished so far: grpo 2, clip_cov 1" in report
  assert "code: abc: 3 runs" in report and "| clip_cov |" in report
