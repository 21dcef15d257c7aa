"""CLI: `python -m entropy_rl.main --config=configs/<name>.py[:preset] --workdir=DIR [--config.a.b=v]`.

Rerunning the same command resumes from the latest checkpoint in DIR.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

# Config files import `configs.<family>`: make the repository root importable wherever we run from.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", None, "ml-collections config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plots (local or gs://).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # jax/orbax chatter
  logging.getLogger("entropy_rl").setLevel(logging.INFO)
  import jax  # after absl parsed flags, so XLA_FLAGS from the environment apply
  jax.config.update("jax_threefry_partitionable", True)
  from entropy_rl import trainer
  trainer.train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
