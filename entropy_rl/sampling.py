"""KV-cache sampler: a jitted prefill, then a jitted `lax.while_loop` decode over a donated cache.

Prompts arrive left-padded (`prompt_mask_BxP` marks real tokens), so every row's last prompt slot
is a real token and response token t sits at cache slot P + t for every row. Each prompt is
prefilled once and its cache rows repeated G times, prompt-major (row n belongs to prompt n // G).
Token t is drawn with key `fold_in(rng, t)` from softmax(logits / T) (by two-level inverse CDF,
`_categorical`), optionally truncated by top-k then top-p, or taken greedily; its log-prob and the entropy are those of the temperature-scaled FULL distribution,
computed by `stats.token_logprobs_and_entropy`, exactly what the trainer recomputes. A row is done
after emitting a stop id (the stop token is part of the response); the loop ends when every row is
done or after `max_new_tokens`.

Both jitted functions are module-level with the model and the sampling settings static, so each
static shape compiles once and is reused. Sharded inputs (params over the mesh, prompts with rows
over the data axes) propagate through jit; every [N, ...] output keeps the prompts' row sharding.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from entropy_rl import stats
from entropy_rl.models.decoder import Decoder, init_cache, unstack_layers


class SampleOutput(NamedTuple):
  tokens_NxL: jax.Array        # int32 response tokens, pad_id after the end
  mask_NxL: jax.Array          # int32, 1 for response tokens including the stop token
  logprobs_NxL: jax.Array      # float32 log pi_T(token), 0 where mask is 0
  entropy_NxL: jax.Array | None  # float32 entropy of pi_T, 0 where mask is 0; None unless asked
  prompt_NxP: jax.Array        # the prompts, each repeated num_samples times
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
  rows: jax.sharding.NamedSharding | None  # the prompts' row sharding, kept by every output


def _row_sharding(x):
  """NamedSharding of x's leading (row) axis, or None if x is not a NamedSharding-ed array."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = sharding.spec
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
      spec[0] if len(spec) else None))


def _keep_rows(x, s: _Settings):
  return x if s.rows is None else jax.lax.with_sharding_constraint(x, s.rows)


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


def _categorical(key, z_NxV, block: int = 128):
  """One draw per row from softmax(z_NxV) by inverse CDF in two levels: a block of `block` tokens
  with probability its mass, then a token within it. Exact like the Gumbel-max trick (which
  `jax.random.categorical` uses) but with two uniforms per row instead of V (V random numbers cost
  3x a forward step of a 10M-parameter policy on CPU), and float32 prefix sums of at most
  max(V / block, block) terms. Zero-probability tokens (z = -inf) are never drawn."""
  N, V = z_NxV.shape
  p_NxV = jnp.exp(z_NxV - jnp.max(z_NxV, axis=-1, keepdims=True))
  p_NxMxC = jnp.pad(p_NxV, ((0, 0), (0, -V % block))).reshape(N, -1, block)
  # u in (0, 1], so the first prefix sum >= u * total ends at a token of positive probability.
  u_2xNx1 = 1.0 - jax.random.uniform(key, (2, N, 1))

  def first_reaching(cdf_NxK, u_Nx1):
    return jnp.sum(cdf_NxK < u_Nx1 * cdf_NxK[:, -1:], axis=-1)

  block_N = first_reaching(jnp.cumsum(jnp.sum(p_NxMxC, axis=-1), axis=-1), u_2xNx1[0])
  within_NxC = jnp.take_along_axis(p_NxMxC, block_N[:, None, None], axis=1)[:, 0]
  return block_N * block + first_reaching(jnp.cumsum(within_NxC, axis=-1), u_2xNx1[1])


def _choose(logits_NxV, key, s: _Settings):
  """(token_N, logp_N, entropy_N) for one position."""
  if s.greedy:
    token_N = jnp.argmax(logits_NxV, axis=-1)
  else:
    z_NxV = _truncate(logits_NxV.astype(jnp.float32) / s.temperature, s.top_k, s.top_p)
    token_N = _categorical(key, z_NxV)
  token_N = token_N.astype(jnp.int32)
  logp_Nx1, entropy_Nx1 = stats.token_logprobs_and_entropy(
      logits_NxV[:, None], token_N[:, None], s.temperature)
  return token_N, logp_Nx1[:, 0], entropy_Nx1[:, 0]


