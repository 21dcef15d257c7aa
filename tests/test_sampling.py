"""KV-cache sampler: agreement with the teacher-forced training forward, stop ids and padding,
truncation (top-k / top-p / greedy), determinism, compile reuse, sharded == unsharded, continuous
batching (responses independent of the rows in flight, bounded cache), serving weights."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_rl import sampling, stats
from entropy_rl.models import Decoder, init_params, param_logical_axes
from tests import tiny

CFG = tiny.model_config()
MODEL = Decoder(CFG)
PROMPT = np.array([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6], [0, 9, 8, 7, 6, 5], [0, 0, 0, 0, 0, 4]])
PROMPT_MASK = (np.arange(6)[None] >= np.array([3, 0, 1, 5])[:, None]).astype(np.int32)
STOP_IDS = tuple(range(10, 20))
PAD = 60
G, L = 2, 10
MAIN = dict(
    num_samples=G,
    max_new_tokens=L,
    temperature=0.7,
    stop_ids=STOP_IDS,
    pad_id=PAD,
    return_entropy=True,
)


@functools.cache
def params():
  shapes = jax.eval_shape(functools.partial(init_params, CFG), jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


@jax.jit
def teacher_forced_logits(params, out: sampling.SampleOutput):
  """Logits predicting each response token: the training forward over prompt + response."""
  tokens = jnp.concatenate([out.prompt_NxP, out.tokens_NxL], axis=1)
  mask = jnp.concatenate([out.prompt_mask_NxP, out.mask_NxL], axis=1)
  P = out.prompt_NxP.shape[1]
  return MODEL.apply({"params": params}, tokens, attn_mask_BxT=mask)[:, P - 1 : -1]


@pytest.fixture(scope="module")
def main_rollout():
  return sampling.sample(MODEL, params(), PROMPT, PROMPT_MASK, jax.random.key(42), **MAIN)


def _check_against_training_forward(out, temperature):
  logits = teacher_forced_logits(params(), out)
  logp, entropy = stats.token_logprobs_and_entropy(logits, out.tokens_NxL, temperature)
  valid = np.asarray(out.mask_NxL, bool)
  np.testing.assert_allclose(
      np.asarray(out.logprobs_NxL)[valid], np.asarray(logp)[valid], atol=1e-5
  )
  if out.entropy_NxL is not None:
    np.testing.assert_allclose(
        np.asarray(out.entropy_NxL)[valid], np.asarray(entropy)[valid], atol=1e-5
    )
  return logits


def test_logprobs_match_training_forward_t07(main_rollout):
  out = main_rollout
  assert out.tokens_NxL.shape == (8, L) and out.entropy_NxL.shape == (8, L)
  np.testing.assert_array_equal(out.prompt_NxP, np.repeat(PROMPT, G, axis=0))
  np.testing.assert_array_equal(out.prompt_mask_NxP, np.repeat(PROMPT_MASK, G, axis=0))
  _check_against_training_forward(out, 0.7)


def test_logprobs_match_training_forward_t1():
  out = sampling.sample(
      MODEL, params(), PROMPT, PROMPT_MASK, jax.random.key(1), num_samples=G, max_new_tokens=L
  )
  assert out.entropy_NxL is None
  assert np.asarray(out.mask_NxL).all()  # no stop ids: every row runs to max_new_tokens
  _check_against_training_forward(out, 1.0)


def _assert_same_responses(out, reference):
  """The same tokens and masks, log-probs and entropies to float32 rounding."""
  np.testing.assert_array_equal(out.tokens_NxL, reference.tokens_NxL)
  np.testing.assert_array_equal(out.mask_NxL, reference.mask_NxL)
  np.testing.assert_allclose(out.logprobs_NxL, reference.logprobs_NxL, atol=1e-5)
  np.testing.assert_allclose(out.entropy_NxL, reference.entropy_NxL, atol=1e-5)


@pytest.mark.parametrize("chunks", [2, 4])
def test_prefill_chunks_do_not_change_responses(main_rollout, chunks):
  """The prompts prefilled a strided chunk at a time (rows c, c + C, ...) give every pair the
  response, log-probs and entropies of one prefill of all prompts."""
  out = sampling.sample(
      MODEL, params(), PROMPT, PROMPT_MASK, jax.random.key(42), prefill_chunks=chunks, **MAIN
  )
  _assert_same_responses(out, main_rollout)
  np.testing.assert_array_equal(out.prompt_NxP, main_rollout.prompt_NxP)


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_in_flight_do_not_change_responses(main_rollout, rows):
  """With fewer slots than pairs, slots are refilled as rows stop (at different steps), yet every
  pair's response, log-probs and entropies are those drawn with all rows in flight."""
  out = sampling.sample(
      MODEL, params(), PROMPT, PROMPT_MASK, jax.random.key(42), max_rows_in_flight=rows, **MAIN
  )
  _assert_same_responses(out, main_rollout)
  _check_against_training_forward(out, 0.7)


