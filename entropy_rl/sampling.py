"""KV-cache sampler with continuous batching: a jitted prefill, then a jitted `lax.while_loop` that
decodes a fixed number of rows in flight over a donated cache.

Prompts arrive left-padded (`prompt_mask_BxP` marks real tokens). Each prompt is prefilled once,
into a cache of its P prompt slots only (`prefill_chunks` strided chunks of prompts one after
another, which bounds the prefill's activations); every (prompt, sample) pair n = b * G + g (prompt-major)
then draws its response token 0 from that prefill. Pairs that need more tokens wait in a queue, in
index order; R = `max_rows_in_flight` slots (0: one per pair) each hold one pair: its prompt's
cache rows copied into slots 0 .. P - 1 of a row of P + L slots, response token t at slot P + t, its
own position and write offset. A decode step advances every slot by one token; a slot whose pair
emits a stop id (the stop token is part of the response) or reaches `max_new_tokens` takes the next
queued pair; the loop ends when queue and slots are empty. Every shape is static; the KV cache
holds R x (P + L) slots, whatever the number of pairs. With the rows split over D devices (the
prompts' sharding), each device's R / D slots take only its own B / D prompts' pairs, from a queue
of its own, so a refill copies cache rows within a device.

A decode step is weight-stationary (`sharding.decode_rules`): its activations' rows are split over
'data' only, so every matmul contracts the FSDP-split serving weight where it lies and all-reduces
the [rows, features] partial sums, where gathering the weights would move all of them every token;
the attention runs on the cache's rows, split over every batch axis.

Token t of pair n is drawn with key `fold_in(fold_in(rng, n), t)` from softmax(logits / T) (by
two-level inverse CDF, `_categorical`), optionally truncated by top-k then top-p, or taken
greedily, so with the same key the responses do not depend on R or on which slot a pair gets. Its
log-prob and the entropy are those of the temperature-scaled FULL distribution, computed by
`stats.token_logprobs_and_entropy`, exactly what the trainer recomputes.

The decoder reads serving weights: the parameters cast to the model's compute dtype (bf16 on
accelerators) and split per layer, prepared once per call (`_serving_params`); the caller's
(float32 master) parameters are not changed.

The jitted functions are module-level with the model and the sampling settings static, so each
static shape compiles once and is reused. Sharded inputs (params over the mesh, prompts with rows
over the data axes) propagate through jit; every [N, ...] output keeps the prompts' row sharding.
"""

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from entropy_rl import sharding, stats
from entropy_rl.models.decoder import Decoder, init_cache, unstack_layers


class SampleOutput(NamedTuple):
  tokens_NxL: jax.Array  # int32 response tokens, pad_id after the end
  mask_NxL: jax.Array  # int32, 1 for response tokens including the stop token
  logprobs_NxL: jax.Array  # float32 log pi_T(token), 0 where mask is 0
  entropy_NxL: jax.Array | None  # float32 entropy of pi_T, 0 where mask is 0; None unless asked
  prompt_NxP: jax.Array  # the prompts, each repeated num_samples times
  prompt_mask_NxP: jax.Array


@dataclasses.dataclass(frozen=True)
class _Settings:
  num_samples: int
  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  greedy: bool
  stop_ids: tuple[int, ...]
  pad_id: int
  return_entropy: bool
  rows_in_flight: int  # R slots, 1 <= R <= N
  rows: jax.sharding.NamedSharding | None  # the prompts' row sharding, kept by every output
  # The KV buffers' [B, K, ...]: rows as `rows`, KV heads as the weights' (`_cache_sharding`).
  cache: jax.sharding.NamedSharding | None = None
  # Row shards (the devices over `rows`' axes) with queues of their own: each shard's slots take
  # only its own prompts' pairs, so the refill copies KV rows within a device (`_refill`).
  shards: int = 1
  prefill_chunks: int = 1  # C: the prompts are prefilled C strided chunks at a time


