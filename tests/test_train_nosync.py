"""A training step that is not a logging step reads nothing back on the host: no `.item()`, `.tolist()`, `.cpu()`,
`bool()`, `float()`, `int()` of a tensor (counted with a TorchFunctionMode: Tensor methods go through
__torch_function__), with and without accumulation, finite or skipped; the counter itself catches a planted
`.item()` and the model's eager token check; and over a whole run (clip.train.stage) the host reads of the training
code do not grow with the number of steps."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from clip.config import load_config
from clip.loss import ClipLoss
from clip.model import create_model
from clip.optim import build_optimizer, param_groups
from clip.train.distributed import DistInfo
from clip.train.loader import Batch
from clip.train.report import LogWindow
from clip.train.state import TrainState
from clip.train.step import NonFiniteGuard, NonFiniteLossError, device_inputs, mark_tokens_checked, train_step
from clip.train.wrap import wrap_model
from tests.support.shards import make_shards
from tests.support.train_config import tiny_overrides

HOST_READS = frozenset({"item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__"})
VOCAB = 600


class HostReads(TorchFunctionMode):
    """Records every tensor -> host read as (method name, the calling file)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.calls.append((name, _caller()))
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The file that made the read (the frame that called the tensor method), relative to the repository when it is
    one of its files: reads inside torch's own Python code (e.g. a non-fused optimizer's CPU step counters) are
    told apart from ours."""
    repo = str(Path(__file__).resolve().parent.parent) + "/"
    path = sys._getframe(2).f_code.co_filename
    return path[len(repo):] if path.startswith(repo) and "/.venv/" not in path else path


def _state(fused: bool) -> TrainState:
    torch.manual_seed(0)
    model = create_model("tiny-vit", image_size=32, patch_size=8, vision_layers=1, text_layers=1, vision_width=64,
                         text_width=64, text_heads=2, embed_dim=32, context_length=16, vocab_size=VOCAB)
    wrapped = wrap_model(model, DistInfo())
    # fused=True: AdamW's fused kernel takes the skip decision on the device (found_inf); CPU and CUDA
    optimizer = torch.optim.AdamW(param_groups(wrapped.module, 0.1), lr=1e-3, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return TrainState(wrapped=wrapped, optimizer=optimizer, scheduler=scheduler, tokenizer=None,  # type: ignore[arg-type]
                      model_config={}, train_config={}, data_version="", start_step=0, data_state=None)  # type: ignore[arg-type]


def _batch(n: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, 16, dtype=torch.long)
    for row in range(n):
        length = int(torch.randint(3, 10, (), generator=g))
        tokens[row, :length] = torch.randint(1, VOCAB - 1, (length,), generator=g)
        tokens[row, length] = VOCAB - 1  # end-of-text: the highest id
    return Batch(epoch=0, step_in_epoch=0, images=torch.randn(n, 3, 32, 32, generator=g), tokens=tokens,
                 keys=[str(i) for i in range(n)], positions={}, corrupt=0, truncated=0)


def _one_step(state: TrainState, batch: Batch, guard: NonFiniteGuard, window: LogWindow, *, accum_steps: int = 1,
              poison: bool = False, loss_fn: torch.nn.Module | None = None) -> Any:
    """What the training loop does per non-logging step (clip/train/stage.py), from the host batch on."""
    images, tokens, _ = device_inputs(batch, 32, torch.device("cpu"), vocab_size=VOCAB, trim_text=True)
    outcome = train_step(state, loss_fn or ClipLoss(equal_batches=True), images, tokens, DistInfo(),
                         use_bf16=False, poison=poison, accum_steps=accum_steps)
    guard.record(outcome.finite_flag)
    window.add(outcome.finite_flag, outcome.loss_value)
    return outcome


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.wrapped.module.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# the counter catches what it is meant to catch


class _PlantedItem(torch.nn.Module):
    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        loss = ClipLoss()(image, text, scale)
        loss.item()  # a host read hidden in the loss
        return loss


def test_the_counter_catches_a_planted_item() -> None:
    state = _state(fused=True)
    mark_tokens_checked(state.wrapped)
    batch = _batch()
    with HostReads() as reads:
        _one_step(state, batch, NonFiniteGuard(3, "out"), LogWindow(), loss_fn=_PlantedItem())
    assert reads.calls == [("item", "tests/test_train_nosync.py")]


def test_the_counter_catches_the_eager_token_check_and_the_unfused_skip_decision() -> None:
    state = _state(fused=False)  # no mark_tokens_checked: encode_text checks the ids itself (one .tolist())
    batch = _batch()
    with HostReads() as reads:
        _one_step(state, batch, NonFiniteGuard(3, "out"), LogWindow())
    assert ("tolist", "clip/model/model.py") in reads.calls
    assert ("__bool__", "clip/train/step.py") in reads.calls  # a non-fused optimizer: the skip read on the host


# ----------------------------------------------------------------------------------------------------------
# a step reads nothing on the host


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_non_logging_step_reads_nothing_on_the_host(accum_steps: int) -> None:
    state = _state(fused=True)
    mark_tokens_checked(state.wrapped)
    guard, window = NonFiniteGuard(2, "out"), LogWindow()
    warm_up = _one_step(state, _batch(seed=0), guard, window, accum_steps=accum_steps)  # optimizer state created
    before = _weights(state)
    batches = [_batch(seed=seed) for seed in (1, 2, 3)]
    with HostReads() as reads:
        finite = _one_step(state, batches[0], guard, window, accum_steps=accum_steps)
        after_finite = _weights(state)
        skipped = _one_step(state, batches[1], guard, window, accum_steps=accum_steps, poison=True)
    assert reads.calls == []
    # read afterwards (what a logging step does): the finite step trained, the poisoned one changed nothing
    assert finite.finite and math.isfinite(finite.loss) and not skipped.finite and math.isnan(skipped.loss)
    assert any(not torch.equal(before[k], after_finite[k]) for k in before)
    after_skip = _weights(state)
    assert all(torch.equal(after_finite[k], after_skip[k]) for k in after_finite)
    steps = {int(s["step"]) for s in state.optimizer.state_dict()["state"].values()}
    assert steps == {2}  # the skipped step rolled back the optimizer's step count
    assert window.steps == 3 and window.mean_loss() == pytest.approx((warm_up.loss + finite.loss) / 2, rel=1e-6)
    assert guard.total == 1 and guard.in_a_row == 1
    guard.check(3)  # 1 in a row, limit 2
    with HostReads() as reads:
        _one_step(state, batches[2], guard, window, accum_steps=accum_steps, poison=True)
    assert reads.calls == []
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps = 2"):
        guard.check(4)


def test_the_guard_stops_a_streak_that_ended_before_the_check() -> None:
    guard = NonFiniteGuard(2, "out")
    for finite in (True, False, False, True, True):  # 2 in a row, then recovered: checked only afterwards
        guard.record(torch.tensor(finite))
    assert guard.in_a_row == 0 and guard.total == 2
    with pytest.raises(NonFiniteLossError, match="2 consecutive"):
        guard.check(5)


# ----------------------------------------------------------------------------------------------------------
# a whole run: host reads do not grow with the step count

TRAINING_CODE = ("clip/train/stage.py", "clip/train/step.py", "clip/train/report.py", "clip/train/steplog.py",
                 "clip/train/checkpointer.py", "clip/train/prepare.py", "clip/loss.py", "clip/model/")


def _run_reads(data: Path, out: Path, epochs: int) -> list[tuple[str, str]]:
    from clip.train import stage

    cfg = load_config(None, tiny_overrides(str(data), str(out), **{
        "train.epochs": epochs, "train.log_every": 1000, "train.checkpoint_every": 1000}))
    with HostReads() as reads:
        result = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)
    assert result.metrics["steps"] == 6 * epochs and math.isfinite(result.metrics["final_loss"])
    return [call for call in reads.calls if call[1].startswith(TRAINING_CODE)]


def test_host_reads_of_a_run_do_not_grow_with_its_steps(tmp_path: Path) -> None:
    make_shards(tmp_path / "shards", n=96, per_shard=48)  # batch 16: 6 steps per epoch
    short = _run_reads(tmp_path / "shards", tmp_path / "short", epochs=1)
    long = _run_reads(tmp_path / "shards", tmp_path / "long", epochs=2)
    # The optimizer of the run (clip.optim.build_optimizer): a fused AdamW decides the skip on the device; any
    # other reads the decision on the host once per step (clip/train/step.py's _step_if_finite).
    probe = torch.nn.Linear(2, 2)
    fused = bool(build_optimizer(probe, lr=1e-3).param_groups[0].get("fused"))
    per_step_skip_reads = 0 if fused else 1
    extra = [call for call in long if call not in short or long.count(call) != short.count(call)]
    counts = {call: long.count(call) - short.count(call) for call in set(extra)}
    expected = {} if fused else {("__bool__", "clip/train/step.py"): 6 * per_step_skip_reads}
    # The learning curve reads the epoch's mean loss once as an epoch ends (clip/train/report.py's
    # LogWindow.mean_loss), like a logging step: one read per epoch, never per step.
    expected[("tolist", "clip/train/report.py")] = 1
    assert counts == expected, counts
