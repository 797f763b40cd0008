"""Tokenisation of unified task data into model inputs, and the inverse: model outputs back to metrics.

Every row is padded to max_length so the distributed MoE path sees static shapes. Columns that only
post-processing needs (QA "example_id" / "offset_mapping", token classification "word_index") stay
in the dataset as plain Python values beside the torch-formatted model inputs.
"""
from __future__ import annotations

import collections
from typing import Dict, List

import datasets
import numpy as np

from ..core.config import OMoEConfigError
from . import metrics
from .tasks import TaskSpec

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")
IGNORE_INDEX = -100        # positions the loss and the metrics skip
N_BEST = 20                # start / end candidates considered per QA feature
MAX_ANSWER_TOKENS = 30


def model_input_columns(encoded_split) -> List[str]:
    return [column for column in MODEL_INPUTS if column in encoded_split.column_names]


# ---------------------------------------------------------------- encoding

def _encode_sequences(data: datasets.Dataset, tokenizer, max_length: int, regression: bool) -> datasets.Dataset:
    def encode(batch):
        texts = (batch["text_a"], batch["text_b"]) if "text_b" in batch else (batch["text_a"],)
        encoded = tokenizer(*texts, truncation=True, max_length=max_length, padding="max_length")
        encoded["labels"] = batch["label"]
        return encoded
    encoded = data.map(encode, batched=True, remove_columns=data.column_names)
    return encoded.cast_column("labels", datasets.Value("float32")) if regression else encoded


def _encode_tokens(data: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """Labels on each word's first sub-word only; "word_index" maps those positions back to words."""
    def encode(batch):
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length,
                            padding="max_length")
        encoded["labels"], encoded["word_index"] = [], []
        for row, tags in enumerate(batch["tags"]):
            labels, word_index, previous = [], [], None
            for word in encoded.word_ids(row):
                first_sub_word = word is not None and word != previous
                labels.append(tags[word] if first_sub_word else IGNORE_INDEX)
                word_index.append(word if first_sub_word else -1)
                previous = word
            encoded["labels"].append(labels)
            encoded["word_index"].append(word_index)
        return encoded
    return data.map(encode, batched=True, remove_columns=data.column_names)


