"""Study 6: entropy control side by side, every method on one setting with one validation protocol.

GRPO, clip-higher, Clip-Cov (at EM's covariance mass, its count-matched random control, and the
earlier r = 0.02 with its two controls: random tokens at its count, and an entropy bonus held at
its entropy), KL-Cov, top-20% forking tokens with HE's controls (bottom-80%, random-20%) and
its rho sweep (top 10%, top 50%), an entropy bonus, a reference KL, and the methods that followed
(GSPO, CISPO, Archer, adaptive entropy, entropy-shaped advantage, W-REINFORCE, QAE), each
`configs/<family>.py:<preset>`, several seeds from one shared warm start (`--arms` runs a subset;
a run longer than `--steps` counts its first `--steps` steps, as the LR schedule is constant).
Validation: a fixed held-out set (`--eval_prompts`, 1,024 by default) every `--eval_every` steps,
greedy pass@1 and avg@k / pass@k at T = 1 and T = 0.6.

One table: final and best validation greedy accuracy with the paired difference against GRPO
(seed i against seed i, mean +- standard error), avg@k and pass@k, final entropy, the residual
against GRPO's entropy-validation law at matched entropy, tokens and positive covariance mass
each rule selected, seconds per step. The findings (`findings`): GRPO's plateau, its entropy
spent, the law's chi-squared test on validation accuracy, the early fit's prediction, each
method's gain over GRPO in standard errors, and each control against the method it controls
(`CONTROLS`). Figures: validation accuracy against entropy, and validation accuracy, pass@k and
entropy against step.

  python -m experiments.study_methods --quick
  python -m experiments.study_methods --setting steps --seeds 3 --steps 300 --eval_every 25 \
      --arms grpo,clip_cov,kl_cov,top_20%,bottom_80%,clip_cov_r0.02
  python -m experiments.study_methods --setting steps --steps 600 --eval_every 25 --report_only
  python -m experiments.study_methods --setting steps --first_seed 2 --seeds 3 --steps 600 \
      --eval_every 25 --arms grpo,top_20%,bottom_80%,random_20%   # seeds 2-4
  python -m experiments.study_methods --setting steps --first_seed 2 --seeds 3 --steps 600 \
      --eval_every 25 --arms grpo,top_10%,top_20%,top_50%   # HE's rho sweep, seeds 2-4
"""

from __future__ import annotations

import os

import numpy as np

from entropy_rl import analysis
from experiments import common

H, V = "entropy/token_mean", "eval/pass@1"
E = "eval/entropy"  # the policy's entropy on the validation prompts, at the evaluation of V
# Arm -> (config family, preset variant, overrides).
ARMS = {
    "grpo": ("grpo", "", {}),
    "clip_higher": ("clip_higher", "", {}),
    "clip_cov": ("clip_cov", "", {}),
    "clip_cov_random": ("clip_cov", "random", {}),
    # The earlier tiny preset: 18% of the positive covariance mass, against the preset's 1.3%
    # (EM: 0.3-0.7%).
    "clip_cov_r0.02": ("clip_cov", "", {"loss.clip_cov_ratio": 0.02}),
    "clip_cov_random_r0.02": ("clip_cov", "random", {"loss.clip_cov_ratio": 0.02}),
    "kl_cov": ("kl_cov", "", {}),
    "top_20%": ("top_entropy", "", {}),
    "bottom_80%": ("top_entropy", "bottom", {}),
    "random_20%": ("top_entropy", "random", {}),  # HE's control: as many tokens, chosen at random
    # HE's rho sweep around 20%: the top 10% and the top 50% highest-entropy tokens.
    "top_10%": ("top_entropy", "", {"loss.token_mask_rho": 0.1}),
    "top_50%": ("top_entropy", "", {"loss.token_mask_rho": 0.5}),
    "entropy_bonus": ("grpo", "", {"loss.entropy_coef": 0.003}),
    # The entropy-matched control: an entropy bonus whose coefficient the adaptive controller tunes
    # to hold the token entropy at Clip-Cov r = 0.02's (0.17-0.18 over steps 50-300 on the steps
    # setting), so a gain of Clip-Cov's over it is not entropy alone. Its cap was 0.1 until the
    # 300-step controls showed the coefficient pinned there from step ~100 and entropy 0.140.
    "entropy_matched": (
        "adaptive_entropy",
        "",
        {"loss.entropy_target": 0.17, "loss.entropy_coef_max": 0.3},
    ),
    "reference_kl": ("grpo", "", {"loss.kl_ref_coef": 0.02}),
    "gspo": ("gspo", "", {}),
    "cispo": ("cispo", "", {}),
    "archer": ("archer", "", {}),
    "adaptive_entropy": ("adaptive_entropy", "", {}),
    "entropy_advantage": ("entropy_advantage", "", {}),
    "w_reinforce": ("w_reinforce", "", {}),  # the paper's: rewards +-1, no baseline
    "w_reinforce_grpo_adv": ("w_reinforce", "grpo", {}),  # lambda on GRPO's advantages
    "qae": ("qae", "", {}),
}


