"""jaxpt launcher.

uv run python launch.py --config=configs/gqa_glu_rope.py:smoke --workdir=runs/smoke
uv run python launch.py --config=configs/gpt.py --config.train.steps=100 --workdir=runs/gpt
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jaxpt import launcher

config_flags.DEFINE_config_file(
    "config", None, "Preset file, e.g. configs/gpt.py:smoke.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
flags.DEFINE_enum("mode", "train", ["train"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and absl narrate every save at INFO
    launcher.run(flags.FLAGS.config, workdir=flags.FLAGS.workdir, mode=flags.FLAGS.mode)


if __name__ == "__main__":
    app.run(main)
