"""Answer extraction from free text: the last \\boxed{} and GSM8K's '#### N'. No heavy imports."""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}, or `\\boxed 5`), braces matched; else None."""
  matches = list(_BOX_RE.finditer(text))
  if not matches:
    return None
  start = matches[-1].end()
  if start < len(text) and text[start] == "{":
    depth = 0
    for i in range(start, len(text)):
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      if depth == 0:
        return text[start + 1 : i]
    return None
  m = re.match(r"[^\s$]+", text[start:])
  return m.group(0) if m else None


def gsm8k_answer(text: str) -> str | None:
  """The number after GSM8K's last '####', thousands separators removed; None if absent."""
  if "####" not in text:
    return None
  answer = text.rsplit("####", 1)[1].strip().replace(",", "")
  return answer or None