# Control -> the method it controls: both in a comparison, `findings` pairs them seed by seed.
CONTROLS = {
    "clip_cov_random": "clip_cov",
    "clip_cov_random_r0.02": "clip_cov_r0.02",
    "entropy_matched": "clip_cov_r0.02",
    "bottom_80%": "top_20%",
    "random_20%": "top_20%",
}


def validation_settings(
    quick: bool,
    steps: int,
    eval_every: int,
    eval_prompts: int,
    setting: str = "countdown",
    preset: str = "tiny",
) -> dict:
  """The runs' shared overrides: the setting, the study length and the validation protocol."""
  out = common.run_settings(quick, steps, setting=setting, preset=preset)
  if not quick:
    out.update(
        {
            "eval_every": eval_every,
            "eval.num_prompts": eval_prompts,
            "eval.num_samples": 8,
            "eval.extra_temperatures": (0.6,),
        }
    )
  return out


def arm_specs(
    settings: dict,
    seeds: int,
    quick: bool,
    preset: str = "tiny",
    setting: str = "countdown",
    first_seed: int = 0,
) -> dict:
  """{arm: [RunSpec per seed]}; run names are shared with no other study (the protocol differs)."""
  tag = "m" + common.run_tag(quick, preset, setting)
  return common.arm_specs(ARMS, settings, seeds, tag, preset, first_seed)


def _eval_points(records, entropy=H):
  """(entropy, validation greedy accuracy) at the evaluation steps after step 0; the entropy is
  the training batch's (`H`, the frontier's axis) or the validation set's (`E`)."""
  pts = [(r[entropy], r[V]) for r in records if V in r and H in r and entropy in r]
  return np.asarray(pts, np.float64).reshape(-1, 2).T


