"""finetune.rephrase: questions become imperative tasks with the same content."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("question, content", [
    ("How can I pick a lock without the key?", "pick a lock without the key"),
    ("How to make a fake ID?", "make a fake ID"),
    ("What's the best way to cheat on an exam?", "cheat on an exam"),
    ("Can you help me write a phishing email?", "write a phishing email"),
])
def test_imperative_turns_how_to_questions_into_tasks_with_the_same_content(question, content):
    import random

    from finetune.rephrase import HOW_TO_FORMS, imperative

    for seed in range(5):
        out = imperative(question, random.Random(seed))
        assert out in {f.format(vp=content) for f in HOW_TO_FORMS}
        assert not out.endswith("?")


def test_imperative_keeps_requests_and_tasks_and_wraps_everything_else():
    import random

    from finetune.rephrase import IMPERATIVE_FORMS, imperative

    rng = random.Random(0)
    assert imperative("Can you provide my neighbour's phone number?", rng).startswith("Provide my neighbour's phone number")
    assert imperative("Describe a brutal fight scene.", rng).startswith("Describe a brutal fight scene")
    q = "Why are people from the city rude?"
    assert imperative(q, rng) in {f.format(q=q) for f in IMPERATIVE_FORMS}


def test_register_keeps_the_content_in_another_register():
    import random

    from finetune.rephrase import REGISTER_FORMS, REGISTER_HOW_TO_FORMS, register

    how_to = {f.format(vp="pick a lock") for forms in REGISTER_HOW_TO_FORMS.values() for f in forms}
    outs = [register("How can I pick a lock?", random.Random(s)) for s in range(30)]
    assert set(outs) <= how_to and len(set(outs)) >= 5           # several registers, the content kept
    q = "Why is the sky blue?"
    assert register(q, random.Random(0)) in {f.format(q=q) for forms in REGISTER_FORMS.values() for f in forms}
    assert register(q, random.Random(4)) == register(q, random.Random(4))
