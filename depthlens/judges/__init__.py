"""Judges: one seam (`get_judge`, `classify`, `judge_id`), the lexical and probe judges, their accuracy.

- ``lexical``: refusal markers, compliance, and the three-class continuation judges that read only text
- ``probe``: the probe judge, a logistic regression on the default model's hidden states
- ``seam``: judges by id (`get_judge`, `classify_many`, `DEFAULT_JUDGE`), the first-token refusal score, `ClassifierJudge`
- ``accuracy``: how accurate a judge is on the hand labels, and an ASR with its errors taken out (Rogan-Gladen)

It imports the rooms below it (`infra`, `stats`, `data`, `models`, `runtime`).
"""

from __future__ import annotations

from depthlens.judges.lexical import (
    REFUSAL_MARKERS, JUDGE_ID, CONTINUATION_JUDGE_ID, MIN_WORDS, is_refusal, is_compliance, RateResult,
    refusal_rate, attack_success_rate, content_words, classify_continuation, Classifier, LEXICAL_V2_ID,
    STEER_MARKERS, EVASIVE_MARKERS, is_degenerate, LexicalJudge, LEXICAL_JUDGES,
)
from depthlens.judges.probe import (
    PROBE_FILE, RECIPES, ASK_TEMPLATE, judge_inputs, continuation_features, ask_inputs, ask_features,
    lexical_onehot, recipe_features, ProbeWeights, fit_probe, best_row, ProbeJudge,
)
from depthlens.judges.seam import (
    PROBE_JUDGE, DEFAULT_JUDGE, get_judge, judge_id, classify_many, classify, refusal_token_ids,
    score_from_logprobs, RefusalScores, refusal_score, ClassifierJudge,
)
from depthlens.judges.accuracy import (
    JUDGE_SET_FILE, HELDOUT_FILE, PARTS, labels_text, load_judge_set, labels_sha256, JudgeScore,
    score_judge, HeldOut, measured_judges, heldout_record, CorrectedASR, corrected_asr,
    corrected_trial_columns, correction_record,
)

__all__ = [
    "REFUSAL_MARKERS",
    "JUDGE_ID",
    "CONTINUATION_JUDGE_ID",
    "MIN_WORDS",
    "is_refusal",
    "is_compliance",
    "RateResult",
    "refusal_rate",
    "attack_success_rate",
    "content_words",
    "classify_continuation",
    "Classifier",
    "LEXICAL_V2_ID",
    "STEER_MARKERS",
    "EVASIVE_MARKERS",
    "is_degenerate",
    "LexicalJudge",
    "LEXICAL_JUDGES",
    "PROBE_FILE",
    "RECIPES",
    "ASK_TEMPLATE",
    "judge_inputs",
    "continuation_features",
    "ask_inputs",
    "ask_features",
    "lexical_onehot",
    "recipe_features",
    "ProbeWeights",
    "fit_probe",
    "best_row",
    "ProbeJudge",
    "PROBE_JUDGE",
    "DEFAULT_JUDGE",
    "get_judge",
    "judge_id",
    "classify_many",
    "classify",
    "refusal_token_ids",
    "score_from_logprobs",
    "RefusalScores",
    "refusal_score",
    "ClassifierJudge",
    "JUDGE_SET_FILE",
    "HELDOUT_FILE",
    "PARTS",
    "labels_text",
    "load_judge_set",
    "labels_sha256",
    "JudgeScore",
    "score_judge",
    "HeldOut",
    "measured_judges",
    "heldout_record",
    "CorrectedASR",
    "corrected_asr",
    "corrected_trial_columns",
    "correction_record",
]