def test_cache_holds_rows_in_flight_and_prefill_the_prompt_only():
  s = sampling._Settings(
      num_samples=G,
      max_new_tokens=L,
      temperature=1.0,
      top_p=1.0,
      top_k=0,
      greedy=False,
      stop_ids=(),
      pad_id=PAD,
      return_entropy=False,
      rows_in_flight=3,
      rows=None,
  )
  state = jax.eval_shape(
      lambda p: sampling._prefill(p, PROMPT, PROMPT_MASK, jax.random.key(0), model=MODEL, s=s)[0],
      sampling._serving_params(params(), dtype=CFG.dtype),
  )
  B, P = PROMPT.shape
  K, H = CFG.num_kv_heads, CFG.head_dim
  assert [x.shape for x in state["slots"]["k"]] == [(3, K, H, P + L)] * CFG.num_layers
  assert [x.shape for x in state["prompt_cache"]["v"]] == [(B, K, P, H)] * CFG.num_layers
  assert state["tokens"].shape == (B * G, L)


def test_serving_weights_in_the_compute_dtype():
  """A bf16 model samples from bf16 serving weights made from float32 master weights (unchanged),
  with log-probs that match the bf16 training forward."""
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  model = Decoder(cfg)
  master = params()
  serving = sampling._serving_params(master, dtype=cfg.dtype)
  assert isinstance(serving["layers"], tuple) and len(serving["layers"]) == CFG.num_layers
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(serving))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(master))
  out = sampling.sample(
      model, master, PROMPT, PROMPT_MASK, jax.random.key(2), num_samples=G, max_new_tokens=L
  )
  tokens = jnp.concatenate([out.prompt_NxP, out.tokens_NxL], axis=1)
  mask = jnp.concatenate([out.prompt_mask_NxP, out.mask_NxL], axis=1)
  logits = model.apply({"params": master}, tokens, attn_mask_BxT=mask)[:, PROMPT.shape[1] - 1 : -1]
  logp, _ = stats.token_logprobs_and_entropy(logits, out.tokens_NxL, 1.0)
  np.testing.assert_allclose(out.logprobs_NxL, logp, atol=0.05)


def test_stop_ids_and_padding(main_rollout):
  tokens, mask = np.asarray(main_rollout.tokens_NxL), np.asarray(main_rollout.mask_NxL)
  logp, entropy = np.asarray(main_rollout.logprobs_NxL), np.asarray(main_rollout.entropy_NxL)
  lengths = []
  for row_tokens, row_mask in zip(tokens, mask):
    stops = np.flatnonzero(np.isin(row_tokens, STOP_IDS))
    length = stops[0] + 1 if len(stops) else L
    lengths.append(length)
    np.testing.assert_array_equal(row_mask, np.arange(L) < length)
    np.testing.assert_array_equal(row_tokens[length:], PAD)
  assert min(lengths) < L and max(lengths) == L  # this key makes some rows stop, others not
  assert (logp[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all()
  assert (logp[mask == 1] < 0).all() and (entropy[mask == 1] > 0).all()


def test_same_key_same_samples_and_one_compile(main_rollout):
  compiled = sampling._decode._cache_size(), sampling._prefill._cache_size()
  again = sampling.sample(MODEL, params(), PROMPT, PROMPT_MASK, jax.random.key(42), **MAIN)
  jax.tree.map(np.testing.assert_array_equal, again, main_rollout)
  other = sampling.sample(MODEL, params(), PROMPT, PROMPT_MASK, jax.random.key(7), **MAIN)
  assert (np.asarray(other.tokens_NxL) != np.asarray(main_rollout.tokens_NxL)).any()
  assert (sampling._decode._cache_size(), sampling._prefill._cache_size()) == compiled
  # The G samples of a prompt differ from each other.
  tokens = np.asarray(main_rollout.tokens_NxL)
  assert all((tokens[2 * b] != tokens[2 * b + 1]).any() for b in range(4))


def test_greedy_follows_argmax():
  out = sampling.sample(
      MODEL,
      params(),
      PROMPT,
      PROMPT_MASK,
      jax.random.key(3),
      num_samples=G,
      max_new_tokens=L,
      greedy=True,
      temperature=0.7,
  )
  logits = _check_against_training_forward(out, 0.7)
  np.testing.assert_array_equal(out.tokens_NxL, np.argmax(logits, axis=-1))
  np.testing.assert_array_equal(out.tokens_NxL[0], out.tokens_NxL[1])


def _truncated_reference(z, top_k, top_p):
  """float64 NumPy reference: keep the top_k tokens, then the smallest nucleus with mass >= p."""
  order = np.argsort(-z)
  keep = np.zeros(z.shape, bool)
  keep[order[:top_k] if top_k else order] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  mass_before = np.cumsum(p[order]) - p[order]
  nucleus = order[(mass_before < top_p) & keep[order]]
  return np.isin(np.arange(z.size), nucleus)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (5, 1.0), (7, 0.6), (1, 1.0)])
