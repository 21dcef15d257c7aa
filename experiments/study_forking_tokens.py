"""Study 3: forking tokens (HE, arXiv 2506.01939: Fig. 2-3, Table 1-2).

Policy-gradient updates on all tokens vs the top-20% highest-entropy tokens vs the bottom 80% vs a
random 20%, and rho in {0.1, 0.2, 0.5, 1.0} (`--no-rho-sweep` skips 0.1 and 0.5; configs/top_entropy.py, the DAPO recipe: clip-higher
0.28; rho = 1.0 is the all-tokens run, i.e. configs/clip_higher.py, shared with study 2).
Also: token-entropy percentiles of the starting policy (HE: p80 = 0.672 on Qwen3-8B), the most
frequent high-entropy tokens, and the overlap of the top-20% entropy positions of the starting
policy with those of later checkpoints on the same responses (HE Table 1).

  python -m experiments.study_forking_tokens --quick
  python -m experiments.study_forking_tokens
"""

from __future__ import annotations

import collections
import os

import numpy as np

from entropy_rl import analysis
from experiments import common

H, R = "entropy/token_mean", "acc"


def forking_specs(
    quick: bool,
    seeds: int,
    steps: int,
    study2_steps: int,
    rho_sweep: bool,
    preset: str = "tiny",
    setting: str = "countdown",
):
  settings = common.run_settings(quick, steps, setting=setting, preset=preset)
  tag = common.run_tag(quick, preset, setting)
  out = {}
  for s in range(seeds):
    base = {**settings, "seed": s}
    study2 = {
        **common.run_settings(quick, study2_steps, setting=setting, preset=preset),
        "seed": s,
    }
    runs = {
        "all tokens (rho 1.0)": common.RunSpec(
            f"{tag}_clip_higher_s{s}", "clip_higher", preset, tuple(sorted(study2.items()))
        ),
        "top 20%": common.RunSpec(
            f"{tag}_top20_s{s}", "top_entropy", f"{preset},top", tuple(sorted(base.items()))
        ),
        "bottom 80%": common.RunSpec(
            f"{tag}_bottom80_s{s}", "top_entropy", f"{preset},bottom", tuple(sorted(base.items()))
        ),
        "random 20%": common.RunSpec(
            f"{tag}_random20_s{s}", "top_entropy", f"{preset},random", tuple(sorted(base.items()))
        ),
    }
    if s == 0 and rho_sweep:
      for rho in (0.1, 0.5):
        runs[f"top {rho:g}"] = common.RunSpec(
            f"{tag}_top{int(rho * 100)}_s{s}",
            "top_entropy",
            f"{preset},top",
            tuple(sorted({**base, "loss.token_mask_rho": rho}.items())),
        )
    out[s] = runs
  return out


def token_analysis(run_path: str, num_prompts: int, num_samples: int = 8):
  """Entropy percentiles, frequent high-entropy tokens and top-20% overlap over checkpoints."""
  probe = common.load_probe(run_path)
  params0 = common.warm_params(run_path)
  batch = common.sample_probe(probe, params0, num_prompts, num_samples)
  mask = batch["mask"] > 0
  logits0 = common.response_logits(probe, params0, batch)
  ent0 = analysis.entropy_of_logits(logits0.reshape(-1, logits0.shape[-1])).reshape(mask.shape)
  values = ent0[mask]
  pct = {q: float(np.percentile(values, q)) for q in (50, 80, 95)}
  frac_low = float(np.mean(values < 0.01))
  top0 = analysis.top_fraction_mask(ent0, mask, 0.2)
  strings = common.token_strings(probe, batch["tokens"])
  high = collections.Counter(strings[i][j] for i, j in zip(*np.nonzero(top0)))
  every = collections.Counter(strings[i][j] for i, j in zip(*np.nonzero(mask)))
  frequent = [(t, c, every[t], c / every[t]) for t, c in high.most_common(10)]
  overlaps = [(0, 1.0)]
  for step in common.checkpoint_steps(run_path):
    logits = common.response_logits(probe, common.checkpoint_params(run_path, step), batch)
    ent = analysis.entropy_of_logits(logits.reshape(-1, logits.shape[-1])).reshape(mask.shape)
    overlaps.append((step, analysis.overlap(top0, analysis.top_fraction_mask(ent, mask, 0.2))))
  return {
      "pct": pct,
      "frac_low": frac_low,
      "frequent": frequent,
      "overlaps": overlaps,
      "n_tokens": int(mask.sum()),
      "values": values,
  }


