"""Study 2: covariance methods (EM Table 2, Fig. 11; Table 1 for the covariance tail).

GRPO vs clip-higher vs Clip-Cov vs KL-Cov, and Clip-Cov's count-matched control (the same number of
tokens detached, drawn at random: `configs/clip_cov.py:<preset>,random`), several seeds each, from
one shared warm start. Entropy,
accuracy, pass@k and response length vs step; a final table (mean ± sd over seeds) at equal steps;
GRPO's accuracy plateau (detected); each method's residual against GRPO's fitted entropy-reward
curve (matched entropy: on the curve = spends entropy more slowly, above = a better frontier); the
number of tokens each rule touched; and the covariance distribution at step 1 (EM Table 1).

  python -m experiments.study_covariance_methods --quick
  python -m experiments.study_covariance_methods --seeds 3
"""

from __future__ import annotations

import os

import numpy as np

from entropy_rl import analysis
from experiments import common

# Arm -> (config family, preset variant, overrides).
ARMS = {
    "grpo": ("grpo", "", {}),
    "clip_higher": ("clip_higher", "", {}),
    "clip_cov": ("clip_cov", "", {}),
    "clip_cov_random": ("clip_cov", "random", {}),
    "kl_cov": ("kl_cov", "", {}),
}
METHODS = tuple(ARMS)
H, R = "entropy/token_mean", "acc"
PAPER_TABLE1 = {0.0002: 5.654, 0.002: 3.112, 0.02: 1.385, 0.2: 0.351, 0.5: 0.152, 1.0: 0.003}


def method_specs(
    quick: bool,
    seeds: int,
    steps: int,
    methods=METHODS,
    preset: str = "tiny",
    setting: str = "countdown",
):
  arms = {m: ARMS[m] for m in methods}
  settings = common.run_settings(quick, steps, setting=setting, preset=preset)
  return common.arm_specs(arms, settings, seeds, common.run_tag(quick, preset, setting), preset)


def covariance_table(run_path: str, num_prompts: int, num_samples: int = 8) -> tuple[dict, int]:
  """EM Table 1 at step 1: covariance tail of one rollout batch of the starting policy."""
  probe = common.load_probe(run_path)
  batch = common.sample_probe(probe, common.warm_params(run_path), num_prompts, num_samples)
  cov = analysis.token_covariance(batch["logp"], batch["adv"], batch["mask"])
  return analysis.covariance_by_top_fraction(cov, batch["mask"]), int(batch["mask"].sum())


def eval_keys(records):
  return sorted({k for r in records for k in r if k.startswith("eval/")})


