"""Config validation (mmjax.config): every recipe's mistakes are named at start-up, with
the field, the value and what is allowed; the recipes themselves pass."""

import os

import pytest

from mmjax.configs import clip as clip_recipe
from mmjax.configs import flamingo as flamingo_recipe
from mmjax.configs import lm as lm_recipe
from mmjax import cli
from mmjax import config as config_lib

RECIPES = {"flamingo": flamingo_recipe, "clip": clip_recipe, "lm": lm_recipe}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("variant", ["tiny", "base", "3b", "80b"])
def test_every_recipe_and_variant_is_valid(recipe, variant):
  assert config_lib.problems(RECIPES[recipe].get_config(variant), num_devices=8) == []


def _set(config, path, value):
  *parents, leaf = path.split(".")
  node = config
  for p in parents:
    node = node[p]
  with config.unlocked():
    if leaf in node:  # a value of another type than the recipe's
      del node[leaf]
    node[leaf] = value


def _problems(recipe, **overrides):
  config = RECIPES[recipe].get_config()
  for path, value in overrides.items():
    _set(config, path, value)
  return config_lib.problems(config, num_devices=8)


# (recipe, {field: value}, what the one problem reported says)
CASES = [
    # Enumerated values list what is allowed.
    ("flamingo", {"train.nonfinite": "abortt"},
     "config.train.nonfinite='abortt' is not one of ('abort', 'skip')"),
    ("lm", {"remat": "ful"}, "config.remat='ful' is not one of ('none', 'minimal',"),
    ("clip", {"compute_dtype": "fp16"}, "config.compute_dtype='fp16' is not one of"),
    ("flamingo", {"task": "flamingoo"}, "config.task='flamingoo' is not one of ('lm', 'clip', "),
    ("flamingo", {"sharding": "fsdpp"}, "Unknown sharding preset 'fsdpp'; choose one of"),
    ("flamingo", {"sharding": (("embed", "fsdpp"),)}, "names mesh axes ['fsdpp']"),
    ("flamingo", {"model.xattn.placement": "top"},
     "config.model.xattn.placement='top' is not one of ('openflamingo', 'idefics')"),
    ("lm", {"model.activation": "gelu_pytorch_tanh"},
     "config.model.activation='gelu_pytorch_tanh' is not one of ('gelu', 'gelu_tanh'"),
    ("lm", {"model.norm": "batchnorm"}, "config.model.norm='batchnorm' is not one of"),
    ("flamingo", {"attention_impl": "flash"}, "config.attention_impl='flash' is not one of"),
    # Ranges.
    ("flamingo", {"train.keep_checkpoints": 0}, "config.train.keep_checkpoints=0 must be >= 1"),
    ("lm", {"train.checkpoint_every": 0}, "config.train.checkpoint_every=0 must be >= 1"),
    ("lm", {"train.log_every": 0}, "config.train.log_every=0 must be >= 1"),
    ("lm", {"train.eval_every": -1}, "config.train.eval_every=-1 must be >= 0"),
    ("clip", {"train.steps": 0}, "config.train.steps=0 must be >= 1"),
    ("lm", {"optim.lr": float("nan")}, "config.optim.lr=nan must be >= 0"),
    ("lm", {"optim.b2": 1.5}, "config.optim.b2=1.5 must be <= 1"),
    ("lm", {"model.num_heads": 0}, "config.model.num_heads=0 must be >= 1"),
    ("flamingo", {"data.datasets.pairs.weight": -1.0},
     "config.data.datasets.pairs.weight=-1.0 must be >= 0"),
    ("flamingo", {"init.lm.steps": -2}, "config.init.lm.steps=-2 must be >= -1"),
    # Types.
    ("lm", {"train.steps": 2.5}, "config.train.steps=2.5 must be an integer"),
    ("lm", {"scan_layers": "yes"}, "config.scan_layers='yes' must be True or False"),
    ("lm", {"model.width": True}, "config.model.width=True must be an integer"),
    ("flamingo", {"model.lm.use_bias": 1}, "config.model.lm.use_bias=1 must be True or False"),
    ("lm", {"trainable": "(unclosed"}, "config.trainable='(unclosed' is not a regular"),
    ("lm", {"evaluate.shots": (0, -1)}, "config.evaluate.shots=(0, -1) must hold shot counts"),
    # Unknown keys: sections, model dataclass fields (nested too), entries.
    ("flamingo", {"train.stepz": 3},
     "config.train has no field 'stepz' (did you mean 'steps'?); its fields are ["),
    ("flamingo", {"model.lm.widht": 3},
     "config.model.lm (LMConfig) has no field 'widht' (did you mean 'width'?); its fields"),
    ("clip", {"model.vision.patch": 8}, "config.model.vision (ViTConfig) has no field 'patch'"),
    ("flamingo", {"init.lm.workdri": "/x"}, "config.init.lm has no field 'workdri' (did you "
     "mean 'workdir'?)"),
    ("flamingo", {"data.datasets.pairs.wieght": 2.0},
     "config.data.datasets.pairs has no field 'wieght'"),
    ("lm", {"optimizer": {}}, "config has no field 'optimizer'"),
    # Missing fields.
    ("flamingo", {"model.lm": {"width": 8}}, "config.model.lm (LMConfig) has no 'vocab_size', 'depth', 'num_heads', which it needs"),
    # Lists where names are expected.
    ("flamingo", {"data.datasets": [{"source": {"kind": "shapes_world_pairs"}}]},
     "must be a mapping of names to entries"),
    # Fields that must agree.
    ("flamingo", {"optim.accum_steps": 3},
     "config.optim.accum_steps=3 does not divide the batch of each of the 1 process(es)"),
    ("clip", {"optim.accum_steps": 2}, "the contrastive loss needs every negative in one batch"),
    ("flamingo", {"data.max_images": 0},
     "config.data.max_images=0: Flamingo's sequences hold at least one image"),
    ("flamingo", {"data.image_size": 32},
     "config.data.image_size=32 differs from config.model.vision.image_size=64"),
    ("lm", {"model.position": "learned", "data.seq_len": 512},
     "config.data.seq_len=512 exceeds the learned positions' config.model.max_len=256"),
    ("clip", {"data.seq_len": 64}, "config.data.seq_len=64 exceeds the learned positions' "
     "config.model.text.max_len=32"),
    ("lm", {"model.num_heads": 3}, "config.model.width=256 is not divisible by "
     "config.model.num_heads=3"),
    ("flamingo", {"model.vision.patch_size": 7}, "image_size=64 is not divisible by"),
    ("flamingo", {"data.datasets.documents.weight": 0.0, "data.datasets.pairs.weight": 0.0},
     "config.data.datasets has no dataset with a weight > 0"),
    ("lm", {"data.eval_datasets": {}}, "config.train.eval_every=200 needs "
     "config.data.eval_datasets"),
    ("flamingo", {"mesh.data": 3}, "config.mesh={'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 "
     "devices, but 8 are available"),
    ("flamingo", {"init.lm.recipe": "llm"}, "config.init.lm.recipe='llm' names no recipe"),
    ("flamingo", {"init.lm.workdir": "/ckpt/lm", "init.lm.steps": 20},
     "config.init.lm.steps=20 applies to config.init.lm.recipe"),
    ("flamingo", {"init.lm.recipe": ""}, "config.init.lm needs a recipe"),
    ("flamingo", {"model.media_token_id": 10 ** 6}, "config.model.media_token_id=1000000 is "
     "not a token id"),
]


