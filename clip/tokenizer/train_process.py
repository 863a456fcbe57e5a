"""The Rust BPE trainer in a process of its own, so that its caller can kill it (clip.tokenizer.bpe._learn_merges).

    python clip/tokenizer/train_process.py < settings-and-words > model.json

stdin: one JSON line of `tokenizers.trainers.BpeTrainer` settings (vocab_size, min_frequency, show_progress,
initial_alphabet), then the training text, one line per caption (`clip.tokenizer.bpe.trainer_words`: pieces
separated by spaces); stdout: the trained `tokenizers` model as JSON. Run by file path, so that it imports
`tokenizers` only (a fraction of a second), not the clip package.
"""

from __future__ import annotations

import io
import json
import signal
import sys

from tokenizers import Tokenizer, models, pre_tokenizers, trainers


def main() -> None:
    # Ctrl-C reaches the whole process group; the parent decides, and kills this process if it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lines = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="\n")
    settings = json.loads(lines.readline())
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(special_tokens=[], **settings)
    model.train_from_iterator((line.rstrip("\n") for line in lines), trainer=trainer)
    sys.stdout.buffer.write(model.to_str().encode("utf-8"))


if __name__ == "__main__":
    main()
