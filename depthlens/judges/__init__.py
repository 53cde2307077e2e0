"""Judges: one seam (`get_judge`, `classify`, `judge_id`), the lexical and probe judges, their accuracy.

- ``lexical``: refusal markers, compliance, and the three-class continuation judges that read only text
- ``probe``: the probe judge, a logistic regression on the default model's hidden states
- ``seam``: judges by id (`get_judge`, `classify_many`, `DEFAULT_JUDGE`, `check_judge`), the first-token refusal score
- ``hf``: a local Hugging Face guard model as a judge (`hf:PATH`; verdict or yes/no format)
- ``accuracy``: how accurate a judge is on the hand labels, what a record says about it (`judge_validation`), and
  an ASR with its errors taken out (Rogan-Gladen)

It imports the rooms below it (`infra`, `stats`, `data`, `models`, `runtime`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthlens.infra.exports import lazy_exports

# every public name of the room, and the module that defines it (imported on first use)
_EXPORTS = {
    "REFUSAL_MARKERS": "lexical", "JUDGE_ID": "lexical", "CONTINUATION_JUDGE_ID": "lexical", "MIN_WORDS": "lexical",
    "is_refusal": "lexical", "is_compliance": "lexical", "RateResult": "lexical", "refusal_rate": "lexical",
    "attack_success_rate": "lexical", "content_words": "lexical", "classify_continuation": "lexical",
    "Classifier": "lexical", "LEXICAL_V2_ID": "lexical", "STEER_MARKERS": "lexical", "EVASIVE_MARKERS": "lexical",
    "is_degenerate": "lexical", "LexicalJudge": "lexical", "LEXICAL_JUDGES": "lexical",
    "PROBE_FILE": "probe", "RECIPES": "probe", "ASK_TEMPLATE": "probe", "judge_inputs": "probe",
    "continuation_features": "probe", "ask_inputs": "probe", "ask_features": "probe", "lexical_onehot": "probe",
    "recipe_features": "probe", "ProbeWeights": "probe", "fit_probe": "probe", "best_row": "probe",
    "ProbeJudge": "probe",
    "PROBE_JUDGE": "seam", "DEFAULT_JUDGE": "seam", "get_judge": "seam", "judge_id": "seam", "classify_many": "seam",
    "classify": "seam", "refusal_token_ids": "seam", "score_from_logprobs": "seam", "RefusalScores": "seam",
    "refusal_score": "seam", "HF_PREFIX": "seam", "check_judge": "seam",
    "judge_validation": "accuracy", "prompt_source": "accuracy", "model_family": "accuracy",
    "GuardJudge": "hf", "parse_hf_id": "hf", "YESNO_TEMPLATE": "hf",
    "JUDGE_SET_FILE": "accuracy", "HELDOUT_FILE": "accuracy", "PARTS": "accuracy", "labels_text": "accuracy",
    "load_judge_set": "accuracy", "labels_sha256": "accuracy", "JudgeScore": "accuracy", "score_judge": "accuracy",
    "HeldOut": "accuracy", "measured_judges": "accuracy", "heldout_record": "accuracy", "CorrectedASR": "accuracy",
    "corrected_asr": "accuracy", "corrected_trial_columns": "accuracy", "correction_record": "accuracy",
    "BLIND_FILE": "accuracy", "LABEL_SETS": "accuracy", "load_label_set": "accuracy", "heldout_accuracy": "accuracy",
    "validation_coverage": "accuracy", "rate_columns": "accuracy",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # the same names, spelled out for type checkers and editors
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
        score_from_logprobs, RefusalScores, refusal_score, HF_PREFIX, check_judge,
    )
    from depthlens.judges.hf import GuardJudge, parse_hf_id, YESNO_TEMPLATE
    from depthlens.judges.accuracy import (
        JUDGE_SET_FILE, HELDOUT_FILE, PARTS, labels_text, load_judge_set, labels_sha256, JudgeScore,
        score_judge, HeldOut, measured_judges, heldout_record, CorrectedASR, corrected_asr,
        corrected_trial_columns, correction_record, BLIND_FILE, LABEL_SETS, load_label_set, heldout_accuracy,
        validation_coverage, rate_columns, judge_validation, prompt_source, model_family,
    )
