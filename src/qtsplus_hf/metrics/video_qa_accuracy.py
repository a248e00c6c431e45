# Copyright 2026 The qtsplus-hf authors. Licensed under the Apache License, Version 2.0.
"""Multiple-choice accuracy for video QA, overall and per question type, with the mean share of vision tokens kept.

An `evaluate` metric module shipped inside the package and loaded by path, because `evaluate.load("accuracy")`
fetches its script from the Hub and fails offline. `evaluate` scans this file's imports to check dependencies:
keep one import per line.
"""

import datasets
import evaluate


_DESCRIPTION = "Share of questions whose predicted option letter equals the reference, overall and per type."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted option letters.
    references: correct option letters.
    question_types: optional, one type per question: adds `accuracy/<type>` and `count/<type>`.
    kept_ratios: optional, the share of vision tokens kept per question: adds `mean_kept_ratio`.
Returns:
    `accuracy` in [0, 1], `count`, and the optional entries above.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VideoQAAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, question_types=None, kept_ratios=None) -> dict:
        if question_types is not None and len(question_types) != len(references):
            raise ValueError(f"{len(question_types)} question types for {len(references)} questions")
        if kept_ratios is not None and len(kept_ratios) != len(references):
            raise ValueError(f"{len(kept_ratios)} kept ratios for {len(references)} questions")
        correct = [p.strip().upper() == r.strip().upper() for p, r in zip(predictions, references)]
        results = {"accuracy": sum(correct) / max(len(correct), 1), "count": len(correct)}
        if question_types is not None:
            for kind in sorted({str(t) for t in question_types}):
                hits = [c for c, t in zip(correct, question_types) if str(t) == kind]
                results[f"accuracy/{kind}"] = sum(hits) / len(hits)
                results[f"count/{kind}"] = len(hits)
        if kept_ratios is not None:
            results["mean_kept_ratio"] = sum(kept_ratios) / max(len(kept_ratios), 1)
        return results
