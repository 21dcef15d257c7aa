"""Local JSONL files -> a TFDS dataset in ArrayRecord format, readable without TensorFlow.

The result lives in `data_dir/<name>/<version>/` and is read like any prepared TFDS dataset:
`tfds.data_source(name, split=..., data_dir=data_dir)` or `TfdsSource(name, data_dir=...)`.
Each record holds `question`, `answer` (the gold answer as text, after `answer_format`) and
`index` (the line's position among the file's records).

  python -m entropy_rl.data.tfds_builder --name=gsm8k --data_dir=$TFDS_DATA_DIR \
      --split=train=../shared/data/gsm8k_train.jsonl --split=test=../shared/data/gsm8k_test.jsonl \
      --question_field=question --answer_field=answer --answer_format=gsm8k
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from typing import Mapping

import numpy as np

from entropy_rl.data.sources import question_and_answer, read_jsonl


def _records(path, question_field, answer_field, answer_format):
  for index, (where, record) in enumerate(read_jsonl(path)):
    question, answer = question_and_answer(
        where, record, question_field, answer_field, answer_format
    )
    yield index, {"question": question, "answer": answer, "index": index}


def build_jsonl_dataset(
    name: str,
    splits: Mapping[str, str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    question_field: str = "problem",
    answer_field: str = "answer",
    answer_format: str = "raw",
    version: str = "1.0.0",
    overwrite: bool = False,
) -> str:
  """Builds dataset `name` with one split per JSONL file; returns its directory. An existing build
  of the same name and version is reused unless `overwrite`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"name must be snake_case (a TFDS dataset name), got {name!r}")
  if not splits:
    raise ValueError("splits is empty: give at least one split=path")
  for split, path in splits.items():
    if not os.path.isfile(path):
      raise ValueError(f"split '{split}': no such file {path}")
    if not any(True for _ in _records(path, question_field, answer_field, answer_format)):
      raise ValueError(f"split '{split}': {path} has no records")

  builder_dir = os.path.join(os.fspath(data_dir), name, version)
  if overwrite and os.path.isdir(builder_dir):
    shutil.rmtree(builder_dir)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"JSONL prompts: {dict(splits)}",
        features=tfds.features.FeaturesDict(
            {
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(path) for split, path in splits.items()}

  def _generate_examples(self, path):
    return _records(path, question_field, answer_field, answer_format)

  with tfds.core.registered.skip_registration():
    builder_cls = type(
        f"JsonlBuilder_{name}",
        (tfds.core.GeneratorBasedBuilder,),
        {
            "name": name,
            "VERSION": tfds.core.Version(version),
            "_info": _info,
            "_split_generators": _split_generators,
            "_generate_examples": _generate_examples,
        },
    )
  builder = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder_dir


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--name", required=True)
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR"))
  parser.add_argument(
      "--split", action="append", required=True, help="SPLIT=PATH.jsonl, repeatable"
  )
  parser.add_argument("--question_field", default="problem")
  parser.add_argument("--answer_field", default="answer")
  parser.add_argument("--answer_format", default="raw")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  if not args.data_dir:
    parser.error("--data_dir (or TFDS_DATA_DIR) is required")
  if not all("=" in s for s in args.split):
    parser.error("--split takes SPLIT=PATH.jsonl")
  splits = dict(s.split("=", 1) for s in args.split)
  print(
      build_jsonl_dataset(
          args.name,
          splits,
          args.data_dir,
          question_field=args.question_field,
          answer_field=args.answer_field,
          answer_format=args.answer_format,
          overwrite=args.overwrite,
      )
  )


if __name__ == "__main__":
  main()
