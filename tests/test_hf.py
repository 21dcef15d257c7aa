"""Hugging Face bridge: parity with transformers' PyTorch models, save/load round trips, errors."""

import dataclasses
import functools
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from entropy_rl.models import ModelConfig, init_params, param_logical_axes
from entropy_rl.models.decoder import rope_inv_freq
from entropy_rl.models import hf as hf_lib
from entropy_rl.models.hf import load_config, load_hf, load_tokenizer, save_hf

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
HF_CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_theta=5000.0, rms_norm_eps=1e-5),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16, tie_word_embeddings=True),
    # original_max_position_embeddings=64 puts the 4 frequencies in all three llama3 regimes.
    "llama": lambda: transformers.LlamaConfig(
        **TINY,
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
}
TOKENS = np.random.default_rng(0).integers(0, 61, (2, 7))
MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # row 0 is left-padded
POSITIONS = np.maximum(np.cumsum(MASK, 1) - 1, 0)
VALID = MASK.astype(bool)


def numpy_params(cfg):
  """Random params of the decoder's shapes, drawn with NumPy (no compilation)."""
  shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens_BxT, attn_mask_BxT):
  return model.apply({"params": params}, tokens_BxT, attn_mask_BxT=attn_mask_BxT)


def torch_logits(hf_model):
  with torch.no_grad():
    return hf_model(
        input_ids=torch.tensor(TOKENS),
        attention_mask=torch.tensor(MASK),
        position_ids=torch.tensor(POSITIONS),
    ).logits.numpy()


