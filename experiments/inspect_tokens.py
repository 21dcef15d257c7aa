"""Token inspector: sampled responses with each token coloured by its entropy and by its covariance.

Loads a run's starting policy (step 0, the warm start) or a checkpoint, samples G responses to a
few eval prompts, and renders every response token twice: background = entropy of the policy at
that position (white -> red, HE's forking tokens stand out), and = covariance
(A - mean A)(logp - mean logp) over the batch (blue negative, red positive; EM Eq. 10's high-
covariance tokens are the ones Clip-Cov / KL-Cov act on). Writes tokens.html and tokens.png.

  python -m experiments.inspect_tokens --run /work/runs/f_grpo_s0 --step 0 --out DIR
  python -m experiments.inspect_tokens --run /work/runs/f_grpo_s0 --step -1   # last checkpoint
"""

from __future__ import annotations

import argparse
import html
import os

import numpy as np

from entropy_rl import analysis
from experiments import common


def _entropy_color(h, h_max):
  t = float(np.clip(h / max(h_max, 1e-9), 0, 1))
  return (1.0, 1.0 - 0.8 * t, 1.0 - 0.8 * t)


def _cov_color(c, c_max):
  t = float(np.clip(c / max(c_max, 1e-9), -1, 1))
  return (1.0, 1.0 - 0.8 * t, 1.0 - 0.8 * t) if t >= 0 else (1.0 + 0.8 * t, 1.0 + 0.8 * t, 1.0)


def _css(rgb):
  return "#%02x%02x%02x" % tuple(int(255 * x) for x in rgb)


def inspect(run: str, step: int, num_prompts: int, num_samples: int, seed: int = 7) -> dict:
  steps = common.checkpoint_steps(run)
  if step < 0:
    step = steps[-1] if steps else 0
  probe = common.load_probe(run)
  batch = common.sample_probe(
      probe, common.checkpoint_params(run, step), num_prompts, num_samples, seed=seed
  )
  cov = analysis.token_covariance(batch["logp"], batch["adv"], batch["mask"])
  return {
      "step": step,
      "batch": batch,
      "cov": cov,
      "strings": common.token_strings(probe, batch["tokens"]),
      "eos": probe.tokenizer.eos_token,
  }


def render_html(res: dict, title: str) -> str:
  b, cov, strings = res["batch"], res["cov"], res["strings"]
  mask = b["mask"] > 0
  h_max = float(np.percentile(b["entropy"][mask], 99))
  c_max = float(np.percentile(np.abs(cov[mask]), 99))
  top = analysis.top_fraction_mask(b["entropy"], b["mask"], 0.2)
  out = [
      f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
      "body{font-family:monospace;font-size:14px} span.t{padding:1px 2px;margin:0 1px}"
      " span.fork{outline:1px solid #333} td{padding:2px 8px}</style></head><body>",
      f"<h3>{html.escape(title)}</h3><p>Left: entropy (white 0 -> red {h_max:.2f} nats, "
      "outlined = top 20% of the batch). Right: covariance (blue negative, red positive, "
      f"|cov| {c_max:.2f} = full colour). Hover a token for its values.</p><table>",
  ]
  g = b["num_samples"]
  for n in range(len(strings)):
    ex = b["examples"][n // g]
    if n % g == 0:
      out.append(
          f"<tr><td colspan=4><b>{html.escape(ex.prompt)}</b> (answer {ex.answer})</td></tr>"
      )
    cells = []
    for kind in ("entropy", "cov"):
      spans = []
      for t in range(len(strings[n])):
        if not mask[n, t]:
          break
        s = strings[n][t]
        s = "⏎" if s == res["eos"] else s
        color = (
            _entropy_color(b["entropy"][n, t], h_max)
            if kind == "entropy"
            else _cov_color(cov[n, t], c_max)
        )
        cls = "t fork" if kind == "entropy" and top[n, t] else "t"
        tip = f"H={b['entropy'][n, t]:.3f} cov={cov[n, t]:+.3f} logp={b['logp'][n, t]:.3f}"
        spans.append(
            f"<span class='{cls}' style='background:{_css(color)}' title='{tip}'>"
            f"{html.escape(s)}</span>"
        )
      cells.append("".join(spans))
    mark = "✓" if b["rewards"][n] > 0 else "✗"
    out.append(
        f"<tr><td>{mark}</td><td>{cells[0]}</td><td>{cells[1]}</td>"
        f"<td>A={b['adv'][n][mask[n]][0] if mask[n].any() else 0:+.2f}</td></tr>"
    )
  out.append("</table></body></html>")
  return "\n".join(out)


def render_png(res: dict, title: str, path: str, max_rows: int = 16):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Rectangle

  b, cov, strings = res["batch"], res["cov"], res["strings"]
  mask = b["mask"] > 0
  h_max = float(np.percentile(b["entropy"][mask], 99))
  c_max = float(np.percentile(np.abs(cov[mask]), 99))
  rows = min(max_rows, len(strings))
  width = int(mask.sum(1).max())
  fig, axes = plt.subplots(1, 2, figsize=(2 * (0.25 * width + 1.5), 0.25 * rows + 0.8))
  for ax, kind in zip(axes, ("entropy", "covariance")):
    for n in range(rows):
      y = rows - 1 - n
      ax.text(
          -0.4, y + 0.5, "✓" if b["rewards"][n] > 0 else "✗", fontsize=7, va="center", ha="right"
      )
      for t in range(width):
        if not mask[n, t]:
          break
        color = (
            _entropy_color(b["entropy"][n, t], h_max)
            if kind == "entropy"
            else _cov_color(cov[n, t], c_max)
        )
        ax.add_patch(Rectangle((t, y), 1, 1, color=color))
        s = strings[n][t]
        ax.text(
            t + 0.5,
            y + 0.5,
            "⏎" if s == res["eos"] else s,
            fontsize=7,
            ha="center",
            va="center",
            family="monospace",
        )
    ax.set_xlim(-1, width)
    ax.set_ylim(0, rows)
    ax.axis("off")
    ax.set_title(f"{kind} ({title})", fontsize=8)
  common.save_figure(fig, path)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--run", required=True, help="a run dir made by experiments/common.py")
  p.add_argument("--step", type=int, default=-1, help="checkpoint step; 0 = warm start, -1 = last")
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--samples", type=int, default=4)
  p.add_argument("--out", required=True)
  p.add_argument("--name", default="tokens")
  a = p.parse_args()
  res = inspect(a.run, a.step, a.prompts, a.samples)
  title = f"{os.path.basename(a.run.rstrip('/'))} step {res['step']}"
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, f"{a.name}.html"), "w") as f:
    f.write(render_html(res, title))
  render_png(res, title, os.path.join(a.out, f"{a.name}.png"))
  print(f"wrote {a.out}/{a.name}.html and .png")


if __name__ == "__main__":
  main()
