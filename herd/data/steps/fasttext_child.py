"""One fastText supervised training, run by `classifiers.train_fasttext` in a fresh interpreter.

Why a separate process: see `train_fasttext`. This file is run as a script (`python -P <path>`),
so it imports only fastText, never herd, and the child's heap holds nothing but what fastText itself
allocates. It reads a JSON job on stdin, writes the model to `job["model"]` and the held-out
predictions and the label set as JSON to `job["result"]`.
"""

import json
import sys

import fasttext


def main() -> None:
    job = json.load(sys.stdin)
    model = fasttext.train_supervised(job["train_file"], **job["params"])
    model.save_model(job["model"])
    labels, _ = model.predict(job["valid"]) if job["valid"] else ([], [])
    with open(job["result"], "w", encoding="utf-8") as f:
        json.dump({"predicted": [top[0] if top else "" for top in labels], "labels": model.get_labels()}, f)


if __name__ == "__main__":
    main()