@pytest.mark.parametrize("recipe, overrides, expected", CASES,
                         ids=[f"{r}:{','.join(o)}" for r, o, _ in CASES])
def test_each_mistake_is_named_with_its_field_value_and_what_is_allowed(recipe, overrides,
                                                                        expected):
  found = _problems(recipe, **overrides)
  assert len(found) == 1 and expected in found[0], found


def test_every_problem_is_reported_at_once_as_a_user_error():
  config = flamingo_recipe.get_config()
  config.train.nonfinite = "abortt"
  config.train.keep_checkpoints = 0
  config.optim.accum_steps = 3
  with pytest.raises(cli.UserError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert message.startswith("Invalid config (3 problems):")
  assert "nonfinite='abortt'" in message and "keep_checkpoints=0" in message
  assert "accum_steps=3" in message
  config = lm_recipe.get_config()
  config.train.log_every = 0
  with pytest.raises(cli.UserError, match=r"^Invalid config: config.train.log_every=0 must "
                     r"be >= 1\.$"):
    config_lib.validate(config)


def test_dataset_batch_is_checked_against_the_processes_that_share_it():
  config = flamingo_recipe.get_config()
  config.data.batch_size = 18
  assert "not divisible by the 4 processes" in config_lib.problems(config, process_count=4)[0]
  config.data.batch_size, config.optim.accum_steps = 16, 8
  assert config_lib.problems(config, process_count=1) == []
  assert "accum_steps=8 does not divide" in config_lib.problems(config, process_count=4)[0]


def test_off_switches_are_valid():
  """A dataset with weight 0, a backbone with steps 0 (random) and no init at all."""
  config = flamingo_recipe.get_config()
  config.data.datasets.pairs.weight = 0.0
  config.init.lm.steps = 0
  config.init.lm.recipe = ""
  assert config_lib.problems(config) == []
  config.init = {}
  assert config_lib.problems(config) == []


def test_a_tokenizer_that_disagrees_with_the_config_is_a_problem():
  config = lm_recipe.get_config()
  config.tokenizer = "/no/such/tokenizer"
  found = config_lib.problems(config)
  assert len(found) == 1 and "/no/such/tokenizer" in found[0]


def test_unknown_variants_name_the_variants():
  for recipe in RECIPES.values():
    with pytest.raises(cli.UserError, match=r"variant 'huge'; choose from \['3b', '80b'"):
      recipe.get_config("huge")


def test_recipes_load_from_any_directory(tmp_path):
  """The recipes are the installed `mmjax.configs` package: they import each other through
  it, not through a `configs` package that only the repository's root provides."""
  import subprocess
  import sys
  code = ("from mmjax.configs import clip, flamingo, lm\n"
          "for r in (clip, flamingo, lm): r.get_config()")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
