"""Training attention (causal, grouped-query, within segments), by platform.

A query attends to the keys at or before it with its own segment id: a row's real tokens are one
segment (1) and its padding another (0); packed rows (`entropy_rl.packing`) hold several segments.
A real query then sees exactly the real keys of its own sequence; a padded query sees the padded
keys at or before it, at least itself, so no row is empty and nothing is NaN, and no real
position reads it.

`ModelConfig.attention_impl`:
  xla     plain XLA ops, query-blocked: queries in at most 8 blocks (of >= 128), each block's
          scores only over the keys at or before its last query, so about (n + 1) / 2n of the
          [T, T] scores is computed and held (3/4 at T = 256, where it is 1.7x faster on CPU
          forward and backward than one [T, T] block); the KV heads are not repeated.
  cudnn   cuDNN flash attention (GPU, half precision); XLA where cuDNN rejects the shapes.
  splash  Pallas splash attention (TPU): [512, 512] blocks of scores in VMEM, never [T, T] in HBM.
          On other platforms the same kernel runs in Pallas interpret mode (slow; for tests).
  auto    splash on TPU, cudnn on GPU in half precision, xla otherwise.

The platform is that of the mesh being traced for (`jax.set_mesh`), so that an ahead-of-time
compile for TPU topology devices on a CPU host (`entropy_rl.plan`) takes the TPU kernel; without
a mesh it is `jax.default_backend()`.

Splash takes the segment ids natively; the sequence is padded to a multiple of 128 (the kernel's
lanes) with segment 0.
Under a mesh the kernel runs in `shard_map`: rows over the batch axes ('data', 'fsdp') that
divide them, heads over 'tensor' when it divides them (the KV heads repeated up to the query
heads when only those divide).
"""

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from entropy_rl.models.config import ATTENTION_IMPLS

_LANES = 128
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def platform() -> str:
  """The platform being compiled for: the current mesh's devices', else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve(impl: str, platform_name: str, dtype) -> str:
  """The implementation `impl` ('auto' or a name) means on `platform_name` for `dtype`."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r} must be one of {ATTENTION_IMPLS}")
  if impl == "cudnn" and platform_name != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs a GPU, compiling for {platform_name!r}")
  if impl != "auto":
    return impl
  if platform_name == "tpu":
    return "splash"
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return "cudnn" if platform_name == "gpu" and half else "xla"


def causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT, impl: str = "auto"):
  """softmax(q k^T / sqrt(H)) v over the keys at or before each query in its segment."""
  where = platform()
  impl = resolve(impl, where, q_BxTxNxH.dtype)
  if impl == "splash":
    return splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT, interpret=where != "tpu")
  if impl == "cudnn":
    same_Bx1xTxT = segments_BxT[:, None, :, None] == segments_BxT[:, None, None, :]
    try:  # cuDNN takes the mask as a bias with the full [T, T] extent
      return jax.nn.dot_product_attention(
          q_BxTxNxH,
          k_BxTxKxH,
          v_BxTxKxH,
          mask=same_Bx1xTxT,
          is_causal=True,
          implementation="cudnn",
      )
    except (ValueError, NotImplementedError, RuntimeError) as e:
      logging.getLogger(__name__).warning("cuDNN attention unavailable (%s); using XLA", e)
  return blocked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT)