def main():
  p = common.base_args(__doc__, "forking_tokens")
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument(
      "--study2-steps",
      type=int,
      default=common.STUDY2_STEPS,
      help="length of study 2's runs; the all-tokens run is study 2's clip-higher run, "
      "truncated to --steps",
  )
  p.add_argument("--no-rho-sweep", dest="rho_sweep", action="store_false")
  a = p.parse_args()
  seeds = 1 if a.quick else a.seeds
  steps = common.run_settings(a.quick, a.steps)["num_steps"]
  specs = forking_specs(a.quick, seeds, a.steps, a.study2_steps, a.rho_sweep, a.preset, a.setting)
  runs = collections.defaultdict(list)
  for s in range(seeds):
    for label, sp in specs[s].items():
      runs[label].append(common.truncate(common.read_records(common.ensure_run(a.root, sp)), steps))
  os.makedirs(a.out, exist_ok=True)
  main_labels = ["all tokens (rho 1.0)", "top 20%", "bottom 80%", "random 20%"]
  common.plot_groups(
      {k: runs[k] for k in main_labels},
      [H, R, "entropy/p80", "response/len_mean"],
      os.path.join(a.out, "masks.png"),
  )
  rho_labels = [k for k in ["top 0.1", "top 20%", "top 0.5", "all tokens (rho 1.0)"] if k in runs]
  common.plot_groups({k: runs[k] for k in rho_labels}, [H, R], os.path.join(a.out, "rho.png"))

  ekeys = sorted({k for r in runs["top 20%"][0] for k in r if k.startswith("eval/")})
  grpo_like = runs["all tokens (rho 1.0)"]
  ref_h = np.concatenate([analysis.window_means(common.series(x, H)[1], 10) for x in grpo_like])
  ref_r = np.concatenate([analysis.window_means(common.series(x, R)[1], 10) for x in grpo_like])
  rows = []
  for label in main_labels + [k for k in ("top 0.1", "top 0.5") if k in runs]:
    recs = runs[label]
    try:
      res = common.mean_std(
          [
              analysis.frontier_residual(
                  ref_h,
                  ref_r,
                  analysis.window_means(common.series(x, H)[1], 10),
                  analysis.window_means(common.series(x, R)[1], 10),
              )["mean"]
              for x in recs
          ]
      )
    except (ValueError, RuntimeError):
      res = "n/a"
    rows.append(
        [
            label,
            common.mean_std([common.final_mean(x, H) for x in recs]),
            common.mean_std([common.final_mean(x, R) for x in recs]),
        ]
        + [common.mean_std([common.last_value(x, k) for x in recs]) for k in ekeys]
        + [common.mean_std([common.final_mean(x, "select/n_token_mask", 10**6) for x in recs]), res]
    )

  n_prompts = 16 if a.quick else 64
  ta = token_analysis(common.run_dir(a.root, specs[0]["top 20%"]), n_prompts)
  tb = token_analysis(common.run_dir(a.root, specs[0]["all tokens (rho 1.0)"]), n_prompts)
  freq_rows = [[f"`{t}`", str(c), str(n), f"{f:.2f}"] for t, c, n, f in ta["frequent"]]
  ov_rows = [
      [name, str(s), f"{o:.3f}"]
      for name, t in (("top 20%", ta), ("all tokens", tb))
      for s, o in t["overlaps"]
  ]
  pct_rows = []
  for label in main_labels:
    x = runs[label][0]
    pct_rows.append(
        [label]
        + [
            f"{common.series(x, f'entropy/p{q}')[1][0]:.3f} -> "
            f"{common.final_mean(x, f'entropy/p{q}'):.3f}"
            for q in (50, 80, 95)
        ]
    )

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(4, 2.6))
  ax.hist(ta["values"], bins=40, color="C0")
  ax.axvline(ta["pct"][80], color="k", ls="--", lw=1, label=f"p80 = {ta['pct'][80]:.3f}")
  ax.set_yscale("log")
  ax.set_xlabel("token entropy (nats), starting policy", fontsize=8)
  ax.legend(fontsize=7)
  ax.tick_params(labelsize=7)
  common.save_figure(fig, os.path.join(a.out, "entropy_hist.png"))

  num_steps = steps
  text = f"""# Study 3: forking tokens (HE)

Mode: {'quick' if a.quick else 'full'}; {seeds} seed(s) for the four masks, one seed for the rho sweep; {num_steps} steps
(the all-tokens run is study 2's clip-higher run truncated to {num_steps} steps; its checkpoints are study 2's);
configs/top_entropy.py:{a.preset},MASK (DAPO clip-higher eps_high = 0.28, selection per micro-batch). The
all-tokens run is configs/clip_higher.py (the same loss with rho = 1.0), shared with study 2.

## Token masks and rho

{common.md_table(["update on", "entropy (last 10)", "acc (last 10)"] + [k.replace("eval/", "eval ") for k in ekeys] + ["tokens kept / mini-batch", "residual vs all-tokens curve"], rows)}

The residual is against the all-tokens run's fitted entropy-reward law (10-step means), as in
study 2 (0 = on its curve).

## Entropy percentiles of the rollouts (first step -> last 10 steps)

{common.md_table(["update on", "p50", "p80", "p95"], pct_rows)}

Starting policy on a fixed probe ({n_prompts} eval prompts x 8 samples, {ta['n_tokens']} tokens): p50 = {ta['pct'][50]:.3f},
p80 = {ta['pct'][80]:.3f}, p95 = {ta['pct'][95]:.3f}; {100 * ta['frac_low']:.1f}% of tokens have entropy < 0.01
(HE, Qwen3-8B: p80 = 0.672, 50.64% below 0.01).

![entropy histogram](entropy_hist.png)

## Most frequent high-entropy (top-20%) tokens of the starting policy

{common.md_table(["token", "count in top 20%", "count overall", "share of its occurrences in top 20%"], freq_rows)}

## Overlap of top-20% entropy positions with the starting policy (HE Table 1)

Same probe responses (sampled from the starting policy), entropy recomputed with each checkpoint.

{common.md_table(["run", "checkpoint step", "overlap with step 0"], ov_rows)}

![masks](masks.png)

![rho](rho.png)
"""
  common.write_report(a.out, "report.md", text)


if __name__ == "__main__":
  main()