def _law_lines(grpo, num_prompts: int) -> list[str]:
  """The law on GRPO's validation accuracy, weighted by the binomial error of `num_prompts`
  prompts, with its chi-squared test: against the validation entropy `E` (`eval.num_samples`
  samples per prompt at `eval.temperature`, the same evaluation), seeds pooled and with an
  intercept per seed (`analysis.fit_law_per_run`, the diagnostic of a pooled misfit: the seeds'
  levels or the law's shape); and against the training batch's entropy `H`, one batch's
  estimate, with its noise (`analysis.step_noise` of each run's per-step series) counted too."""

  def line(label, fit):
    per = ""
    if "per_seed" in fit:
      q = fit["per_seed"]
      per = (
          f"; one a and an intercept per seed: a = {q['a']:.3f}, b = "
          + ", ".join(f"{b:.3f}" for b in q["b"].values())
          + f", chi^2 = {q['chi2']:.1f} on {q['dof']} dof, p = {q['p_value']:.3g} (passes at 5%:"
          f" {'yes' if q['p_value'] > 0.05 else 'no'})"
      )
    return (
        f"Law on GRPO's validation accuracy against {label}, {fit['n']} points, seeds pooled, "
        f"weighted by the binomial error of {num_prompts} prompts: a = {fit['a']:.3f}, b = "
        f"{fit['b']:.3f}, R^2 = {fit['r2']:.2f}, chi^2 = {fit['chi2']:.1f} on {fit['dof']} dof, "
        f"p = {fit['p_value']:.3g} (passes at 5%: {'yes' if fit['p_value'] > 0.05 else 'no'})" + per
    )

  out = []
  views = (
      ("the validation entropy", E, False),
      ("the training batch's entropy", H, False),
      ("the training batch's entropy with its noise counted", H, True),
  )
  for label, key, count_noise in views:
    points = [_eval_points(r, key) for r in grpo]
    h, v = np.concatenate(points, axis=1)
    sigma, sigma_h = analysis.accuracy_se(v, num_prompts), None
    try:
      if count_noise:
        noise = [analysis.step_noise(common.series(r, H)[1]) for r in grpo]
        sigma_h = np.concatenate([np.full(x.shape[1], n) for x, n in zip(points, noise)])
        label += " (" + ", ".join(f"{n:.4f}" for n in noise) + " nats per seed)"
      fit = analysis.fit_law(h, v, sigma=sigma, entropy_sigma=sigma_h)
      if len(grpo) > 1:
        seed = np.concatenate([np.full(x.shape[1], i) for i, x in enumerate(points)])
        fit["per_seed"] = analysis.fit_law_per_run(h, v, seed, sigma, sigma_h)
      out.append(line(label, fit))
    except (ValueError, RuntimeError) as e:
      out.append(f"Law against {label}: no fit ({e})")
  return out


def report_rows(runs: dict, k: int) -> tuple[list, dict | None]:
  """The table's rows from {arm: [records per seed]} (seed i of every arm paired with GRPO's)."""
  ref_h, ref_v = np.concatenate([_eval_points(r) for r in runs["grpo"]], axis=1)
  try:
    ref_fit = analysis.fit_law(ref_h, ref_v)
  except (ValueError, RuntimeError):
    ref_fit = None
  grpo_final = [common.last_value(r, V) for r in runs["grpo"]]
  grpo_best = [max(common.series(r, V)[1], default=np.nan) for r in runs["grpo"]]
  rows = []
  for arm, recs in runs.items():
    n = min(len(recs), len(runs["grpo"]))
    final = [common.last_value(r, V) for r in recs]
    best = [max(common.series(r, V)[1], default=np.nan) for r in recs]

    def paired(a, b, n=n, is_grpo=arm == "grpo"):
      if is_grpo or n < 1:
        return "-"
      d = analysis.paired_difference(a[:n], b[:n])
      return f"{d['mean']:+.3f} ± {d['se']:.3f}" if n > 1 else f"{d['mean']:+.3f}"

    resid = common.mean_std(frontier_residuals(recs, ref_h, ref_v)) if ref_fit else "n/a"
    seconds = [
        np.nanmean([sum(v for key, v in x.items() if key.startswith("time/")) for x in r if H in x])
        for r in recs
    ]
    rows.append(
        [
            arm,
            common.mean_std(final),
            paired(final, grpo_final),
            common.mean_std(best),
            paired(best, grpo_best),
            common.mean_std([common.last_value(r, f"eval/avg@{k}") for r in recs]),
            common.mean_std([common.last_value(r, f"eval/pass@{k}") for r in recs]),
            common.mean_std([common.last_value(r, f"eval/T0.6/pass@{k}") for r in recs]),
            common.mean_std([common.final_mean(r, H) for r in recs]),
            resid,
            common.mean_std([common.final_mean(r, "select/n_cov_selected", 10**6) for r in recs]),
            common.mean_std(
                [common.final_mean(r, "select/cov_mass_selected", 10**6) for r in recs]
            ),
            common.mean_std([common.final_mean(r, "select/n_token_mask", 10**6) for r in recs]),
            common.mean_std([common.final_mean(r, "select/n_high_entropy", 10**6) for r in recs]),
            f"{np.nanmean(seconds):.2f}",
        ]
    )
  return rows, ref_fit