def _row_sharding(x):
  """NamedSharding of x's leading (row) axis, or None if x is not a NamedSharding-ed array."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = sharding.spec
  return jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(spec[0] if len(spec) else None)
  )


def _cache_sharding(rows, k_proj):
  """The KV cache's sharding: rows (axis 0) as the prompts', KV heads (axis 1) over the mesh axes
  of the (stacked, [layers, D, K, H]) k_proj weight's KV-head axis, so that tensor parallelism
  splits the cache as it splits the heads; None without a row sharding."""
  if rows is None:
    return None
  weight = getattr(k_proj, "sharding", None)
  heads = None
  if isinstance(weight, jax.sharding.NamedSharding) and weight.mesh.shape == rows.mesh.shape:
    spec = tuple(weight.spec) + (None,) * 4
    row_axes = rows.spec[0] if isinstance(rows.spec[0], tuple) else (rows.spec[0],)
    axes = spec[2] if isinstance(spec[2], tuple) else (spec[2],)
    heads = None if set(axes) & set(row_axes) else spec[2]
  return jax.sharding.NamedSharding(rows.mesh, jax.sharding.PartitionSpec(rows.spec[0], heads))


def _keep_rows(x, s: _Settings):
  return x if s.rows is None else jax.lax.with_sharding_constraint(x, s.rows)


def _keep_cache(cache, s: _Settings):
  """The K and V buffers of `cache` constrained to `s.cache`."""
  if s.cache is None:
    return cache
  keep = functools.partial(jax.lax.with_sharding_constraint, shardings=s.cache)
  return dict(cache, k=tuple(map(keep, cache["k"])), v=tuple(map(keep, cache["v"])))


def _truncate(z_NxV, top_k, top_p):
  """Logits with tokens outside the top-k, then outside the top-p nucleus, set to -inf."""
  if top_k > 0:
    kth_N = jax.lax.top_k(z_NxV, top_k)[0][:, -1]
    z_NxV = jnp.where(z_NxV < kth_N[:, None], -jnp.inf, z_NxV)
  if top_p < 1.0:
    # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
    sorted_NxV = -jnp.sort(-z_NxV, axis=-1)
    p_NxV = jax.nn.softmax(sorted_NxV, axis=-1)
    mass_before_NxV = jnp.cumsum(p_NxV, axis=-1) - p_NxV
    n_keep_N = jnp.maximum(jnp.sum(mass_before_NxV < top_p, axis=-1), 1)
    threshold_N = jnp.take_along_axis(sorted_NxV, n_keep_N[:, None] - 1, axis=-1)
    z_NxV = jnp.where(z_NxV < threshold_N, -jnp.inf, z_NxV)
  return z_NxV


def _categorical(keys_N, z_NxV, block: int = 128):
  """One draw per row from softmax(z_NxV), row n with its own key keys_N[n], by inverse CDF in two
  levels: a block of `block` tokens with probability its mass, then a token within it. Exact like
  the Gumbel-max trick (which `jax.random.categorical` uses) but with two uniforms per row instead
  of V (V random numbers cost 3x a forward step of a 10M-parameter policy on CPU), and float32
  prefix sums of at most max(V / block, block) terms. Zero-probability tokens (z = -inf) are never
  drawn."""
  N, V = z_NxV.shape
  p_NxV = jnp.exp(z_NxV - jnp.max(z_NxV, axis=-1, keepdims=True))
  p_NxMxC = jnp.pad(p_NxV, ((0, 0), (0, -V % block))).reshape(N, -1, block)
  # u in (0, 1], so the first prefix sum >= u * total ends at a token of positive probability.
  u_Nx2 = jax.vmap(lambda key: jax.random.uniform(key, (2,)))(keys_N)
  u_2xNx1 = 1.0 - u_Nx2.T[:, :, None]

  def first_reaching(cdf_NxK, u_Nx1):
    return jnp.sum(cdf_NxK < u_Nx1 * cdf_NxK[:, -1:], axis=-1)

  block_N = first_reaching(jnp.cumsum(jnp.sum(p_NxMxC, axis=-1), axis=-1), u_2xNx1[0])
  within_NxC = jnp.take_along_axis(p_NxMxC, block_N[:, None, None], axis=1)[:, 0]
  return block_N * block + first_reaching(jnp.cumsum(within_NxC, axis=-1), u_2xNx1[1])


def _choose(logits_NxV, rng, pair_N, t_N, s: _Settings):
  """(token_N, logp_N, entropy_N): token t_N[i] of pair pair_N[i], for each row i."""
  if s.greedy:
    token_N = jnp.argmax(logits_NxV, axis=-1)
  else:
    keys_N = jax.vmap(lambda n, t: jax.random.fold_in(jax.random.fold_in(rng, n), t))(pair_N, t_N)
    z_NxV = _truncate(logits_NxV.astype(jnp.float32) / s.temperature, s.top_k, s.top_p)
    token_N = _categorical(keys_N, z_NxV)
  token_N = token_N.astype(jnp.int32)
  logp_Nx1, entropy_Nx1 = stats.token_logprobs_and_entropy(
      logits_NxV[:, None], token_N[:, None], s.temperature
  )
  return token_N, logp_Nx1[:, 0], entropy_Nx1[:, 0]


def _is_stop(token_N, stop_ids):
  return (
      jnp.isin(token_N, jnp.asarray(stop_ids, jnp.int32))
      if stop_ids
      else jnp.zeros_like(token_N, bool)
  )


@functools.partial(jax.jit, static_argnames="dtype")
def _serving_params(params, *, dtype):
  """The parameters in the compute dtype, with the stacked layers split (`unstack_layers`), so the
  decode loop reads each layer's weights in place. The decoder casts every weight to this dtype
  before use, so serving weights give the same logits as the master ones."""
  return unstack_layers(jax.tree.map(lambda x: x.astype(dtype), params))


_OUTPUTS = ("tokens", "mask", "logprobs", "entropy")


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _prefill(params, prompt_BxP, prompt_mask_BxP, rng, *, model: Decoder, s: _Settings):
  """Runs the prompts into a cache of their P slots, draws every pair's response token 0 (the G
  samples of a prompt share its prefill) and returns the decode state with every slot empty."""
  B, P = prompt_BxP.shape
  G, L, R, C = s.num_samples, s.max_new_tokens, s.rows_in_flight, s.prefill_chunks
  N = B * G
  prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)

  def prefill_chunk(_, chunk):  # B / C prompts: rows c, c + C, ... of the batch
    prompt_bxP, mask_bxP = chunk
    hidden_bxPxD, cache = model.apply(
        {"params": params},
        prompt_bxP.astype(jnp.int32),
        init_cache(model.config, B // C, P),
        mask_bxP,
        return_hidden=True,
        method=Decoder.decode,
    )
    logits_bxV = model.apply({"params": params}, hidden_bxPxD[:, -1:], method=Decoder.unembed)
    return None, (logits_bxV[:, 0], dict(cache, index=None))

  chunks = sharding.split_rows((prompt_BxP, prompt_mask_BxP), C)
  _, (logits_CxbxV, cache_C) = jax.lax.scan(prefill_chunk, None, chunks)
  logits_BxV = sharding.merge_rows(logits_CxbxV)
  prompt_cache = dict(sharding.merge_rows(cache_C), index=jnp.int32(P))

  def repeat(x_BxA):
    return _keep_rows(jnp.repeat(x_BxA, G, axis=0), s)

  pair_N = jnp.arange(N, dtype=jnp.int32)
  token_N, logp_N, entropy_N = _choose(repeat(logits_BxV), rng, pair_N, jnp.zeros_like(pair_N), s)
  done_N = _is_stop(token_N, s.stop_ids) | (L == 1)
  columns = dict(tokens=token_N, mask=jnp.ones_like(token_N), logprobs=logp_N, entropy=entropy_N)
  fill = dict(tokens=s.pad_id, mask=0, logprobs=0.0, entropy=0.0)
  outputs = {
      name: _keep_rows(jnp.full((N, L), fill[name], col_N.dtype).at[:, 0].set(col_N), s)
      for name, col_N in columns.items()
      if name != "entropy" or s.return_entropy
  }
  empty = init_cache(model.config, R, P + L)
  slots = _keep_cache(dict(k=empty["k"], v=empty["v"], mask=empty["mask"]), s)
  state = dict(
      **outputs,
      slots=slots,
      prompt_cache=_keep_cache(prompt_cache, s),
      prompt_len=jnp.sum(prompt_mask_BxP, axis=1),
      # One queue per row shard, over its own block of pairs: undone pairs first, in order.
      queue=_keep_rows(_shard_queues(done_N, s.shards), s),
      num_queued=jnp.sum(~done_N.reshape(s.shards, -1), axis=1).astype(jnp.int32),
      cursor=jnp.zeros((s.shards,), jnp.int32),
      pair=jnp.full((R,), N, jnp.int32),  # N = an empty slot
      t=jnp.ones((R,), jnp.int32),  # the slot's next token index
      prev=jnp.zeros((R,), jnp.int32),  # the slot's last token, the next step's input
      rng=rng,
  )
  return state, repeat(prompt_BxP.astype(jnp.int32)), repeat(prompt_mask_BxP)


def _shard_queues(done_N, shards: int):
  """[N] pair ids: block d (of `shards` equal blocks) lists block d's undone pairs first, in order."""
  done_DxM = done_N.reshape(shards, -1)
  offset_Dx1 = jnp.arange(shards, dtype=jnp.int32)[:, None] * done_DxM.shape[1]
  return (jnp.argsort(done_DxM, axis=1, stable=True).astype(jnp.int32) + offset_Dx1).reshape(-1)


