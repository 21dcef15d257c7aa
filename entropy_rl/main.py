"""CLI: `python -m entropy_rl.main --config=configs/<name>.py[:preset] --workdir=DIR [--config.a.b=v]`.

Rerunning the same command resumes from the latest checkpoint in DIR. Exit status: 0 when the
run finished; 2 for a bad flag, config value or input (one line naming the key or file); 1 when
the run failed (a checkpoint write, repeated non-finite updates); 128 + N when stopped by signal N
(130 Ctrl-C, 143 SIGTERM) after checkpointing the last completed step.
"""

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

# Config files import `configs.<family>`: make the repository root importable wherever we run from.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file(
    "config", None, "ml-collections config file[:preset].", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots (local or gs://).")
flags.mark_flags_as_required(["config", "workdir"])


def _fail(message: str, code: int):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _unknown_override(argv, error: Exception) -> str | None:
  """The `--config.a.b=v` argument that names no config field, with ml_collections' suggestion
  (its KeyError reads `'b' Did you mean "c" instead of "b"?`) as a full dotted name."""
  text = str(error)
  quoted = re.search(r"(\w+)", text)
  missing = quoted.group(1) if quoted else text
  suggested = re.search(r'Did you mean \\?"(\w+)\\?"', text)
  for arg in argv[1:]:
    m = re.match(r"--config\.([\w.]+)", arg)
    parts = m.group(1).split(".") if m else []
    if missing in parts:
      parent = parts[: parts.index(missing)]
      hint = (
          f"; did you mean config.{'.'.join(parent + [suggested.group(1)])}?" if suggested else ""
      )
      return f"{arg}: the config has no field {m.group(1)!r}{hint}"
  return None


def parse_flags(argv):
  """absl flag parsing with one-line errors; the config file is loaded here too."""
  try:
    argv = flags.FLAGS(argv)
    flags.FLAGS.config.keys()  # loads the file (lazily loaded otherwise) and applies overrides
  except flags.Error as e:  # may embed the config file's traceback: keep its first and last line
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}", 2)
  except (AttributeError, KeyError) as e:  # an override naming no field
    _fail(_unknown_override(argv, e) or f"bad --config override: {e}", 2)
  except OSError as e:  # the config file
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f"--config: {lines[-1] if lines else e}", 2)
  except (ValueError, TypeError) as e:
    _fail(f"--config: {e}", 2)
  return argv


def main(argv):
  del argv
  import logging  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.WARNING)  # jax/orbax chatter
  logging.getLogger("entropy_rl").setLevel(logging.INFO)
  import jax  # pylint: disable=g-import-not-at-top  # after flags, so XLA_FLAGS apply

  jax.config.update("jax_threefry_partitionable", True)
  from entropy_rl import checkpoint, interrupt, trainer  # pylint: disable=g-import-not-at-top
  from entropy_rl.errors import ConfigError  # pylint: disable=g-import-not-at-top

  try:
    trainer.train(flags.FLAGS.config, flags.FLAGS.workdir)
  except ConfigError as e:
    _fail(str(e), 2)
  except interrupt.Interrupted as e:
    _fail(str(e), e.exit_code)
  except (checkpoint.CheckpointSaveError, FloatingPointError) as e:
    _fail(str(e), 1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
