"""Study 5: entropy control (EM Fig. 9, 10, 12): strength sweeps of Clip-Cov and KL-Cov, with an
entropy bonus and a KL-to-reference penalty as baselines.

One seed per setting, 100 steps; the preset-strength points of Clip-Cov / KL-Cov and GRPO are study 2's seed-0 runs
(same settings, reused and truncated to the same number of steps). For each: final entropy, accuracy, eval, tokens touched, and the residual
against GRPO's entropy-reward curve.

  python -m experiments.study_entropy_control --quick
  python -m experiments.study_entropy_control
"""

from __future__ import annotations

import os

from entropy_rl import analysis
from experiments import common

H, R = "entropy/token_mean", "acc"

SWEEPS = {  # --sweeps id: (label, config family, swept field, values)
    "clip_cov": ("Clip-Cov ratio r", "clip_cov", "loss.clip_cov_ratio", (0.001, 0.005, 0.02, 0.1)),
    "kl_cov": ("KL-Cov coefficient beta", "kl_cov", "loss.kl_cov_coef", (1.0, 5.0)),
    "entropy": ("entropy bonus alpha", "grpo", "loss.entropy_coef", (0.01,)),
    "ref_kl": ("KL to reference", "grpo", "loss.kl_ref_coef", (0.1,)),
}
PRESET = {"loss.clip_cov_ratio": 0.001, "loss.kl_cov_coef": 1.0}  # tiny presets (reused runs)


def control_specs(
    quick: bool,
    steps: int,
    study2_steps: int,
    sweeps=tuple(SWEEPS),
    preset: str = "tiny",
    setting: str = "countdown",
):
  settings = common.run_settings(quick, steps, setting=setting, preset=preset)
  tag = common.run_tag(quick, preset, setting)
  base = {**settings, "seed": 0}
  study2_settings = common.run_settings(quick, study2_steps, setting=setting, preset=preset)
  study2 = tuple(sorted({**study2_settings, "seed": 0}.items()))
  out = {"GRPO": common.RunSpec(f"{tag}_grpo_s0", "grpo", preset, study2)}
  for sweep_id in sweeps:
    sweep, family, key, values = SWEEPS[sweep_id]
    if quick:
      values = values[-1:]
    for v in values:
      label = f"{sweep} = {v:g}"
      if PRESET.get(key) == v:  # the study-2 run with the preset value
        out[label] = common.RunSpec(f"{tag}_{family}_s0", family, preset, study2)
      else:
        out[label] = common.RunSpec(
            f"{tag}_{family}_{key.split('.')[-1]}{v:g}_s0",
            family,
            preset,
            tuple(sorted({**base, key: v}.items())),
        )
  return out


def main():
  p = common.base_args(__doc__, "entropy_control", archive=True)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument(
      "--study2-steps",
      type=int,
      default=common.STUDY2_STEPS,
      help="length of study 2's runs (reused here, truncated to --steps)",
  )
  p.add_argument(
      "--sweeps", default=",".join(SWEEPS), help=f"comma-separated subset of {list(SWEEPS)}"
  )
  a = p.parse_args()
  specs = control_specs(a.quick, a.steps, a.study2_steps, a.sweeps.split(","), a.preset, a.setting)
  n = common.run_settings(a.quick, a.steps)["num_steps"]
  runs = {
      label: common.truncate(
          common.read_records(common.ensure_run(a.root, s, archive=common.archive_of(a))), n
      )
      for label, s in specs.items()
  }
  os.makedirs(a.out, exist_ok=True)
  ref_h = analysis.window_means(common.series(runs["GRPO"], H)[1], 10)
  ref_r = analysis.window_means(common.series(runs["GRPO"], R)[1], 10)
  grpo_h = common.final_mean(runs["GRPO"], H)
  ekeys = sorted({k for k in runs["GRPO"][-1] if k.startswith("eval/")})
  rows = []
  for label, rec in runs.items():
    try:
      res = analysis.frontier_residual(
          ref_h,
          ref_r,
          analysis.window_means(common.series(rec, H)[1], 10),
          analysis.window_means(common.series(rec, R)[1], 10),
      )["mean"]
      res = f"{res:+.3f}"
    except (ValueError, RuntimeError):
      res = "n/a"
    h = common.final_mean(rec, H)
    rows.append(
        [label, f"{h:.3f}", f"{h / grpo_h:.2f}x", f"{common.final_mean(rec, R):.3f}"]
        + [f"{common.last_value(rec, k):.3f}" for k in ekeys]
        + [
            f"{common.final_mean(rec, 'select/n_cov_selected', 10**6):.2f}",
            f"{common.final_mean(rec, 'pg/abs_dlogp', 10**6):.4f}",
            res,
        ]
    )
  for sweep_id in a.sweeps.split(","):
    sweep = SWEEPS[sweep_id][0]
    group = {"GRPO": [runs["GRPO"]]}
    group.update({lab.split(" = ")[1]: [rec] for lab, rec in runs.items() if lab.startswith(sweep)})
    common.plot_groups(group, [H, R], os.path.join(a.out, f"{sweep_id}.png"), title=sweep)
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(4.2, 3))
  for i, (label, rec) in enumerate(runs.items()):
    h = analysis.window_means(common.series(rec, H)[1], 10)
    r = analysis.window_means(common.series(rec, R)[1], 10)
    ax.plot(h, r, "o-", ms=2, lw=0.8, color=f"C{i % 10}", label=label)
  ax.set_xlabel("entropy (10-step means)", fontsize=8)
  ax.set_ylabel("accuracy", fontsize=8)
  ax.legend(fontsize=5)
  ax.tick_params(labelsize=7)
  common.save_figure(fig, os.path.join(a.out, "frontier.png"))
  text = f"""# Study 5: entropy control (EM Fig. 9, 10, 12)

Mode: {'quick' if a.quick else 'full'}; one seed, {n} steps per setting, configs/<family>.py:{a.preset} with the swept
field overridden. Residual = 10-step-mean accuracy minus GRPO's fitted entropy-reward law at the same
entropy (0 = on GRPO's curve).

{common.SCALING_RULE}

{common.md_table(["setting", "entropy (last 10)", "vs GRPO", "acc (last 10)"] + [k.replace("eval/", "eval ") for k in ekeys] + ["cov-selected / mini-batch", "mean abs dlogp", "residual"], rows)}

![frontier](frontier.png)

""" + "\n".join(f"![{i}]({i}.png)" for i in a.sweeps.split(",")) + "\n"
  common.write_report(a.out, "report.md", text)


if __name__ == "__main__":
  main()
