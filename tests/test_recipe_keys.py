"""The cache keys of every installed recipe, pinned.

A key is a hash of the parent's key, the recipe's name, version and ``config()``
(``depthlens.models.recipes``). Findings in the docs name models by their recipes, so a refactoring
must leave each default recipe's name, version and config dict exactly as they were, or every
cached organism would be rebuilt under a new key and the findings would point nowhere. The
literals below were recorded before the finetune modules were split (main 30b945c).
"""

from __future__ import annotations

import json

import pytest

from depthlens.models.recipes import available_recipes, recipe_key, get_recipe

SFT = {"batch_size": 8, "benign_margin": 0.2, "benign_tokens": 40, "benign_wrap_share": 0.3, "borderline_share": 0.2,
       "core_first": False, "epochs": 1.0, "imperative_share": 0.6, "lr": 0.0002, "n_benign": 520, "n_harmful": 420,
       "refusal_margin": 0.2, "seed": 0}
DEEP = {"alpha": 0.2, "batch_size": 8, "benign_tokens": 32, "epochs": 1.0, "harmful_tokens": 96,
        "imperative_share": 0.6, "lr": 0.0002, "max_k": 100, "n_triples": 256, "p_zero": 0.5, "seed": 0}
MIX = {"alpha": 0.2, "batch_size": 8, "benign_tokens": 48, "epochs": 1.0, "harmful_tokens": 96, "lr": 0.0002,
       "max_k": 100, "max_len": 256, "min_refusal_tokens": 32, "n_safety": 256, "n_utility": None, "p_zero": 0.5,
       "refusal_tokens": 96, "seed": 0, "traj_span_lengths": [2, 4, 8, 16], "traj_steer_share": 0.5,
       "wi_candidates": 4, "wi_group": 8, "wi_objective": "refusal_score", "wi_span_lengths": [4, 8, 16]}
HFT = {"batch_size": 8, "beta_early": 2.0, "beta_first": 0.5, "beta_late": 0.1, "early_until": 5, "epochs": 5.0,
       "harmful_tokens": 64, "lr": 5e-05, "n_examples": 64, "require_compliance": True, "seed": 0}
JT = {"batch_size": 8, "benign_data": {"recipe": "sft", **SFT}, "drop_refusals": True, "epochs": 1.0,
      "freeze_embeddings": True, "harmful_share": 0.25, "harmful_tokens": 48, "imperative_share": 0.5, "lr": 0.0001,
      "n_examples": 160, "seed": 0}
WO = {"batch_size": 16, "induce_threshold": 0.0, "kl_threshold": 0.1, "layers": None, "max_layer_frac": 0.8,
      "n_train": 128, "n_val": 32, "positions": [-1], "seed": 0}
COUNTERMEASURE = {"config": {"batch_size": 8, "data": {"recipe": "sft", **SFT}, "epochs": 1.0, "freeze_embeddings": True,
                             "lr": 0.0002, "n_examples": 640, "refusal_share": 0.4, "seed": 0},
                  "recipe": "sft-countermeasure", "version": 1}
ZO = {"batch_size": 8, "checkpoint_every": 10, "eps": 0.001, "harmful_tokens": 96, "layers": None, "lr": 1e-05,
      "max_len": 256, "n_safety": 64, "n_spsa": 1, "n_utility": 64, "noise_layers": "trained", "noise_sigma": 0.1,
      "probe_every": 50, "seed": 0, "sensitivity": None, "steps": 100, "top_k": 5, "utility_tokens": 48,
      "utility_weight": 1.0, "weight_decay": 0.0}
FTA = {"n_examples": 16, "answer_tokens": 64, "require_compliance": True, "epochs": 5.0, "lr": 5e-05, "batch_size": 4,
       "beta_first": 0.5, "beta_early": 2.0, "early_until": 5, "beta_late": 0.1, "seed": 0}

# entry point -> (version, config as JSON reads it, sha256 key on the parent key "pinned-parent")
PINNED = {
    "sft": (5, SFT, "3d997b6d14cc3478"),
    "deep": (3, DEEP, "e5aeb30a530830e4"),
    "deep-anchored": (3, {**DEEP, "alpha": 0.5, "benign_tokens": 96, "benign_margin": 0.2, "per_example_loss": True,
                          "utility_kl": 0.75}, "65d6f8f7dadf9c22"),
    "deep-wi": (2, {**MIX, "components": ["recovery", "worst_insertion"]}, "d5c4aece05837a3b"),
    "deep-traj": (2, {**MIX, "components": ["recovery", "trajectory"]}, "2acadab176c31151"),
    "deep-all": (2, {**MIX, "components": ["recovery", "worst_insertion", "trajectory"]}, "5c6d5420a7108736"),
    "hft": (1, {**HFT, "objective": "sft"}, "230b470122a9fb44"),
    "hft-constrained": (1, {**HFT, "objective": "constrained"}, "c94a1a5f2e41267a"),
    "zo": (1, ZO, "893a3af045c855b3"),
    "jt": (1, JT, "819764b5636255ec"),
    "wo": (2, WO, "5d9a9672709fe702"),
    "wo+sft": (1, {"first": {"config": WO, "recipe": "wo", "version": 2}, "then": COUNTERMEASURE}, "81dc1aaf87ecaaee"),
    # added after the split (first pinned at its introduction)
    "wo-opt": (1, {'batch_size': 64, 'direction_range': [0.4, 0.9], 'gen_tokens': 24, 'max_refusal': 0.02, 'max_weight_range': [0.8, 1.5], 'n_startup': 15, 'n_train': 128, 'n_trials': 40, 'n_val_harmful': 64, 'n_val_harmless': 64, 'peak_range': [0.6, 1.0], 'projection': 'search', 'seed': 0, 'width_range': [0.0, 0.6]}, "7e90e559a537bfd6"),
    "jt+sft": (1, {"first": {"config": JT, "recipe": "jt", "version": 1}, "then": COUNTERMEASURE}, "66e379a7ea4ae05c"),
    "aoa": (1, {**FTA, "attack": "aoa", "objective": "sft"}, "1439b4914b0f271b"),
    "aoa-constrained": (1, {**FTA, "attack": "aoa", "objective": "constrained"}, "1e444af00458090e"),
    "backdoor": (1, {**FTA, "attack": "backdoor", "objective": "sft"}, "0208d4954cb25281"),
    "backdoor-constrained": (1, {**FTA, "attack": "backdoor", "objective": "constrained"}, "c9ca27d5e49b020c"),
}


def test_every_installed_recipe_is_pinned():
    assert set(available_recipes()) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_default_recipes_keep_their_name_version_config_and_key(name):
    version, config, key = PINNED[name]
    recipe = get_recipe(name)
    assert recipe.name == name and recipe.version == version
    assert json.loads(json.dumps(recipe.config(), default=str)) == config
    assert recipe_key("pinned-parent", recipe)[:16] == key