def frontier_residuals(records_per_seed, ref_h, ref_v) -> list[float]:
  """Per seed: the mean of validation accuracy minus GRPO's law (fitted on ref_h, ref_v) at the
  run's entropy, over its evaluations."""
  out = []
  for r in records_per_seed:
    h, v = _eval_points(r)
    if len(h):
      out.append(analysis.frontier_residual(ref_h, ref_v, h, v)["mean"])
  return out


def _early_fit_lines(grpo, num_prompts: int, fit_fraction: float) -> list[str]:
  """EM's early-fit test per GRPO seed: the law fitted to the first `fit_fraction` of the
  evaluations (against the validation entropy) predicting the last one, against 2 SE of that
  evaluation and beside the fit's own prediction error (`analysis.early_fit_prediction`)."""
  early, fit_steps = [], set()
  for r in grpo:
    rh, rv = _eval_points(r, E)
    try:
      sigma = analysis.accuracy_se(rv, num_prompts)
      e = analysis.early_fit_prediction(rh, rv, fit_fraction, sigma=sigma)
    except (ValueError, RuntimeError):
      continue
    steps = [x["step"] for x in r if V in x and H in x and E in x]
    fit_steps.add((e["n_fit"], steps[e["n_fit"] - 1]))
    early.append(
        f"{e['last_error']:+.3f} (2 SE {2 * sigma[-1]:.3f}; the early fit's own prediction SE"
        f" {e['last_se']:.3f})"
    )
  if not early:
    return []
  used = ", ".join(f"the first {n} evaluations (to step {s})" for n, s in sorted(fit_steps))
  return [
      f"Early fit on the validation entropy ({fit_fraction:.0%} of the evaluations, at least 3:"
      f" {used}) predicting the last evaluation, error per seed: " + ", ".join(early)
  ]


def _plateau(records_per_seed) -> dict:
  """`analysis.detect_plateau` on the seeds' validation greedy accuracy, pooled."""
  return analysis.detect_plateau(*zip(*[common.series(r, V) for r in records_per_seed]))