def query_block(seq_len: int) -> int:
  """Queries per block of `blocked_attention`: at most 8 blocks, none under 128 queries."""
  return max(_LANES, -(-seq_len // 8))


def blocked_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT):
  """Causal GQA within segments in XLA ops, one query block at a time over only the keys it can
  see.

  Queries [i, j) attend keys [0, j): the scores above the diagonal of the other blocks are never
  computed. Scores and softmax are float32.
  """
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
  block, outs = query_block(T), []
  for i in range(0, T, block):
    j = min(i + block, T)
    scores_BxKxGxQxS = jnp.einsum(
        "bqkgh,bskh->bkgqs",
        q_BxTxKxGxH[:, i:j],
        k_BxTxKxH[:, :j],
        preferred_element_type=jnp.float32,
    )
    causal_QxS = (i + jnp.arange(j - i))[:, None] >= jnp.arange(j)[None, :]
    same_BxQxS = segments_BxT[:, i:j, None] == segments_BxT[:, None, :j]
    allowed_BxQxS = causal_QxS[None] & same_BxQxS
    scores_BxKxGxQxS = jnp.where(
        allowed_BxQxS[:, None, None], scores_BxKxGxQxS * H**-0.5, jnp.finfo(jnp.float32).min
    )
    probs = jax.nn.softmax(scores_BxKxGxQxS, axis=-1).astype(v_BxTxKxH.dtype)
    outs.append(jnp.einsum("bkgqs,bskh->bqkgh", probs, v_BxTxKxH[:, :j]))
  return jnp.concatenate(outs, axis=1).reshape(B, T, N, H)


def block_size(seq_len: int) -> int:
  """The largest of 512, 256, 128 that divides `seq_len` (a multiple of 128)."""
  return next(b for b in (512, 256, _LANES) if seq_len % b == 0)


def _kernel(num_heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  b = block_size(seq_len)
  sizes = sa.BlockSizes(
      block_q=b,
      block_kv=b,
      block_kv_compute=b,
      block_q_dkv=b,
      block_kv_dkv=b,
      block_kv_dkv_compute=b,
      block_q_dq=b,
      block_kv_dq=b,
  )
  mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len))] * num_heads)
  return sa.make_splash_mha(
      mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _splash_local(q_BxNxSxH, k_BxKxSxH, v_BxKxSxH, segments_BxS, interpret: bool):
  """The kernel over rows of one shard (q already scaled by 1/sqrt(H))."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  kernel = _kernel(q_BxNxSxH.shape[1], q_BxNxSxH.shape[2], interpret)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
      q_BxNxSxH, k_BxKxSxH, v_BxKxSxH, segments_BxS
  )


def _dividing_axes(mesh, axes, size: int) -> tuple[str, ...]:
  """The mesh axes of `axes`, in order, whose running product divides `size`."""
  kept, prod = [], 1
  for a in axes:
    if a in mesh.axis_names and size % (prod * mesh.shape[a]) == 0:
      kept.append(a)
      prod *= mesh.shape[a]
  return tuple(kept)


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT, interpret: bool = False):
  """Causal GQA within segments through the Pallas splash kernel."""
  B, T, N, H = q_BxTxNxH.shape
  K = k_BxTxKxH.shape[2]
  S = -(-T // _LANES) * _LANES
  pad = ((0, 0), (0, 0), (0, S - T), (0, 0))
  scale = jnp.asarray(H**-0.5, q_BxTxNxH.dtype)
  q_BxNxSxH = jnp.pad(jnp.transpose(q_BxTxNxH * scale, (0, 2, 1, 3)), pad)
  k_BxKxSxH = jnp.pad(jnp.transpose(k_BxTxKxH, (0, 2, 1, 3)), pad)
  v_BxKxSxH = jnp.pad(jnp.transpose(v_BxTxKxH, (0, 2, 1, 3)), pad)
  segments_BxS = jnp.pad(segments_BxT.astype(jnp.int32), ((0, 0), (0, S - T)))
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    rows = _dividing_axes(mesh, _BATCH_AXES, B)
    heads = _dividing_axes(mesh, (_HEAD_AXIS,), N)
    if heads and K % mesh.shape[_HEAD_AXIS]:  # each head shard needs its own KV heads
      k_BxKxSxH = jnp.repeat(k_BxKxSxH, N // K, axis=1)
      v_BxKxSxH = jnp.repeat(v_BxKxSxH, N // K, axis=1)
    qkv = P(rows or None, heads or None)
    local = jax.shard_map(
        local,
        in_specs=(qkv, qkv, qkv, P(rows or None)),
        out_specs=qkv,
        check_vma=False,
    )
  out_BxNxSxH = local(q_BxNxSxH, k_BxKxSxH, v_BxKxSxH, segments_BxS)
  return jnp.transpose(out_BxNxSxH[:, :, :T], (0, 2, 1, 3))