@functools.cache
def hf_checkpoint(family, root):
  """A tiny random transformers model (norms and biases perturbed too), saved under root."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family]()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = os.path.join(root, family)
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf"))


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_parity_with_transformers(family, root):
  hf_model, path = hf_checkpoint(family, root)
  model, params = load_hf(path)
  cfg = model.config
  assert cfg.model_type == family
  assert cfg.tie_word_embeddings == (family == "qwen3")
  np.testing.assert_allclose(
      rope_inv_freq(cfg), hf_model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6
  )
  out = np.asarray(forward(model, params, TOKENS, MASK))
  ref = torch_logits(hf_model)
  assert np.abs(out[VALID] - ref[VALID]).max() <= 1e-4


def test_llama3_rope_scaling_is_applied():
  cfg = ModelConfig.from_hf(HF_CONFIGS["llama"]().to_dict())
  plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
  scaled = rope_inv_freq(cfg)
  assert scaled[0] == plain[0] and (scaled[1:] < plain[1:]).all()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_save_load_round_trip(family, root, tmp_path):
  hf_model, path = hf_checkpoint(family, root)
  model, params = load_hf(path)
  out_dir = str(tmp_path / "export")
  save_hf(params, model.config, out_dir)
  again_model, again = load_hf(out_dir)
  assert again_model.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  assert type(reloaded) is type(hf_model)
  np.testing.assert_allclose(
      torch_logits(reloaded)[VALID], torch_logits(hf_model)[VALID], atol=1e-6
  )


def test_save_hf_bf16_llama_loads_in_transformers(tmp_path):
  cfg = ModelConfig.from_hf(HF_CONFIGS["llama"]().to_dict(), param_dtype="bfloat16")
  params = numpy_params(cfg)
  save_hf(params, cfg, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  assert reloaded.config.rope_parameters["rope_type"] == "llama3"
  assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
  embed = reloaded.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(embed, np.asarray(params["embed"], np.float32))
  model, again = load_hf(str(tmp_path), param_dtype="float32", dtype="float32")
  assert again["embed"].dtype == jnp.float32
  np.testing.assert_array_equal(again["embed"], embed)


def test_sharded_index_and_shardings(root, tmp_path):
  hf_model, _ = hf_checkpoint("qwen2", root)
  path = str(tmp_path)
  hf_model.save_pretrained(path, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  mesh = jax.make_mesh(
      (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"))
  cfg = load_config(path)
  shardings = jax.tree.map(
      lambda names: jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*[dict(rules).get(n) for n in names])
      ),
      param_logical_axes(cfg),
      is_leaf=lambda x: isinstance(x, tuple),
  )
  reads = []  # (tensor name, shape of the block read)

  class Recorded:

    def __init__(self, handle):
      self.handle = handle

    def get_slice(self, name):
      part = self.handle.get_slice(name)

      class Slice:
        get_shape = part.get_shape

        def __getitem__(self, index):
          block = part[index]
          reads.append((name, block.shape))
          return block

      return Slice()

  opened = hf_lib._open_tensors
  with mock.patch.object(
      hf_lib, "_open_tensors", lambda p: {k: Recorded(v) for k, v in opened(p).items()}
  ):
    model, params = load_hf(path, shardings=shardings)
  q_reads = [shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"]
  assert q_reads == [(16, 16)] * 4  # [N*H, D] = [32, 32] over tensor x fsdp: four quarters
  q_proj = params["layers"]["attn"]["q_proj"]
  assert q_proj.sharding == shardings["layers"]["attn"]["q_proj"]
  assert q_proj.addressable_shards[0].data.shape == (2, 16, 2, 8)
  _, plain = load_hf(path)
  jax.tree.map(np.testing.assert_array_equal, params, plain)

  def no_full_copy(x, sharding):  # each device holds its shard only, read straight into it
    full = sharding.is_fully_replicated
    for shard in x.addressable_shards:
      assert shard.data.shape == sharding.shard_shape(x.shape)
      assert full or shard.data.shape != x.shape

  jax.tree.map(no_full_copy, params, shardings)
  assert not shardings["layers"]["mlp"]["down_proj"].is_fully_replicated


def test_load_from_a_uri(root):
  from entropy_rl import fileio

  _, path = hf_checkpoint("qwen3", root)
  uri = "memory://entropy_rl_test_hf/qwen3"
  fileio.upload_dir(path, uri)
  _, params = load_hf(uri)
  _, local = load_hf(path)
  jax.tree.map(np.testing.assert_array_equal, params, local)


def test_errors(root, tmp_path):
  _, path = hf_checkpoint("qwen2", root)
  with pytest.raises(ValueError, match="config.json"):
    load_hf(str(tmp_path))
  config = json.load(open(os.path.join(path, "config.json")))
  bad = tmp_path / "bad"
  bad.mkdir()
  json.dump(config, open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match="model.safetensors"):
    load_hf(str(bad))
  json.dump(dict(config, model_type="mistral"), open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match="model_type='mistral'"):
    load_hf(str(bad))
  json.dump(dict(config, hidden_size=16, head_dim=8), open(bad / "config.json", "w"))
  os.symlink(os.path.join(path, "model.safetensors"), bad / "model.safetensors")
  with pytest.raises(ValueError, match=r"model.embed_tokens.weight has shape \(61, 32\)"):
    load_hf(str(bad))
  json.dump(dict(config, num_hidden_layers=3), open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match="model.layers.2.input_layernorm.weight is missing"):
    load_hf(str(bad))
  _, tied_path = hf_checkpoint("qwen3", root)
  untied = tmp_path / "untied"
  untied.mkdir()
  config = json.load(open(os.path.join(tied_path, "config.json")))
  json.dump(dict(config, tie_word_embeddings=False), open(untied / "config.json", "w"))
  os.symlink(os.path.join(tied_path, "model.safetensors"), untied / "model.safetensors")
  with pytest.raises(ValueError, match="lm_head.weight is missing"):
    load_hf(str(untied))
  with pytest.raises(ValueError, match="tokenizer directory"):
    load_tokenizer(str(tmp_path / "nowhere"))


def test_tokenizer_with_chat_template(tmp_path):
  import tokenizers

  vocab = {"<pad>": 0, "<eos>": 1, "hi": 2, "there": 3, "user": 4, ":": 5}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"
  )
  tok.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
  cfg = ModelConfig(
      vocab_size=8,
      hidden_size=8,
      intermediate_size=8,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      head_dim=4,
  )
  save_hf(numpy_params(cfg), cfg, str(tmp_path), tokenizer=tok)
  loaded = load_tokenizer(str(tmp_path))
  assert loaded.eos_token_id == 1 and loaded.pad_token_id == 0
  assert loaded("user : hi there")["input_ids"] == [4, 5, 2, 3]
  text = loaded.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=False)
  assert text == "user : hi there "


def test_policy_param_shardings_place_a_checkpoint_over_the_mesh(root):
  from entropy_rl import policy, sharding

  _, path = hf_checkpoint("qwen2", root)
  mesh = sharding.make_mesh(2, -1, 2)
  shardings = policy.param_shardings(load_config(path), mesh, sharding.default_rules())
  _, params = load_hf(path, shardings=shardings)
  down = params["layers"]["mlp"]["down_proj"]  # [layers, mlp, embed] over (tensor, fsdp)
  assert down.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  assert down.addressable_shards[0].data.shape == (2, 24, 16)
  jax.tree.map(np.testing.assert_array_equal, params, load_hf(path)[1])
