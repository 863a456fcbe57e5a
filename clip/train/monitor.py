"""The per-epoch half of the learning curve: zero-shot top-1 on the built-in synthetic sets after every epoch.

    monitor = EpochMonitor(["synthetic-shapes"], image_size=64, tokenizer=tokenizer, device=device)
    monitor.accuracies(model)            # {"synthetic-shapes": 0.93}

`train.zeroshot_sets` names the sets (clip.synthetic.EVAL_SET_NAMES; empty: no monitor). The images are rendered
once, at the model's input size, from the same seed streams and with the same prompt templates as the evaluation
stage's test split (clip.eval.synthetic_sets), but fewer of them (EPOCH_EVAL_SAMPLES per set) and scored by the
training model in PyTorch rather than by the exported bundle: the curve tells whether and when a concept is
learned; the evaluation stage's table is the figure of record. The held-out set uses the generator's default
hold-out share. Every rank computes (an FSDP forward is collective); rank 0 logs.
"""

from __future__ import annotations

import torch

from clip.synthetic import EVAL_SET_NAMES, EVAL_TEMPLATES, eval_classnames, generate_eval_set
from clip.tokenizer import Tokenizer
from clip.transforms import eval_transform

# 200 images per set: a 0.5-point resolution, and about a second per epoch for the tiny model on two CPU cores.
EPOCH_EVAL_SAMPLES = 200


def check_set_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in EVAL_SET_NAMES]
    if unknown:
        raise ValueError(f"train.zeroshot_sets: unknown set {unknown[0]!r}; choose from {', '.join(EVAL_SET_NAMES)}")


class EpochMonitor:
    """Zero-shot top-1 of a model on fixed synthetic images; `accuracies` leaves the model's train/eval mode as it
    found it."""

    def __init__(self, set_names: list[str], *, image_size: int, tokenizer: Tokenizer, device: torch.device,
                 samples: int = EPOCH_EVAL_SAMPLES, seed: int = 0) -> None:
        check_set_names(set_names)
        preprocess = eval_transform(image_size)
        # per set: (images [n, 3, S, S], labels [n], prompt tokens [C * T, L], class count C)
        self.sets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
        for name in set_names:
            classes = eval_classnames(name)
            samples_of_set = generate_eval_set(name, seed=seed, n=samples, image_size=image_size)
            images = torch.stack([preprocess(image) for image, _ in samples_of_set]).to(device)
            labels = torch.tensor([classes.index(label) for _, label in samples_of_set], device=device)
            prompts = tokenizer([template.format(c) for c in classes for template in EVAL_TEMPLATES]).to(device)
            self.sets[name] = (images, labels, prompts, len(classes))

    @torch.no_grad()
    def accuracies(self, model: torch.nn.Module) -> dict[str, float]:
        """{set name: top-1} with the prompt ensemble: per class the re-normalised mean of its unit prompt vectors."""
        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, (images, labels, prompts, num_classes) in self.sets.items():
                image_features = model.encode_image(images, normalize=True).float()  # [n, E]
                prompt_features = model.encode_text(prompts, normalize=True).float()  # [C * T, E]
                class_features = torch.nn.functional.normalize(
                    prompt_features.reshape(num_classes, len(EVAL_TEMPLATES), -1).mean(dim=1), dim=-1)  # [C, E]
                predicted = (image_features @ class_features.T).argmax(dim=1)
                out[name] = float((predicted == labels).float().mean())
            return out
        finally:
            model.train(was_training)
