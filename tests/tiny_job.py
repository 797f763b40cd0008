"""Files for the tiny training-job tests (the fixtures in tests/conftest.py and tests/test_train_job.py)."""
import csv


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