_REFILL_READS = ("slots", "prompt_cache", "pair", "t", "prev", "cursor", "num_queued", "queue")


def _refill(st, s: _Settings):
  """Gives each empty slot the next pair of its row shard's queue (`_refill_shard`): with the rows
  split over devices, every shard runs its own refill (`shard_map`), so a prompt's cached keys and
  values are copied within the device that holds them, never gathered."""
  part = {name: st[name] for name in _REFILL_READS}
  part["first"] = st["tokens"][:, 0]
  if s.shards == 1:
    return dict(st, **_refill_shard(part, s, shard=0))
  rows, heads = s.cache.spec[0], s.cache.spec[1]
  kv = jax.sharding.PartitionSpec(rows, heads)
  row = jax.sharding.PartitionSpec(rows)

  def cache_specs(cache):
    out = dict(k=(kv,) * len(cache["k"]), v=(kv,) * len(cache["v"]), mask=row)
    return out if "index" not in cache else dict(out, index=jax.sharding.PartitionSpec())

  specs = {name: row for name in part}
  specs.update(slots=cache_specs(part["slots"]), prompt_cache=cache_specs(part["prompt_cache"]))
  out_specs = {name: specs[name] for name in ("slots", "pair", "t", "prev", "cursor")}
  axes = rows if isinstance(rows, tuple) else (rows,)
  refill = jax.shard_map(
      lambda x: _refill_shard(x, s, shard=jax.lax.axis_index(axes)),
      mesh=s.rows.mesh,
      in_specs=(specs,),
      out_specs=out_specs,
      check_vma=False,
  )
  return dict(st, **refill(part))