def main():
  p = common.base_args(__doc__, "covariance_methods")
  p.add_argument("--seeds", type=int, default=2)
  p.add_argument("--steps", type=int, default=common.STUDY2_STEPS)
  a = p.parse_args()
  seeds = 1 if a.quick else a.seeds
  specs = method_specs(a.quick, seeds, a.steps, preset=a.preset, setting=a.setting)
  runs = {m: [] for m in METHODS}
  for s in range(seeds):  # seed-major, so partial results cover every method
    for m in METHODS:
      runs[m].append(common.read_records(common.ensure_run(a.root, specs[m][s])))
  os.makedirs(a.out, exist_ok=True)
  ekeys = eval_keys(runs["grpo"][0])
  passk = [k for k in ekeys if k.startswith("eval/pass@") and k != "eval/pass@1"]
  avgk = [k for k in ekeys if k.startswith("eval/avg@")]
  common.plot_groups(runs, [H, R, "response/len_mean"], os.path.join(a.out, "curves.png"))
  common.plot_groups(
      runs, ["eval/pass@1"] + avgk + passk, os.path.join(a.out, "eval.png"), smooth=1
  )

  # GRPO's plateau and fitted entropy-reward curve (10-step means pooled over seeds).
  plateaus = []
  for rec in runs["grpo"]:
    steps, r = common.series(rec, R)
    try:
      plateaus.append(analysis.detect_plateau(steps, r))
    except ValueError:
      plateaus.append(None)
  ref_h = np.concatenate([analysis.window_means(common.series(x, H)[1], 10) for x in runs["grpo"]])
  ref_r = np.concatenate([analysis.window_means(common.series(x, R)[1], 10) for x in runs["grpo"]])
  try:
    ref_fit = analysis.fit_law(ref_h, ref_r)
  except (ValueError, RuntimeError):
    ref_fit = None
  grpo_h = np.mean([common.final_mean(x, H) for x in runs["grpo"]])

  rows, resid_rows, touch_rows = [], [], []
  for m in METHODS:
    hs = [common.final_mean(x, H) for x in runs[m]]
    row = [
        m,
        common.mean_std(hs),
        f"{np.mean(hs) / grpo_h:.2f}x",
        common.mean_std([common.final_mean(x, R) for x in runs[m]]),
    ]
    row += [
        common.mean_std([common.last_value(x, k) for x in runs[m]])
        for k in ["eval/pass@1"] + avgk + passk
    ]
    row.append(common.mean_std([common.final_mean(x, "response/len_mean") for x in runs[m]]))
    rows.append(row)
    if ref_fit:
      per_seed, late, inside = [], [], []
      for x in runs[m]:
        h10 = analysis.window_means(common.series(x, H)[1], 10)
        r10 = analysis.window_means(common.series(x, R)[1], 10)
        fr = analysis.frontier_residual(ref_h, ref_r, h10, r10)
        per_seed.append(fr["mean"])
        late.append(float(np.mean(fr["residuals"][len(h10) // 2 :])))
        inside.append(fr["frac_inside"])
      resid_rows.append(
          [m, common.mean_std(per_seed), common.mean_std(late), f"{np.mean(inside):.2f}"]
      )
    sel = [common.final_mean(x, "select/n_cov_selected", last=10**6) for x in runs[m]]
    mass = [common.final_mean(x, "select/cov_mass_selected", last=10**6) for x in runs[m]]
    dlogp = [common.final_mean(x, "pg/abs_dlogp", last=10**6) for x in runs[m]]
    clip = [
        common.final_mean(x, "pg/clipfrac_high", last=10**6)
        + common.final_mean(x, "pg/clipfrac_low", last=10**6)
        for x in runs[m]
    ]
    ntok = [common.final_mean(x, "select/n_valid", last=10**6) for x in runs[m]]
    touch_rows.append(
        [
            m,
            f"{np.nanmean(sel):.2f}",
            f"{np.nanmean(sel) * 4:.1f}",
            f"{np.nanmean(ntok):.0f}",
            f"{np.nanmean(mass):.3f}",
            f"{np.nanmean(dlogp):.4f}",
            f"{np.nanmean(clip):.4f}",
        ]
    )

  plat_txt = ", ".join(
      "n/a" if pl is None else (f"step {pl['step']:.0f}" if pl["plateaued"] else "still rising")
      for pl in plateaus
  )
  num_steps = specs["grpo"][0].config_overrides()["num_steps"]
  plateau_steps = [pl["step"] for pl in plateaus if pl and pl["plateaued"]]
  past = (
      f"GRPO plateau detected at step(s) {plat_txt}; the runs continue to step {num_steps}, "
      f"{num_steps - max(plateau_steps):.0f}+ steps past it."
      if plateau_steps
      else f"GRPO plateau: {plat_txt} — no plateau detected within {num_steps} steps, so the "
      "comparison is *before* GRPO exhausts its gains, not after."
  )

  # Covariance tail at step 1 from the starting policy.
  n_prompts = 16 if a.quick else 128
  table, ntokens = covariance_table(common.run_dir(a.root, specs["grpo"][0]), n_prompts)
  cov_rows = [
      [f"{100 * f:g}%", str(k), f"{v:.3f}", f"{PAPER_TABLE1[f]:.3f}"] for f, (v, k) in table.items()
  ]
  head = (
      ["method", "entropy (last 10)", "vs GRPO", "acc (last 10)", "eval pass@1 (greedy)"]
      + [k.replace("eval/", "eval ") for k in avgk + passk]
      + ["len"]
  )
  fit_txt = (
      f"a = {ref_fit['a']:.3f}, b = {ref_fit['b']:.3f}, R^2 = {ref_fit['r2']:.3f}, ceiling "
      f"{ref_fit['ceiling']:.3f}"
      if ref_fit
      else "n/a"
  )
  code = common.same_code(a.root, [x for v in specs.values() for x in v])
  code_txt = (
      f"every run from commit {next(iter(code))}"
      if len(code) == 1
      else "runs from different code: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in code.items())
  )
  text = f"""# Study 2: covariance methods (EM Table 2 / Fig. 11, Table 1)

Mode: {'quick' if a.quick else 'full'}; {seeds} seed(s) x {num_steps} steps per method, one shared warm start; {code_txt}.
Methods: configs/grpo.py, clip_higher.py (eps_high 0.28), clip_cov.py (tiny: r = 0.001, band (0.5, 10)),
kl_cov.py (tiny: k = 0.004, beta = 1), all `:{a.preset}`. Mean ± sd over seeds; "last 10" = mean of the
last 10 steps; eval = the final evaluation ({specs['grpo'][0].config_overrides()['eval.num_prompts']} held-out problems).

## At equal steps (end of training)

{common.md_table(head, rows)}

Target "Clip-Cov / KL-Cov end with >= 1.3x GRPO's entropy": see the "vs GRPO" column.

## Plateau

{past}

## At matched entropy: residual against GRPO's entropy-reward curve

GRPO's law fitted on its 10-step means (pooled over seeds): {fit_txt}. Residual = a method's
10-step-mean accuracy minus that curve at the method's entropy (0 = on GRPO's curve, i.e. spends
entropy more slowly; > 0 = a better frontier). "inside" = fraction of the method's points whose
entropy lies within GRPO's range (outside it the curve is extrapolated).

{common.md_table(["method", "mean residual (all)", "mean residual (2nd half)", "inside"], resid_rows)}

## Tokens touched per step

{common.SCALING_RULE}

{common.md_table(["method", "cov-selected tokens / mini-batch", "per step (4 mini-batches)", "response tokens / mini-batch", "positive covariance mass selected", "mean abs(logp - old_logp)", "clip fraction"], touch_rows)}

KL-Cov's penalty beta |logp - old_logp| has zero gradient at logp = old_logp (the first mini-batch of
each step is exactly on-policy), so it acts only through the drift of later mini-batches, measured
above as mean abs(logp - old_logp).

## Covariance at step 1 (EM Table 1)

One rollout batch of the starting policy: {n_prompts} prompts x 8 samples, {ntokens} response tokens,
GRPO advantages, covariance (A - mean A)(logp - mean logp) over the batch.

{common.md_table(["top fraction", "tokens", "mean cov (tiny)", "EM Table 1 (Qwen2.5-7B)"], cov_rows)}

![curves](curves.png)

![eval](eval.png)
"""
  common.write_report(a.out, "report.md", text)


if __name__ == "__main__":
  main()