def findings(
    runs: dict,
    num_prompts: int,
    fit_fraction: float = 0.15,
    window: int = 100,
    k: int | None = None,
) -> list[str]:
  """The science issue's targets, each measured on {arm: [records per seed]}: GRPO's validation
  plateau (`analysis.detect_plateau`, pooled over seeds; the other methods' by the same test) and
  its entropy at the end against the start (first and last 10 steps); the law on GRPO's
  validation accuracy with its chi-squared test (`_law_lines`); the law fitted on the first
  `fit_fraction` of the evaluations (against the validation entropy) predicting the last one,
  against 2 standard errors (and on twice as many, to show how stable that test is); each method
  against GRPO (`paired_findings`: greedy accuracy over the last `window` steps, less noisy once
  past the plateau, entropy, residual, pass@`k`); each method's validation accuracy at the last
  evaluation against GRPO's in standard errors of the paired difference; then each control against
  the method it controls (`control_findings`)."""
  out = []
  grpo = runs["grpo"]
  try:
    p = _plateau(grpo)
    where = f", plateau from step {p['step']:.0f}" if p["step"] is not None else ""
    out.append(
        f"GRPO validation greedy accuracy: **{p['verdict']}** over the last {p['window_steps']:.0f}"
        f" steps against the {p['window_steps']:.0f} before (slope {p['slope']:+.3f} per 100 steps,"
        f" 90% CI [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}], tolerance ±{p['tol']:g}; "
        f"{p['num_runs']} seeds pooled){where}; final level {p['final']:.3f}"
    )
  except ValueError as e:
    out.append(f"GRPO plateau: not testable ({e})")
  others = []
  for arm, recs in runs.items():
    if arm == "grpo":
      continue
    try:
      q = _plateau(recs)
    except ValueError:
      continue
    at = f" from step {q['step']:.0f}" if q["step"] is not None else ""
    others.append(f"{arm} {q['verdict']}{at} ({q['slope']:+.3f} per 100 steps)")
  if others:
    out.append("The other methods' plateaus, by the same test: " + "; ".join(others))
  ratios = [common.final_mean(r, H) / np.mean(common.series(r, H)[1][:10]) for r in grpo]
  out.append(
      "GRPO entropy, last 10 steps / first 10: "
      + ", ".join(f"{x:.2f}" for x in ratios)
      + f" (target <= 0.5: {'yes' if all(x <= 0.5 for x in ratios) else 'no'})"
  )
  out += _law_lines(grpo, num_prompts)
  for fraction in (fit_fraction, 2 * fit_fraction):  # twice the points: how stable the test is
    out += _early_fit_lines(grpo, num_prompts, fraction)

  out += paired_findings(runs, [(arm, "grpo") for arm in runs if arm != "grpo"], k, window)

  ref = [common.last_value(r, V) for r in grpo]
  for arm, recs in runs.items():
    n = min(len(recs), len(grpo))
    if arm == "grpo" or n < 2:
      continue
    d = analysis.paired_difference([common.last_value(r, V) for r in recs[:n]], ref[:n])
    z = d["mean"] / d["se"] if d["se"] > 0 else float("nan")
    out.append(
        f"{arm} - GRPO, final validation greedy accuracy: {d['mean']:+.3f} ± {d['se']:.3f} "
        f"({z:+.1f} SE, paired t-test p = {d['p_value']:.2g}, {n} paired seeds)"
    )
  out += control_findings(runs, k, window)
  return out


def control_findings(runs: dict, k: int | None = None, window: int = 100) -> list[str]:
  """Each method against its controls (`CONTROLS`): `paired_findings` of (method, control)."""
  return paired_findings(
      runs, [(method, control) for control, method in CONTROLS.items()], k, window
  )


def paired_findings(runs: dict, pairs, k: int | None = None, window: int = 100) -> list[str]:
  """Each (arm, baseline) of `pairs` present in `runs`, seed i against seed i: the last `window`
  steps' validation greedy accuracy, final entropy, the residual against GRPO's law at matched
  entropy and final pass@`k` (with k), as mean ± standard error of the paired difference."""
  ref_h, ref_v = np.concatenate([_eval_points(r) for r in runs["grpo"]], axis=1)
  measures = {
      f"val. greedy (last {window} steps)": lambda recs: [
          last_window_mean(r, window) for r in recs
      ],
      "final entropy": lambda recs: [common.final_mean(r, H) for r in recs],
      "residual at matched entropy": lambda recs: frontier_residuals(recs, ref_h, ref_v),
  }
  if k:
    measures[f"final pass@{k}"] = lambda recs: [
        common.last_value(r, f"eval/pass@{k}") for r in recs
    ]
  out = []
  for method, control in pairs:
    n = min(len(runs.get(control, [])), len(runs.get(method, [])))
    if n < 2:
      continue
    parts = []
    for label, measure in measures.items():
      try:
        d = analysis.paired_difference(measure(runs[method][:n]), measure(runs[control][:n]))
      except ValueError:
        continue
      parts.append(f"{label} {d['mean']:+.3f} ± {d['se']:.3f} (p = {d['p_value']:.2g})")
    out.append(f"{method} - {control}, {n} paired seeds: " + "; ".join(parts))
  return out