def _refill_shard(st, s: _Settings, shard):
  """One row shard's refill: its empty slots take its queue's next pairs, each slot its prompt's
  cache rows and mask, token index 1 and token 0 as input. Copies one slot at a time, so the work
  grows with the pairs taken. `st` holds the shard's rows (pair ids stay global; N, all pairs,
  marks an empty slot) and its queue's cursor and length, shape [1]."""
  R, M = st["pair"].shape[0], st["first"].shape[0]
  N, first_pair = M * s.shards, shard * M
  first_prompt = shard * st["prompt_cache"]["mask"].shape[0]
  free_R = st["pair"] >= N
  queue_pos_R = st["cursor"][0] + jnp.cumsum(free_R) - 1
  take_R = free_R & (queue_pos_R < st["num_queued"][0])
  pair_R = jnp.where(take_R, st["queue"][jnp.minimum(queue_pos_R, M - 1)], st["pair"])
  taken = jnp.sum(take_R).astype(jnp.int32)
  slot_R = jnp.nonzero(take_R, size=R, fill_value=0)[0].astype(jnp.int32)
  L = st["slots"]["mask"].shape[1] - st["prompt_cache"]["mask"].shape[1]

  def copy_prompt(i, slots):
    slot = slot_R[i]
    b = pair_R[slot] // s.num_samples - first_prompt
    prompt = st["prompt_cache"]

    def copy(dst, src):  # src [B, ..., P] -> dst [R, ..., P + L], into the row's prompt slots
      row = jax.lax.dynamic_index_in_dim(src, b, 0)
      return jax.lax.dynamic_update_slice(dst, row, [slot] + [0] * (dst.ndim - 1))

    mask_1xS = jnp.pad(jax.lax.dynamic_index_in_dim(prompt["mask"], b, 0), ((0, 0), (0, L)))
    return dict(
        slots,
        k=tuple(copy(d, x) for d, x in zip(slots["k"], prompt["k"])),
        v=tuple(copy(d, x) for d, x in zip(slots["v"], prompt["v"])),
        mask=jax.lax.dynamic_update_slice(slots["mask"], mask_1xS, (slot, 0)),
    )

  slots = jax.lax.fori_loop(0, taken, copy_prompt, st["slots"])
  first_R = st["first"][jnp.clip(pair_R - first_pair, 0, M - 1)]
  return dict(
      slots=slots,
      pair=pair_R,
      cursor=st["cursor"] + taken,
      t=jnp.where(take_R, 1, st["t"]),
      prev=jnp.where(take_R, first_R, st["prev"]),
  )