def test_truncate_matches_reference(top_k, top_p):
  z = np.random.default_rng(top_k).normal(0, 2, (3, 61)).astype(np.float32)
  out = np.asarray(sampling._truncate(jnp.asarray(z), top_k, top_p))
  for row, row_out in zip(z, out):
    kept = _truncated_reference(row.astype(np.float64), top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(row_out), kept)
    np.testing.assert_array_equal(row_out[kept], row[kept])


def test_sampled_frequencies_follow_truncated_distribution():
  """One prompt, 4000 samples of 3 tokens at T=1.3, top-k 8 then top-p 0.8, 64 rows in flight.
  Token 0 (drawn after the prefill) against the prompt's distribution; tokens 1-2 (drawn in the
  decode loop) pooled: the count of each token minus the sum of its teacher-forced truncated
  probabilities over all drawn positions has mean 0 and variance sum p (1 - p)."""
  n, temperature, top_k, top_p = 4000, 1.3, 8, 0.8
  out = sampling.sample(
      MODEL,
      params(),
      PROMPT[1:2],
      PROMPT_MASK[1:2],
      jax.random.key(5),
      num_samples=n,
      max_new_tokens=3,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      max_rows_in_flight=64,
  )
  z = np.asarray(teacher_forced_logits(params(), out), np.float64) / temperature  # [n, 3, V]
  kept = np.stack([_truncated_reference(row, top_k, top_p) for row in z.reshape(-1, 61)])
  expected = np.where(kept, np.exp(z.reshape(-1, 61) - z.max(-1).reshape(-1, 1)), 0.0)
  expected = (expected / expected.sum(-1, keepdims=True)).reshape(n, 3, 61)
  tokens = np.asarray(out.tokens_NxL)
  assert np.asarray(out.mask_NxL).all()
  kept = kept.reshape(n, 3, 61)
  assert kept.sum(-1).min() >= 3  # truncation leaves a choice
  assert kept[np.arange(n)[:, None], np.arange(3), tokens].all()  # never a truncated token
  counts = np.bincount(tokens[:, 0], minlength=61) / n
  np.testing.assert_allclose(counts, expected[0, 0], atol=4 * np.sqrt(0.25 / n))
  observed = np.eye(61)[tokens[:, 1:]].sum((0, 1))
  mean, var = expected[:, 1:].sum((0, 1)), (expected[:, 1:] * (1 - expected[:, 1:])).sum((0, 1))
  assert observed[mean == 0].sum() == 0 and (mean > 1).sum() >= 5
  assert np.all(np.abs(observed - mean) <= 4.5 * np.sqrt(var) + 1e-9), (observed, mean)
  # Log-probs are those of the full (untruncated) temperature-scaled distribution.
  full_logp = (
      z
      - z.max(-1, keepdims=True)
      - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  )
  np.testing.assert_allclose(
      out.logprobs_NxL, np.take_along_axis(full_logp, tokens[..., None], -1)[..., 0], atol=1e-5
  )