HEADER = [
    "method",
    "final val. greedy",
    "vs GRPO (paired)",
    "best val. greedy",
    "vs GRPO (paired)",
    "avg@k",
    "pass@k",
    "pass@k T=0.6",
    "final entropy",
    "residual at matched entropy",
    "cov-selected tokens / micro-batch",
    "cov mass selected",
    "token-mask tokens / micro-batch",
    "high-entropy tokens (Archer) / micro-batch",
    "s / step",
]


def last_window_mean(records, window: int = 100) -> float:
  """Validation greedy accuracy averaged over the evaluations of the last `window` steps."""
  steps, values = common.series(records, V)
  return float(np.mean(values[steps > steps[-1] - window])) if len(values) else float("nan")


def mean_trajectory(records_per_seed) -> np.ndarray:
  """[2, E] (token entropy, validation greedy accuracy) at each evaluation step every seed reached,
  averaged over the seeds."""
  per_seed = [
      {r["step"]: (r[H], r[V]) for r in rec if V in r and H in r} for rec in records_per_seed
  ]
  steps = sorted(set.intersection(*(set(p) for p in per_seed)))
  return np.mean([[p[t] for t in steps] for p in per_seed], axis=0).reshape(-1, 2).T


def plot_frontier(runs: dict, out_png: str, ref_fit: dict | None = None, window: int = 100) -> str:
  """Left: validation greedy accuracy against token entropy along training, one line per method
  (the seeds' mean at each evaluation; GRPO's law R = -a exp(H) + b dashed). Right: where each
  method ends, final entropy against the last `window` steps' mean accuracy (mean ± SE over
  seeds)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = common.line_colors(len(runs))
  fig, (ax, end) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
  for i, (arm, recs) in enumerate(runs.items()):
    h, v = mean_trajectory(recs)
    c = colors[i]
    style = {"lw": 2.0, "zorder": 3} if arm == "grpo" else {"lw": 1.0}
    ax.plot(h, v, color=c, marker="o", ms=2, label=arm, **style)
    hs = [common.final_mean(r, H) for r in recs]
    vs = [last_window_mean(r, window) for r in recs]
    se = lambda x: np.std(x, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0  # noqa: E731
    end.errorbar(np.mean(hs), np.mean(vs), xerr=se(hs), yerr=se(vs), color=c, marker="o", ms=4)
    end.annotate(
        arm, (np.mean(hs), np.mean(vs)), fontsize=6, xytext=(3, 2), textcoords="offset points"
    )
  if ref_fit:
    grid = np.linspace(*ax.get_xlim(), 100)
    ax.plot(grid, analysis.law(grid, ref_fit["a"], ref_fit["b"]), "k--", lw=0.8, label="GRPO's law")
  ax.set_xlabel("token entropy (nats)")
  ax.set_ylabel("validation greedy pass@1")
  ax.set_title("along training (mean over seeds)", fontsize=8)
  ax.legend(fontsize=6, ncol=2)
  end.set_xlabel("final token entropy (last 10 steps)")
  end.set_ylabel(f"validation greedy, last {window} steps' mean")
  end.set_title("where each method ends (mean ± SE over seeds)", fontsize=8)
  for a in (ax, end):
    a.tick_params(labelsize=7)
  return common.save_figure(fig, out_png)


def main():
  p = common.base_args(__doc__, "methods", archive=True)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument(
      "--first_seed",
      type=int,
      default=0,
      help="seeds first_seed .. first_seed + seeds - 1: a comparison whose runs all start from one"
      " archived warm start (seeds 0-1 of the 600-step runs started from one never archived)",
  )
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--eval_every", type=int, default=20)
  p.add_argument("--eval_prompts", type=int, default=1024)
  p.add_argument(
      "--arms",
      default=",".join(ARMS),
      help="comma-separated subset of the arms, run in this order within each seed (grpo, the"
      " baseline, is always run: first unless listed)",
  )
  p.add_argument(
      "--report_only",
      action="store_true",
      help="launch nothing: the report of the runs finished in --root or --archive",
  )
  a = p.parse_args()
  arms = list(dict.fromkeys(a.arms.split(",")))
  arms = arms if "grpo" in arms else ["grpo"] + arms
  if unknown := sorted(set(arms) - set(ARMS)):
    p.error(f"--arms: {unknown} not in {list(ARMS)}")
  seeds = 1 if a.quick else a.seeds
  settings = validation_settings(
      a.quick, a.steps, a.eval_every, a.eval_prompts, a.setting, a.preset
  )
  specs = arm_specs(settings, seeds, a.quick, a.preset, a.setting, a.first_seed)
  specs = {arm: specs[arm] for arm in arms}
  runs = {arm: [] for arm in specs}
  for s in range(seeds):  # seed-major, so partial results cover every method
    for arm in specs:
      if len(runs[arm]) < s:  # --report_only: an arm's seeds from the first up to a missing one
        continue
      path = common.ensure_run(
          a.root, specs[arm][s], archive=common.archive_of(a), launch=not a.report_only
      )
      if path:
        runs[arm].append(common.truncate(common.read_records(path), settings["num_steps"]))
  if not runs["grpo"]:
    p.error(f"no finished GRPO run in --root {a.root} or --archive {a.archive}")
  # GRPO's row first, wherever it ran; an arm with no finished run is left out.
  runs = {arm: v for arm, v in {"grpo": runs["grpo"], **runs}.items() if v}
  specs = {arm: specs[arm][: len(runs[arm])] for arm in runs}
  os.makedirs(a.out, exist_ok=True)
  k = settings["eval.num_samples"]
  rows, ref_fit = report_rows(runs, k)
  plot_frontier(runs, os.path.join(a.out, "frontier.png"), ref_fit)
  common.plot_groups(runs, [V, f"eval/pass@{k}", H], os.path.join(a.out, "curves.png"), smooth=1)
  found = findings(runs, settings["eval.num_prompts"], k=k)
  every = [x for v in specs.values() for x in v]
  code, warm = common.same_code(a.root, every), common.same_warm_start(a.root, every)
  cpu = common.same_machine(a.root, every)
  fit_txt = (
      f"R = -{ref_fit['a']:.3f} exp(H) + {ref_fit['b']:.3f} (R^2 {ref_fit['r2']:.2f})"
      if ref_fit
      else "n/a (the fit did not converge)"
  )
  done = f"{seeds} seed(s)" + (
      f" ({a.first_seed}-{a.first_seed + seeds - 1})" if a.first_seed else ""
  )
  if any(len(v) < seeds for v in runs.values()):
    done = f"of {seeds} seeds, finished so far: " + ", ".join(
        f"{k} {len(v)}" for k, v in runs.items()
    )
  text = f"""# Study 6: entropy control, side by side

Mode: {'quick' if a.quick else 'full'}; {done} x {settings['num_steps']} steps per method,
`:{a.preset}` on the `{a.setting}` setting; code: {'; '.join(f'{c}: {len(v)} runs' for c, v in code.items())};
warm start (sha256): {'; '.join(f'{w}: {len(v)} runs' for w, v in warm.items())};
machine: {'; '.join(f'{m}: {len(v)} runs' for m, v in cpu.items())}.
Validation: {settings['eval.num_prompts']} held-out prompts every {settings['eval_every']} steps,
greedy pass@1 and avg@{k} / pass@{k}. "vs GRPO" = the paired difference over seeds, mean ± standard
error. Residual: validation accuracy minus GRPO's law {fit_txt} at the method's entropy.

{common.md_table([h.replace("@k", f"@{k}") for h in HEADER], rows)}

Findings (`findings`):

{chr(10).join(f"- {x}" for x in found)}

![validation accuracy against entropy](frontier.png)

![validation accuracy, pass@{k} and entropy against step, mean and range over seeds](curves.png)
"""
  common.write_report(a.out, "report.md", text)


if __name__ == "__main__":
  main()