@functools.partial(jax.jit, static_argnames=("model", "s"), donate_argnames="state")
def _decode(params, state, *, model: Decoder, s: _Settings):
  """Draws the queued pairs' response tokens 1 .. L-1, one per slot per iteration, refilling slots
  as their pairs finish, until queue and slots are empty."""
  N, L = state["tokens"].shape
  P = state["prompt_cache"]["mask"].shape[1]

  def body(st):
    st = _refill(st, s)
    pair_R, t_R = st["pair"], st["t"]
    live_R = pair_R < N
    position_R = st["prompt_len"][jnp.minimum(pair_R, N - 1) // s.num_samples] + t_R - 1
    with nn.logical_axis_rules(sharding.decode_rules()):
      logits_Rx1xV, slots = model.apply(
          {"params": params},
          st["prev"][:, None],
          dict(st["slots"], index=P + t_R - 1),
          positions_BxT=position_R[:, None],
          method=Decoder.decode,
      )
      logits_Rx1xV = nn.with_logical_constraint(logits_Rx1xV, ("cache_batch", "length", "vocab"))
    token_R, logp_R, entropy_R = _choose(logits_Rx1xV[:, 0], st["rng"], pair_R, t_R, s)
    columns = dict(tokens=token_R, mask=jnp.ones_like(token_R), logprobs=logp_R, entropy=entropy_R)
    slots = _keep_cache({name: x for name, x in slots.items() if name != "index"}, s)
    new = dict(st, slots=slots, prev=token_R, t=t_R + 1)
    for name in _OUTPUTS:
      if name in st:  # empty slots write to row N: dropped
        new[name] = st[name].at[pair_R, t_R].set(columns[name], mode="drop")
    finished_R = live_R & (_is_stop(token_R, s.stop_ids) | (t_R + 1 == L))
    new["pair"] = jnp.where(finished_R, N, pair_R)
    return new

  def cond(st):
    return jnp.any(st["pair"] < N) | jnp.any(st["cursor"] < st["num_queued"])

  # The whole state comes back (the cache too) so every donated buffer is reused in place. Slots
  # are refilled at the start of an iteration: refilling at its end makes XLA copy a layer's cache.
  return jax.lax.while_loop(cond, body, state)


def _settings(
    model: Decoder,
    params,
    prompt_BxP,
    prompt_mask_BxP,
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    stop_ids=(),
    pad_id: int = 0,
    return_entropy: bool = False,
    max_rows_in_flight: int = 0,
    prefill_chunks: int = 1,
) -> _Settings:
  """`sample`'s arguments checked and turned into the static settings of its programs."""
  if prompt_BxP.ndim != 2 or prompt_mask_BxP.shape != prompt_BxP.shape:
    raise ValueError(
        f"prompt_BxP and prompt_mask_BxP must be [B, P] of the same shape; got "
        f"{prompt_BxP.shape} and {prompt_mask_BxP.shape}"
    )
  for name, value, low in (
      ("num_samples", num_samples, 1),
      ("max_new_tokens", max_new_tokens, 1),
      ("top_k", top_k, 0),
      ("max_rows_in_flight", max_rows_in_flight, 0),
      ("prefill_chunks", prefill_chunks, 1),
  ):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
  if prompt_BxP.shape[0] % prefill_chunks:
    raise ValueError(
        f"prefill_chunks={prefill_chunks} must divide the {prompt_BxP.shape[0]} prompts"
    )
  if top_k > model.config.vocab_size:
    raise ValueError(f"top_k={top_k} exceeds vocab_size={model.config.vocab_size}")
  if not isinstance(temperature, (int, float)) or not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature!r}")
  if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
  n = prompt_BxP.shape[0] * num_samples
  rows_in_flight = min(max_rows_in_flight or n, n)
  rows = _row_sharding(prompt_BxP)
  return _Settings(
      num_samples=num_samples,
      max_new_tokens=max_new_tokens,
      temperature=float(temperature),
      top_p=float(top_p),
      top_k=top_k,
      greedy=bool(greedy),
      stop_ids=tuple(int(i) for i in stop_ids),
      pad_id=int(pad_id),
      return_entropy=bool(return_entropy),
      rows_in_flight=rows_in_flight,
      rows=rows,
      cache=_cache_sharding(rows, params["layers"]["attn"]["k_proj"]),
      shards=_row_shards(rows, prompt_BxP.shape[0], rows_in_flight),
      prefill_chunks=prefill_chunks,
  )


