"""Sequence packing for the update: no model compute on the padding a micro-batch's rows carry.

A rollout row is [left-padded prompt | response | right padding]; its real tokens are one
contiguous span. `pack` places each micro-batch's spans into as few rows ("bins") of the same
length S as first-fit-decreasing allows, each token with its own position and a segment id that
keeps it attending only to its own row (`models.attention`). The model runs on the bins; the
response tokens' log-probs and entropies are gathered back to the row layout, so every loss, mask
and denominator is unchanged: a packed update is the unpacked update, up to float rounding.

Packing stays inside each device's share of each micro-batch, so no row crosses a device. The
update splits a rollout of N rows with strides (`sharding.split_rows`): micro-batch u of mini-batch m
holds the rows n with n mod M = m and (n // M) mod U = u, and the device holding row n is
n // (N / D). For that group of rows the device holds `bins` bins; bin b of group g = m + M * u on
device d is packed row g + M * U * (d * bins + b), so the same strided splits hand every micro-batch
(and every chunk of the no-grad passes) its own bins. `bins` is the largest count any group needs,
rounded up to an eighth of a group's rows (at most `SHAPES` compiled shapes), agreed over hosts.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from entropy_rl.distributed import gather

SHAPES = 8  # bins per group are rounded up to eighths of its rows: at most 8 compiled shapes


@flax.struct.dataclass
class Packed:
  """A rollout's packed rows ([Q, S], Q = M * U * D * bins) and, per response token of each of its
  N rows ([N, L]), where the hidden state that predicts it lies: bin * S + offset in its group's
  bins on its device."""

  tokens: Any  # int32 [Q, S], 0 on padding
  positions: Any  # int32 [Q, S], each token's position in its own row
  segments: Any  # int32 [Q, S], 1, 2, ... per row within a bin, 0 on padding
  index: Any  # int32 [N, L]
  shards: int = flax.struct.field(pytree_node=False, default=1)  # D: row shards of the batch
  bins: int = flax.struct.field(pytree_node=False, default=1)  # bins a group holds on a device


def first_fit_decreasing(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
  """(bin, offset) of each item: longest first, each into the first bin with room."""
  lengths = np.asarray(lengths, np.int64)
  bin_of = np.zeros(len(lengths), np.int64)
  offset = np.zeros(len(lengths), np.int64)
  used: list[int] = []
  for i in np.argsort(-lengths, kind="stable"):
    b = next((b for b, u in enumerate(used) if u + lengths[i] <= capacity), len(used))
    if b == len(used):
      used.append(0)
    bin_of[i], offset[i] = b, used[b]
    used[b] += lengths[i]
  return bin_of, offset


def pack(tokens_NxS, attn_mask_NxS, response_len: int, *, groups: int, shards: int) -> Packed:
  """This host's rows, packed within each (micro-batch group, device) of the module docstring.

  `groups` = M * U, the update's mini-batches times micro-batches; `shards` = D, the row shards of
  the whole batch (this host's rows are those of `shards * rows here / all rows` of them).
  """
  tokens_NxS, mask_NxS = np.asarray(tokens_NxS), np.asarray(attn_mask_NxS).astype(bool)
  n, s = tokens_NxS.shape
  total = int(np.sum(gather(np.array([n], np.int64))))
  local_shards = shards * n // total
  if n * shards % total or n % (local_shards * groups):
    raise ValueError(
        f"packing {n} of {total} rows: each of {shards} row shards needs a multiple of the "
        f"update's {groups} mini- x micro-batches"
    )
  lengths = mask_NxS.sum(1)
  starts = np.where(lengths > 0, mask_NxS.argmax(1), 0)
  columns = np.arange(s)[None]
  if np.any(mask_NxS != ((columns >= starts[:, None]) & (columns < (starts + lengths)[:, None]))):
    raise ValueError("packing needs each row's real tokens (attn_mask) to be contiguous")
  group, shard = np.arange(n) % groups, np.arange(n) // (n // local_shards)
  bin_of, offset = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for d in range(local_shards):
    for g in range(groups):
      rows = np.flatnonzero((shard == d) & (group == g))
      bin_of[rows], offset[rows] = first_fit_decreasing(lengths[rows], s)
  need = int(np.max(gather(np.array([bin_of.max(initial=0) + 1], np.int64))))
  per_group = n // local_shards // groups
  step = -(-per_group // SHAPES)
  bins = min(-(-need // step) * step, per_group)

  out_tok, out_pos, out_seg = (np.zeros((groups * local_shards * bins, s), np.int32) for _ in "tps")
  packed_row = group + groups * (shard * bins + bin_of)
  for i in range(n):
    span, dest = slice(starts[i], starts[i] + lengths[i]), slice(offset[i], offset[i] + lengths[i])
    out_tok[packed_row[i], dest] = tokens_NxS[i, span]
    out_pos[packed_row[i], dest] = np.arange(lengths[i])
    out_seg[packed_row[i], dest] = i + 1  # distinct within the bin
  # Response token t sits at column s - L + t of its row and is predicted by the column before it.
  before_NxL = np.arange(s - response_len - 1, s - 1)[None] - starts[:, None]
  index_NxL = bin_of[:, None] * s + offset[:, None] + np.clip(before_NxL, 0, s - 1)
  index_NxL = np.where(mask_NxS[:, s - response_len :], index_NxL, 0).astype(np.int32)
  return Packed(out_tok, out_pos, out_seg, index_NxL, shards=shards, bins=bins)


def unpack(x_QxS, packed: Packed):
  """Per-token values of packed rows ([Q, S]; the whole batch or any chunk of its strided splits)
  at their rows' response tokens, [rows, L]; each device gathers from its own bins."""
  d, (q, s) = packed.shards, x_QxS.shape
  rows = packed.index.shape[0]
  groups_here = q // d // packed.bins  # the groups this chunk holds, interleaved
  index_DxRxL = packed.index.reshape(d, rows // d, -1)
  group_1xRx1 = (jnp.arange(rows // d) % groups_here)[None, :, None]
  flat_DxRxL = (group_1xRx1 + groups_here * (index_DxRxL // s)) * s + index_DxRxL % s
  x_DxF = x_QxS.reshape(d, q // d * s)
  return jax.vmap(lambda x, i: x[i])(x_DxF, flat_DxRxL).reshape(rows, -1)
