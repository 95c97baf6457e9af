"""The run's settings are declared once (experiments/lenet_fmnist/config.py): every flag classified there, and the
identity (--resume) and agreement (several processes) sets derived from it are the ones the CLI has always had."""

import dataclasses

from experiments.lenet_fmnist import arguments, checkpoint, config
from experiments.lenet_fmnist.config import AGREED, RUN_IDENTITY, RunConfig

# Listed literally: a change to either set is a change to what --resume or a second process accepts.
IDENTITY = (
  "bn",
  "batch_size",
  "lr",
  "seed",
  "conv_impl",
  "precision",
  "bn_group_examples",
  "precise_bn",
  "ema",
  "data",
)
AGREEMENT = (
  "bn", "epochs", "lr", "batch_size", "seed", "ema", "precise_bn", "data_source", "out", "resume", "overwrite",
  "api", "loop", "conv_impl", "precision", "allow_partial_data", "devices", "bn_group_size", "distributed",
  "num_processes",
)  # fmt: skip
NEITHER = (
  "seeds",
  "data_dir",
  "no_progress",
  "compile_cache",
  "no_compile_cache",
  "coordinator",
  "process_id",
  "timeout",
)


def flags():
  return [a for a in arguments.build_parser()._actions if a.dest != "help"]


def test_every_flag_is_a_field_of_the_run_config_that_classifies_it():
  fields = {f.name: f for f in dataclasses.fields(RunConfig)}
  for action in flags():
    assert action.dest in fields, f"{action.option_strings[0]} is not a field of config.RunConfig"
    metadata = fields[action.dest].metadata
    assert "identity" in metadata and "agree" in metadata, f"{action.option_strings[0]} is not classified"
    assert action.option_strings == [f"--{action.dest.replace('_', '-')}"]
  assert [a.dest for a in flags()] == list(fields)  # one flag per field, in the fields' order


def test_the_run_identity_is_todays():
  assert RUN_IDENTITY == checkpoint.RUN_IDENTITY == IDENTITY
  fields = [f for f in dataclasses.fields(RunConfig) if f.metadata["identity"] is not None]
  places = [f.metadata["identity"] for f in fields] + list(config.DERIVED_IDENTITY.values())
  assert sorted(places) == list(range(len(IDENTITY)))  # each place once
  assert set(config.DERIVED_IDENTITY) == {"bn_group_examples", "data"}


def test_the_identity_recorded_by_a_checkpoint_has_its_names_in_order():
  derived = {"bn": "ours", "precise_bn": 0, "ema": 0.0, "data": "fp", "bn_group_examples": 256}
  assert tuple(checkpoint.run_config(arguments.parse_args([]), **derived)) == IDENTITY


def test_the_agreement_set_is_todays():
  assert AGREED == AGREEMENT
  assert {f.name for f in dataclasses.fields(RunConfig)} == set(AGREEMENT) | set(NEITHER)
  assert not set(AGREEMENT) & set(NEITHER)


def test_every_field_of_the_identity_is_agreed_on():
  fields = {f.name: f for f in dataclasses.fields(RunConfig)}
  assert all(fields[name].metadata["agree"] for name in IDENTITY if name in fields)


def test_the_processes_compare_the_agreed_fields_and_the_data(tmp_path):
  from experiments.lenet_fmnist.distributed import agreed_settings

  settings = agreed_settings(arguments.parse_args([]), "fp", tmp_path, ["ours"], mesh=None)
  assert set(settings) == {*AGREEMENT, "data"} and settings["data"] == "fp"
  resumed = agreed_settings(arguments.parse_args(["--resume"]), "fp", tmp_path, ["ours"], mesh=None)
  assert resumed["checkpoints"] == {"ours": None}