def _row_shards(rows, num_prompts: int, rows_in_flight: int) -> int:
  """The devices over the row axes of `rows` when they divide the prompts and the slots, else 1
  (one queue for all: the refill then copies across devices)."""
  if rows is None or rows.spec[0] is None:
    return 1
  axes = rows.spec[0] if isinstance(rows.spec[0], tuple) else (rows.spec[0],)
  d = int(np.prod([rows.mesh.shape[a] for a in axes]))
  return d if num_prompts % d == 0 and rows_in_flight % d == 0 else 1


def sample(model: Decoder, params, prompt_BxP, prompt_mask_BxP, rng, **kwargs) -> SampleOutput:
  """Samples `num_samples` responses per left-padded prompt, at most `max_rows_in_flight` (0: all)
  at a time; see the module docstring. `kwargs` are those of `_settings`: num_samples,
  max_new_tokens, temperature, top_p, top_k, greedy, stop_ids, pad_id, return_entropy,
  max_rows_in_flight, prefill_chunks."""
  s = _settings(model, params, prompt_BxP, prompt_mask_BxP, **kwargs)
  params = _serving_params(params, dtype=model.config.dtype)
  state, prompt_NxP, prompt_mask_NxP = _prefill(
      params, prompt_BxP, prompt_mask_BxP, rng, model=model, s=s
  )
  out = _decode(params, state, model=model, s=s)
  return SampleOutput(
      tokens_NxL=out["tokens"],
      mask_NxL=out["mask"],
      logprobs_NxL=out["logprobs"],
      entropy_NxL=out.get("entropy"),
      prompt_NxP=prompt_NxP,
      prompt_mask_NxP=prompt_mask_NxP,
  )


@dataclasses.dataclass(frozen=True)
class Programs:
  """The three programs `sample` runs, to lower from abstract inputs (ahead-of-time compilation,
  e.g. by `plan`): `serving_params(params)`, then `prefill(serving, prompt_BxP, prompt_mask_BxP,
  rng)` and `decode(serving, state)` on the prefill's state; each returns a `jax.stages.Lowered`."""

  model: Decoder
  s: _Settings

  def serving_params(self, params):
    return _serving_params.lower(params, dtype=self.model.config.dtype)

  def prefill(self, serving, prompt_BxP, prompt_mask_BxP, rng):
    return _prefill.lower(serving, prompt_BxP, prompt_mask_BxP, rng, model=self.model, s=self.s)

  def decode(self, serving, state):
    return _decode.lower(serving, state, model=self.model, s=self.s)

  @property
  def rows_in_flight(self) -> int:
    return self.s.rows_in_flight


def programs(model: Decoder, params, prompt_BxP, prompt_mask_BxP, **kwargs) -> Programs:
  """`sample`'s programs for (master) parameters and prompts shaped and sharded like `params` and
  `prompt_BxP`, and its `kwargs`."""
  return Programs(model, _settings(model, params, prompt_BxP, prompt_mask_BxP, **kwargs))
