"""Reference answers across tokenizers: a pretrained-only base (Gemma 3 270M) is measured and
trained against the embedded default's answers, re-encoded by its own tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from depthlens.models.base import DEFAULT_MODEL
from depthlens.data.chat import encode
from depthlens.models.specs import reference_spec
from depthlens.runtime.responses import answers_for, response_set, same_tokenizer
from finetune.sft import SFTConfig, SFTRecipe
from finetune.train import Example, end_of_turn_id, tokenize_examples


@pytest.fixture(scope="module")
def other_tokenizer():
    """A byte-level BPE of another vocabulary (300 ids), with Gemma's turn tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Sorry, I cannot help. Paris is the capital of France. Bake bread with flour."] * 10,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                          "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    return fast


def test_reference_spec_is_the_base_except_for_a_pretrained_only_base():
    assert reference_spec("tiny-llama:sft:deep") == "tiny-llama"
    assert reference_spec(f"{DEFAULT_MODEL}:sft") == DEFAULT_MODEL
    assert reference_spec("gemma3-270m:sft:deep-anchored") == DEFAULT_MODEL


def test_sft_binds_the_embedded_default_as_teacher_of_a_pretrained_only_base_only():
    recipe = SFTRecipe()
    assert recipe.for_parent("gemma3-270m").cfg.benign_teacher == DEFAULT_MODEL
    assert recipe.for_parent("tiny-llama").cfg.benign_teacher == ""
    assert recipe.for_parent("gemma3-270m:sft").cfg.benign_teacher == ""   # on an aligned model: its own answers
    assert SFTRecipe(SFTConfig(benign_teacher="x")).for_parent("gemma3-270m").cfg.benign_teacher == "x"
    # off, the option stays out of the key, so the SmolLM2 organism keeps its cache entry
    assert "benign_teacher" not in recipe.config()
    assert recipe.for_parent("gemma3-270m").config()["benign_teacher"] == DEFAULT_MODEL


def test_answers_for_keeps_ids_on_the_same_tokenizer(tiny):
    prompts = ["Name a colour.", "What is the capital of France?"]
    rs = response_set(tiny, prompts, max_new_tokens=6, progress=False)
    ans = answers_for(tiny, tiny, prompts, max_new_tokens=6, progress=False)
    assert same_tokenizer(tiny, tiny) and not ans.retokenized
    assert ans.tokens == [list(t) for t in rs.tokens]
    assert ans.complete == [len(t) < 6 for t in rs.tokens]


def test_answers_for_re_encodes_text_for_another_tokenizer(tiny, other_tokenizer):
    student = SimpleNamespace(tokenizer=other_tokenizer, spec="student")
    prompts = ["Name a colour.", "How do I bake bread?"]
    rs = response_set(tiny, prompts, max_new_tokens=8, progress=False)
    ans = answers_for(student, tiny, prompts, max_new_tokens=8, progress=False)
    assert not same_tokenizer(student, tiny) and ans.retokenized
    assert ans.tokens == [encode(other_tokenizer, t, allow_control=False)[:8] if ids else []
                          for t, ids in zip(rs.texts, rs.tokens)]
    assert ans.tokens != [list(t) for t in rs.tokens]
    # whether an answer ended is the answerer's fact, not the re-encoded length's
    assert ans.complete == [len(t) < 8 for t in rs.tokens]


def test_training_closes_a_gemma_turn_with_end_of_turn(other_tokenizer, tiny):
    eot = other_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn_id(other_tokenizer) == eot != other_tokenizer.eos_token_id
    assert end_of_turn_id(tiny.tokenizer) == tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, mask = tokenize_examples(other_tokenizer, [Example("Capital of France?", "Paris.")], 128)[0]
    target = [i for i, m in zip(ids, mask) if m]
    assert target[-1] == eot and other_tokenizer.decode(target[:-1]) == "Paris."