def _encode_causal_lm(data: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """prompt + response + EOS, truncated and padded to max_length; labels are the response and EOS tokens
    (the model shifts them), IGNORE_INDEX on the prompt and the padding."""
    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, response in zip(batch["prompt"], batch["response"]):
            prompt_ids = tokenizer(prompt).input_ids  # with the special tokens this tokenizer starts a text with
            response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            ids = (prompt_ids + response_ids)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
            pad = max_length - len(ids)
            out["input_ids"].append(ids + [tokenizer.pad_token_id] * pad)
            out["attention_mask"].append([1] * len(ids) + [0] * pad)
            out["labels"].append(labels + [IGNORE_INDEX] * pad)
        return out
    return data.map(encode, batched=True, remove_columns=data.column_names)


def _check_targets(encoded: datasets.DatasetDict, max_length: int) -> None:
    for split, data in encoded.items():
        empty = sum(1 for labels in data["labels"] if all(label == IGNORE_INDEX for label in labels))
        if empty:
            raise OMoEConfigError(f"{empty} of the {len(data)} {split} rows keep no response token within "
                                  f"--max-length={max_length} (the prompt fills it), so they give no loss: raise "
                                  "--max-length or shorten those prompts")


def _answer_token_span(answers: dict, offsets, sequence_ids) -> tuple:
    """Token (start, end) of the first gold answer, or (0, 0) — the [CLS] slot — when this window misses it."""
    if not answers["answer_start"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [i for i, sequence in enumerate(sequence_ids) if sequence == 1]
    first, last = context[0], context[-1]
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return 0, 0
    start = next(i for i in range(last, first - 1, -1) if offsets[i][0] <= start_char)
    end = next(i for i in range(first, last + 1) if offsets[i][1] >= end_char)
    return start, end


def _encode_qa(data: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
    """Question + context windows; a long context becomes several overlapping features of one example."""
    def encode(batch):
        encoded = tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                            max_length=max_length, stride=max_length // 4, return_overflowing_tokens=True,
                            return_offsets_mapping=True, padding="max_length")
        sample_of = encoded.pop("overflow_to_sample_mapping")
        encoded["start_positions"], encoded["end_positions"], encoded["example_id"] = [], [], []
        for row, offsets in enumerate(encoded["offset_mapping"]):
            sequence_ids = encoded.sequence_ids(row)
            start, end = _answer_token_span(batch["answers"][sample_of[row]], offsets, sequence_ids)
            encoded["start_positions"].append(start)
            encoded["end_positions"].append(end)
            encoded["example_id"].append(batch["id"][sample_of[row]])
            # only context tokens keep offsets, so decoding can never pick a span in the question
            encoded["offset_mapping"][row] = [list(o) if s == 1 else None for o, s in zip(offsets, sequence_ids)]
        return encoded
    return data.map(encode, batched=True, remove_columns=data.column_names)


def encode_task(spec: TaskSpec, raw: datasets.DatasetDict, tokenizer, max_length: int) -> datasets.DatasetDict:
    """Tokenised splits with torch-formatted model inputs (see model_input_columns)."""
    def encode(data):
        if spec.head == "token_classification":
            return _encode_tokens(data, tokenizer, max_length)
        if spec.head == "question_answering":
            return _encode_qa(data, tokenizer, max_length)
        if spec.head == "causal_lm":
            return _encode_causal_lm(data, tokenizer, max_length)
        return _encode_sequences(data, tokenizer, max_length, regression=spec.head == "regression")
    encoded = datasets.DatasetDict({split: encode(data) for split, data in raw.items()})
    if spec.head == "causal_lm":
        _check_targets(encoded, max_length)
    for data in encoded.values():
        data.set_format("torch", columns=model_input_columns(data), output_all_columns=True)
    return encoded


# ---------------------------------------------------------------- decoding

def _plain_column(split: datasets.Dataset, column: str) -> list:
    return list(split.with_format(None)[column])


def _word_tags(spec: TaskSpec, raw_split, encoded_split, logits: np.ndarray):
    """Per-word predicted tag names (a word lost to truncation counts as "O") and gold tag names."""
    predicted_ids = logits.argmax(-1)
    predictions, references = [], []
    for row, (word_index, tags) in enumerate(zip(_plain_column(encoded_split, "word_index"),
                                                 _plain_column(raw_split, "tags"))):
        words = ["O"] * len(tags)
        for position, word in enumerate(word_index):
            if word >= 0:
                words[word] = spec.label_names[predicted_ids[row, position]]
        predictions.append(words)
        references.append([spec.label_names[tag] for tag in tags])
    return predictions, references


def _best_span(start_logits, end_logits, offsets, context: str):
    """(score, text) of the best start <= end span inside the context and at most MAX_ANSWER_TOKENS long."""
    best = (-np.inf, "")
    for start in np.argsort(start_logits)[-N_BEST:][::-1]:
        for end in np.argsort(end_logits)[-N_BEST:][::-1]:
            if offsets[start] is None or offsets[end] is None or not 0 <= end - start < MAX_ANSWER_TOKENS:
                continue
            score = start_logits[start] + end_logits[end]
            if score > best[0]:
                best = (score, context[offsets[start][0]:offsets[end][1]])
    return best


def _decode_answers(raw_split, encoded_split, start_logits: np.ndarray, end_logits: np.ndarray) -> List[str]:
    features_of = collections.defaultdict(list)
    for row, example_id in enumerate(_plain_column(encoded_split, "example_id")):
        features_of[example_id].append(row)
    offsets = _plain_column(encoded_split, "offset_mapping")
    answers = []
    for example_id, context in zip(_plain_column(raw_split, "id"), _plain_column(raw_split, "context")):
        spans = [_best_span(start_logits[row], end_logits[row], offsets[row], context) for row in features_of[example_id]]
        answers.append(max(spans, key=lambda span: span[0])[1] if spans else "")
    return answers


def evaluate_predictions(spec: TaskSpec, raw_split, encoded_split, outputs: Dict[str, np.ndarray]) -> Dict[str, float]:
    """metrics.compute of the task's metric from model outputs in encoded_split's row order."""
    if spec.head == "question_answering":
        answers = _decode_answers(raw_split, encoded_split, np.asarray(outputs["start_logits"]),
                                  np.asarray(outputs["end_logits"]))
        gold = [example["text"] for example in _plain_column(raw_split, "answers")]
        return metrics.compute(spec.metric, answers, gold)
    logits = np.asarray(outputs["logits"])
    if spec.head == "token_classification":
        return metrics.compute(spec.metric, *_word_tags(spec, raw_split, encoded_split, logits))
    references = _plain_column(raw_split, "label")
    if spec.head == "regression":
        return metrics.compute(spec.metric, logits.reshape(-1), references)
    groups = {"groups": _plain_column(raw_split, "example_id")} if spec.metric in ("copa", "multirc") else {}
    if spec.metric == "copa":  # rank the choices of an example by their "right" log-odds
        return metrics.compute(spec.metric, logits[:, 1] - logits[:, 0], references, **groups)
    return metrics.compute(spec.metric, logits.argmax(-1), references, **groups)
