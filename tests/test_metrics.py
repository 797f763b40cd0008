"""Metric values against hand-computed counts and closed forms."""
import math

import pytest

from omoe_ds.core.config import OMoEConfigError
from omoe_ds.finetune import metrics


def test_accuracy():
    assert metrics.compute("accuracy", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}


def test_mcc_on_a_small_confusion():
    # TP=2 TN=2 FP=1 FN=1: (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 3 / 9
    result = metrics.compute("mcc", [1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0])
    assert result["mcc"] == pytest.approx(1 / 3)


def test_binary_f1_and_accuracy():
    # TP=2 FP=1 FN=1 -> precision = recall = 2/3 -> F1 = 2/3; 3 of 5 right
    result = metrics.compute("f1_accuracy", [1, 1, 0, 1, 0], [1, 1, 1, 0, 0])
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(3 / 5)


def test_accuracy_macro_f1():
    # per-class F1: class 0 = 1, class 1 = 2/3 (TP1 FP1), class 2 = 2/3 (TP1 FN1)
    result = metrics.compute("accuracy_macro_f1", [0, 1, 2, 1], [0, 1, 2, 2])
    assert result == pytest.approx({"accuracy": 0.75, "macro_f1": 7 / 9})


def test_pearson_spearman_closed_forms():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    mx, my = sum(x) / 4, sum(y) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    pearson = cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    # ranks of y are 1,3,2,4: d = 0,1,-1,0 -> 1 - 6·Σd² / (n(n²−1)) = 1 - 12/60
    spearman = 1 - 6 * 2 / (4 * 15)
    result = metrics.compute("pearson_spearman", x, y)
    assert result["pearson"] == pytest.approx(pearson) and pearson == pytest.approx(5.5 / math.sqrt(43.75))
    assert result["spearman"] == pytest.approx(spearman)
    assert result["combined"] == pytest.approx((pearson + spearman) / 2)


def test_squad_normalises_articles_case_and_punctuation():
    predictions = ["The Eiffel Tower!", "in Paris, France"]
    references = [["eiffel tower", "a tower"], ["Paris"]]
    # 1st: exact after normalisation; 2nd: tokens {in, paris, france} vs {paris}: P=1/3 R=1 -> F1=1/2
    result = metrics.compute("squad", predictions, references)
    assert result["exact_match"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(75.0)
    assert metrics.normalize_answer("An  apple, the pie.") == "apple pie"


def test_seqeval_entity_f1_from_known_counts():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["B-MISC", "O"]]
    predictions = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "O"]]
    # gold entities PER, LOC, MISC; predicted PER, ORG -> TP=1 FP=1 FN=2
    result = metrics.compute("seqeval", predictions, references)
    assert result["precision"] == pytest.approx(1 / 2)
    assert result["recall"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx(0.4)
    assert result["accuracy"] == pytest.approx(4 / 6)


def test_seqeval_io_tags_chunk_without_b_and_bare_tags_score_as_i_tags():
    references = [["I-PER", "I-PER", "O", "I-LOC", "I-LOC", "I-PER"], ["O", "I-ORG"]]
    predictions = [["I-PER", "O", "O", "I-LOC", "I-LOC", "I-PER"], ["I-ORG", "I-ORG"]]
    # IO has no B-: a run of one type is one entity, a change of type starts the next (seqeval's default mode;
    # strict IOB2 would find no entity at all). gold PER(0-1) LOC(3-4) PER(5) ORG(1); predicted PER(0) LOC(3-4)
    # PER(5) ORG(0-1) -> TP=2 FP=2 FN=2; 6 of 8 tokens right
    result = metrics.compute("seqeval", predictions, references)
    assert result == pytest.approx({"f1": 0.5, "precision": 0.5, "recall": 0.5, "accuracy": 6 / 8})
    def bare(rows):
        return [[tag[2:] if tag != "O" else tag for tag in row] for row in rows]
    assert metrics.compute("seqeval", bare(predictions), bare(references)) == result


def test_copa_picks_the_higher_scoring_choice_per_example():
    # example 0: right choice scores higher; example 1: wrong choice scores higher
    result = metrics.compute("copa", [0.9, 0.1, 0.8, 0.2], [1, 0, 0, 1], groups=[0, 0, 1, 1])
    assert result == {"accuracy": 0.5}


def test_multirc_f1a_and_question_em():
    # TP=2 FP=0 FN=1 -> F1a = 0.8; question "a" fully right, "b" not -> EM = 1/2
    result = metrics.compute("multirc", [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], groups=["a", "a", "b", "b", "b"])
    assert result == pytest.approx({"f1a": 0.8, "em": 0.5})


def test_unknown_metric_names_the_valid_ones():
    with pytest.raises(OMoEConfigError, match="unknown metric 'bleu'.*accuracy"):
        metrics.compute("bleu", [0], [0])