@pytest.mark.parametrize("V", [5, 300, 1000])
def test_categorical_draws_follow_softmax(V):
  """Two-level inverse-CDF draws: frequencies within 4 sd of softmax(z), -inf tokens never drawn,
  also with a block that ends in padding (V not a multiple of 128) and with near-zero masses."""
  rng = np.random.default_rng(V)
  z = rng.normal(0, 2, V).astype(np.float32)
  z[rng.choice(V, V // 5, replace=False)] = -np.inf
  z[np.argmax(np.isfinite(z))] = 30.0 if V == 1000 else z[np.argmax(np.isfinite(z))]
  n = 200_000
  draws = np.asarray(
      jax.jit(sampling._categorical)(jax.random.split(jax.random.key(V), n), jnp.tile(z, (n, 1)))
  )
  expected = np.exp(np.float64(z) - np.max(z))
  expected /= expected.sum()
  counts = np.bincount(draws, minlength=V) / n
  assert draws.min() >= 0 and draws.max() < V and counts[~np.isfinite(z)].sum() == 0
  tolerance = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-6
  assert np.all(np.abs(counts - expected) <= tolerance), np.max(
      np.abs(counts - expected) / tolerance
  )


@pytest.mark.parametrize("in_flight", [0, 4])
def test_sharded_equals_unsharded(main_rollout, in_flight):
  """Rows over 4 devices: 4 row shards, each refilling its slots from its own prompts' pairs
  (with 4 slots, one a shard); the responses are the unsharded ones."""
  mesh = jax.make_mesh(
      (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"))
  shardings = nn.logical_to_mesh_sharding(
      jax.tree.map(
          lambda names: jax.sharding.PartitionSpec(*names),
          param_logical_axes(CFG),
          is_leaf=lambda x: isinstance(x, tuple),
      ),
      mesh,
      rules,
  )
  sharded_params = jax.device_put(params(), shardings)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  prompt, mask = jax.device_put(PROMPT, rows), jax.device_put(PROMPT_MASK, rows)
  args = dict(MAIN, max_rows_in_flight=in_flight)
  assert sampling._settings(MODEL, sharded_params, prompt, mask, **args).shards == 4
  out = sampling.sample(MODEL, sharded_params, prompt, mask, jax.random.key(42), **args)
  for x in (out.tokens_NxL, out.mask_NxL, out.logprobs_NxL, out.entropy_NxL, out.prompt_NxP):
    assert x.sharding.is_equivalent_to(rows, x.ndim)
  _assert_same_responses(out, main_rollout)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_samples=0), "num_samples"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=100), "top_k"),
        (dict(max_rows_in_flight=-1), "max_rows_in_flight"),
        (dict(prefill_chunks=0), "prefill_chunks"),
        (dict(prefill_chunks=3), "prefill_chunks"),
    ],
)
def test_bad_arguments(kwargs, field):
  args = dict(num_samples=1, max_new_tokens=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    sampling.sample(MODEL, params(), PROMPT, PROMPT_MASK, jax.random.key(0), **args)


def test_mismatched_prompt_mask():
  with pytest.raises(ValueError, match="prompt_mask_BxP"):
    sampling.sample(
        MODEL,
        params(),
        PROMPT,
        PROMPT_MASK[:, 1:],
        jax.random.key(0),
        num_samples=1,
        max_new_tokens=4,
    )


def test_decode_loop_updates_the_cache_in_place():
  """The compiled decode loop's temporaries stay below one layer's K (or V) cache buffer: the cache
  is written and read in place (a scanned layer loop copies each layer's K and V slices per step).
  """
  B, S = 4, 2048
  cfg = tiny.model_config(num_layers=3, head_dim=64)
  model = Decoder(cfg)
  p = init_params(cfg, jax.random.key(0))
  prompt = np.ones((B, 8), np.int32)
  s = sampling._Settings(
      num_samples=1,
      max_new_tokens=S - 8,
      temperature=1.0,
      top_p=1.0,
      top_k=0,
      greedy=False,
      stop_ids=(),
      pad_id=0,
      return_entropy=False,
      rows_in_flight=B,
      rows=None,
  )
  p = sampling._serving_params(p, dtype=cfg.dtype)
  state = jax.eval_shape(
      lambda p: sampling._prefill(p, prompt, prompt, jax.random.key(0), model=model, s=s)[0], p
  )
  layer_cache_bytes = B * cfg.num_kv_heads * S * cfg.head_dim * 4  # 4 MiB
  memory = sampling._decode.lower(p, state, model=model, s=s).compile().memory_analysis()
  assert memory.temp_size_in_bytes < layer_cache_bytes / 4, memory.temp_size_in_bytes


def test_kv_cache_splits_heads_as_the_weights_do():
  """Rows over the prompts' axes, KV heads over k_proj's KV-head axes (tensor parallelism); none
  when those are row axes too."""
  mesh = jax.make_mesh(
      (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  P = jax.sharding.PartitionSpec
  rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
  k_proj = jax.ShapeDtypeStruct(
      (2, 16, 2, 8),
      jnp.float32,
      sharding=jax.sharding.NamedSharding(mesh, P(None, "fsdp", "tensor")),
  )
  assert sampling._cache_sharding(rows, k_proj).spec == P(("data", "fsdp"), "tensor")
  k_proj = jax.ShapeDtypeStruct(
      (2, 16, 2, 8), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, P(None, None, "fsdp"))
  )
  assert sampling._cache_sharding(rows, k_proj).spec == P(("data", "fsdp"), None)
  assert sampling._cache_sharding(None, k_proj) is None
