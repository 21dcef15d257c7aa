"""The project's own character tokenizer, served through `transformers.AutoTokenizer`.

Built with the `tokenizers` library (one token per character of the tasks' alphabet, plus `<pad>`,
`<bos>`, `<eos>`; a `<bos>` is prepended when encoding), saved as `tokenizer.json`, and reloaded
with `AutoTokenizer.from_pretrained` exactly like a real model's tokenizer, so one code path serves
the embedded default and real checkpoints. A character outside the alphabet is an encoding error,
never silently dropped.
"""

from __future__ import annotations

import os

import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors

from entropy_rl.data import tasks as tasks_lib

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2


def build_char_tokenizer(path: str | os.PathLike, alphabet: str | None = None):
  """Writes a character tokenizer over `alphabet` (default: every task's) to `path`; returns it reloaded."""
  chars = sorted(set(alphabet if alphabet is not None else tasks_lib.alphabet()))
  if not chars:
    raise ValueError("alphabet is empty")
  vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + chars)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=None))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
  )
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left"
  )
  fast.save_pretrained(str(path))
  return load_tokenizer(path)


def load_tokenizer(path: str | os.PathLike):
  """`AutoTokenizer` from a local directory (never the hub); pad, bos and eos must be set."""
  tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  if tok.pad_token_id is None:
    if tok.eos_token_id is None:
      raise ValueError(f"tokenizer at {path} has neither pad_token nor eos_token")
    tok.pad_token = tok.eos_token
  tok.padding_side = "left"
  return tok


def decode_responses(tokenizer, tokens_NxL: np.ndarray, mask_NxL: np.ndarray) -> list[str]:
  """Response strings: the masked tokens of each row, special tokens (EOS included) removed."""
  tokens_NxL, mask_NxL = np.asarray(tokens_NxL), np.asarray(mask_NxL).astype(bool)
  return tokenizer.batch_decode(
      [row[m].tolist() for row, m in zip(tokens_NxL, mask_NxL)], skip_special_tokens=True
  )