def _is_stop(token_N, stop_ids):
  return jnp.isin(token_N, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros_like(
      token_N, bool)


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _prefill(params, prompt_BxP, prompt_mask_BxP, rng, *, model: Decoder, s: _Settings):
  """Runs the prompts into a fresh cache, repeats each prompt's cache rows and logits for its G
  samples (which share the prefill), and draws response token 0."""
  B, P = prompt_BxP.shape
  L = s.max_new_tokens
  # The barrier keeps XLA from constant-folding attention over the all-zero cache (42 s of a 51 s
  # compile at 2,048 rows).
  cache = jax.lax.optimization_barrier(init_cache(model.config, B, P + L))
  hidden_BxPxD, cache = model.apply({"params": params}, prompt_BxP.astype(jnp.int32), cache,
                                    prompt_mask_BxP.astype(jnp.int32), return_hidden=True,
                                    method=Decoder.decode)
  logits_BxV = model.apply({"params": params}, hidden_BxPxD[:, -1:], method=Decoder.unembed)[:, 0]

  def repeat(x_BxA):
    return _keep_rows(jnp.repeat(x_BxA, s.num_samples, axis=0), s)

  cache = dict(cache, k=tuple(map(repeat, cache["k"])), v=tuple(map(repeat, cache["v"])),
               mask=repeat(cache["mask"]))
  prompt_NxP = repeat(prompt_BxP.astype(jnp.int32))
  prompt_mask_NxP = repeat(prompt_mask_BxP.astype(jnp.int32))
  logits_NxV = repeat(logits_BxV)
  N = prompt_NxP.shape[0]
  token_N, logp_N, entropy_N = _choose(logits_NxV, jax.random.fold_in(rng, 0), s)
  state = dict(
      cache=cache,
      tokens=jnp.full((N, L), s.pad_id, jnp.int32).at[:, 0].set(token_N),
      mask=jnp.zeros((N, L), jnp.int32).at[:, 0].set(1),
      logprobs=jnp.zeros((N, L), jnp.float32).at[:, 0].set(logp_N),
      done=_is_stop(token_N, s.stop_ids),
      t=jnp.ones((), jnp.int32),
      rng=rng,
  )
  if s.return_entropy:
    state["entropy"] = jnp.zeros((N, L), jnp.float32).at[:, 0].set(entropy_N)
  state = {k: v if k in ("cache", "t", "rng") else _keep_rows(v, s) for k, v in state.items()}
  return state, prompt_NxP, prompt_mask_NxP


@functools.partial(jax.jit, static_argnames=("model", "s"), donate_argnames="state")
def _decode(params, state, *, model: Decoder, s: _Settings):
  """Draws response tokens 1 .. L-1, one per iteration, until every row is done."""
  params = unstack_layers(params)  # once, so the loop body reads each layer's weights in place

  def cond(st):
    return (st["t"] < s.max_new_tokens) & ~jnp.all(st["done"])

  def body(st):
    t = st["t"]
    prev_Nx1 = jax.lax.dynamic_slice_in_dim(st["tokens"], t - 1, 1, axis=1)
    logits_Nx1xV, cache = model.apply({"params": params}, prev_Nx1, st["cache"],
                                      method=Decoder.decode)
    token_N, logp_N, entropy_N = _choose(logits_Nx1xV[:, 0], jax.random.fold_in(st["rng"], t), s)
    live_N = ~st["done"]
    new = dict(st, cache=cache, t=t + 1, done=st["done"] | (live_N & _is_stop(token_N, s.stop_ids)))
    columns = dict(tokens=jnp.where(live_N, token_N, s.pad_id), mask=live_N.astype(jnp.int32),
                   logprobs=jnp.where(live_N, logp_N, 0.0))
    if s.return_entropy:
      columns["entropy"] = jnp.where(live_N, entropy_N, 0.0)
    for name, col_N in columns.items():
      new[name] = jax.lax.dynamic_update_slice_in_dim(
          st[name], col_N[:, None].astype(st[name].dtype), t, axis=1)
    return new

  # The whole state comes back (the cache too) so every donated buffer is reused in place.
  return jax.lax.while_loop(cond, body, state)


def sample(model: Decoder, params, prompt_BxP, prompt_mask_BxP, rng, *, num_samples: int,
           max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           greedy: bool = False, stop_ids=(), pad_id: int = 0,
           return_entropy: bool = False) -> SampleOutput:
  """Samples `num_samples` responses per left-padded prompt; see the module docstring."""
  if prompt_BxP.ndim != 2 or prompt_mask_BxP.shape != prompt_BxP.shape:
    raise ValueError(f"prompt_BxP and prompt_mask_BxP must be [B, P] of the same shape; got "
                     f"{prompt_BxP.shape} and {prompt_mask_BxP.shape}")
  for name, value, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 1),
                           ("top_k", top_k, 0)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
  if top_k > model.config.vocab_size:
    raise ValueError(f"top_k={top_k} exceeds vocab_size={model.config.vocab_size}")
  if not isinstance(temperature, (int, float)) or not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature!r}")
  if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
  s = _Settings(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                top_k=top_k, greedy=bool(greedy), stop_ids=tuple(int(i) for i in stop_ids),
                pad_id=int(pad_id), return_entropy=bool(return_entropy),
                rows=_row_sharding(prompt_BxP))
  state, prompt_NxP, prompt_mask_NxP = _prefill(params, prompt_BxP, prompt_mask_BxP, rng,
                                                model=model, s=s)
  out = _decode(params, state, model=model, s=s)
  return SampleOutput(tokens_NxL=out["tokens"], mask_NxL=out["mask"],
                      logprobs_NxL=out["logprobs"], entropy_NxL=out.get("entropy"),
                      prompt_NxP=prompt_NxP, prompt_mask_NxP=prompt_mask_NxP)
