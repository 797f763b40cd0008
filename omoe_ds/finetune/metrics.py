"""Task metrics computed offline with scikit-learn, scipy and seqeval.

`evaluate.load` fetches metric code from the hub, which these machines cannot reach, so every metric
is a few lines over libraries that install from PyPI. Values are fractions except SQuAD's, which are
percentages like the official script prints.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Callable, Dict, List, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ..core.config import OMoEConfigError


def accuracy(predictions, references) -> Dict[str, float]:
    return {"accuracy": float(accuracy_score(references, predictions))}


def mcc(predictions, references) -> Dict[str, float]:
    return {"mcc": float(matthews_corrcoef(references, predictions))}


def f1_accuracy(predictions, references) -> Dict[str, float]:
    return {"f1": float(f1_score(references, predictions, average="binary", zero_division=0)),
            **accuracy(predictions, references)}


def accuracy_macro_f1(predictions, references) -> Dict[str, float]:
    return {**accuracy(predictions, references),
            "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}


def pearson_spearman(predictions, references) -> Dict[str, float]:
    predictions, references = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    pearson = float(stats.pearsonr(predictions, references)[0])
    spearman = float(stats.spearmanr(predictions, references)[0])
    return {"pearson": pearson, "spearman": spearman, "combined": (pearson + spearman) / 2}


def copa(predictions, references, groups: Sequence) -> Dict[str, float]:
    """predictions: a score per (example, choice) row; the highest-scoring row of a group is its answer."""
    best_row, gold_row = {}, {}
    for row, (score, label, group) in enumerate(zip(predictions, references, groups)):
        if group not in best_row or score > predictions[best_row[group]]:
            best_row[group] = row
        if label == 1:
            gold_row[group] = row
    return {"accuracy": float(np.mean([best_row[g] == gold_row.get(g) for g in best_row]))}


def multirc(predictions, references, groups: Sequence) -> Dict[str, float]:
    """F1a over all answer options; EM: a question counts only when all its options are right."""
    all_right = collections.defaultdict(lambda: True)
    for prediction, label, group in zip(predictions, references, groups):
        all_right[group] &= int(prediction) == int(label)
    return {"f1a": float(f1_score(references, predictions, average="binary", zero_division=0)),
            "em": float(np.mean(list(all_right.values())))}


# SQuAD v1.1 normalisation and scoring, transcribed from the official evaluate-v1.1.py because
# `evaluate.load("squad")` needs the hub.
def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1(prediction: str, truth: str) -> float:
    prediction_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """predictions: one answer string per question; references: the gold answer strings of each question."""
    exact = [max(normalize_answer(p) == normalize_answer(t) for t in truths) for p, truths in zip(predictions, references)]
    f1 = [max(_squad_f1(p, t) for t in truths) for p, truths in zip(predictions, references)]
    return {"exact_match": 100.0 * float(np.mean(exact)), "f1": 100.0 * float(np.mean(f1))}


def _prefixed(tag: str) -> str:
    """seqeval reads a tag's first letter as its chunk prefix: a bare IO tag "PER" must reach it as "I-PER"."""
    return tag if tag == "O" or tag[:2] in ("B-", "I-", "E-", "S-") else f"I-{tag}"


def seqeval(predictions: List[List[str]], references: List[List[str]]) -> Dict[str, float]:
    """Entity-level scores over BIO or IO tag-name sequences, plus token accuracy.

    seqeval's default mode (conlleval rules) starts an entity at B-, or at an I- after O or another type,
    so IO tags, which have no B-, chunk correctly; its strict IOB2 mode would drop every IO entity.
    """
    from seqeval import metrics as seq
    predictions = [[_prefixed(tag) for tag in row] for row in predictions]
    references = [[_prefixed(tag) for tag in row] for row in references]
    return {"f1": float(seq.f1_score(references, predictions, zero_division=0)),
            "precision": float(seq.precision_score(references, predictions, zero_division=0)),
            "recall": float(seq.recall_score(references, predictions, zero_division=0)),
            "accuracy": float(seq.accuracy_score(references, predictions))}


METRICS: Dict[str, Callable[..., Dict[str, float]]] = {
    "accuracy": accuracy, "mcc": mcc, "f1_accuracy": f1_accuracy, "accuracy_macro_f1": accuracy_macro_f1,
    "pearson_spearman": pearson_spearman, "copa": copa, "multirc": multirc, "squad": squad, "seqeval": seqeval,
}


def compute(metric: str, predictions, references, **kwargs) -> Dict[str, float]:
    if metric not in METRICS:
        raise OMoEConfigError(f"unknown metric {metric!r}; valid metrics are {sorted(METRICS)}")
    return METRICS[metric](predictions, references, **kwargs)
