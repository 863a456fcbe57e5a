"""SigLipLoss: one process against the paper's formula written out pair by pair (value and gradients with
respect to the features, t and b); 2 and 4 real gloo processes (the text ring) against the single-process
loss on the concatenated batch; the model's optional learned logit_bias."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode

from clip.model import CLIPOutput, create_model, create_model_from_config
from clip.model.config import ModelConfigError
from clip.sigmoid_loss import SIGLIP_INIT, SigLipLoss

IN_DIM, FEATURE_DIM, LOCAL_BATCH = 6, 4, 3


def _reference_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                    positive_label: float = 1.0) -> torch.Tensor:
    """-(1/N) sum_i sum_j log sigmoid(label_ij * (t x_i.y_j + b)), label +1 on the diagonal, -1 elsewhere."""
    n = image.shape[0]
    total = image.new_zeros(())
    for i in range(n):
        for j in range(n):
            label = positive_label if i == j else -1.0
            total = total - F.logsigmoid(label * (scale * torch.dot(image[i], text[j]) + bias))
    return total / n


def _problem(n: int) -> dict[str, torch.Tensor]:
    """Same tensors on every rank: raw inputs for the global batch, two linear 'encoders', log t and b."""
    g = torch.Generator().manual_seed(4321 + n)
    return {
        "image_in": torch.randn(n, IN_DIM, generator=g, dtype=torch.float64),
        "text_in": torch.randn(n, IN_DIM, generator=g, dtype=torch.float64),
        "image_proj": torch.randn(IN_DIM, FEATURE_DIM, generator=g, dtype=torch.float64),
        "text_proj": torch.randn(IN_DIM, FEATURE_DIM, generator=g, dtype=torch.float64),
        "log_scale": torch.tensor(math.log(10.0), dtype=torch.float64),
        "bias": torch.tensor(-2.5, dtype=torch.float64),  # not -10: every term then carries visible gradient
    }


class _Encoders(nn.Module):
    """Two linear 'encoders' with L2-normalised outputs, a log t and a b: the loss's inputs, as CLIP gives them."""

    def __init__(self, problem: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name in ("image_proj", "text_proj", "log_scale", "bias"):
            self.register_parameter(name, nn.Parameter(problem[name].clone()))

    def forward(self, image_in: torch.Tensor, text_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image = F.normalize(image_in @ self.image_proj, dim=-1)  # [n, FEATURE_DIM]
        text = F.normalize(text_in @ self.text_proj, dim=-1)  # [n, FEATURE_DIM]
        return image, text, self.log_scale.exp(), self.bias


def _forward_backward(problem: dict[str, torch.Tensor], rows: slice, loss_fn,
                      wrap=lambda module: module) -> dict[str, torch.Tensor]:
    """Encode the given rows (through `wrap(encoders)`, e.g. DDP), run the loss, backprop; returns the loss,
    the feature gradients and the parameter gradients."""
    encoders = _Encoders(problem)
    wrapped = wrap(encoders)  # held until the backward: DDP's gradient hooks live as long as the wrapper
    image, text, scale, bias = wrapped(problem["image_in"][rows], problem["text_in"][rows])
    image.retain_grad()
    text.retain_grad()
    loss = loss_fn(image, text, scale, bias)
    loss.backward()
    out = {"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad}
    out.update({f"{name}_grad": p.grad for name, p in encoders.named_parameters()})
    return out


# ----------------------------------------------------------------------------------------------------------
# single process


def test_matches_pairwise_reference_value_and_gradients() -> None:
    problem = _problem(5)
    got = _forward_backward(problem, slice(None), SigLipLoss())
    want = _forward_backward(problem, slice(None), _reference_loss)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    assert want["bias_grad"].abs() > 1e-3 and want["log_scale_grad"].abs() > 1e-3  # the comparison is not vacuous


def test_known_value_and_the_reference_can_fail() -> None:
    # Orthogonal pairs, t = 1, b = 0: z = I, so each row has log(1 + e^-1) for its pair and log 2 per negative.
    n = 4
    eye = torch.eye(n, dtype=torch.float64)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    expected = math.log1p(math.exp(-1)) + (n - 1) * math.log(2)
    torch.testing.assert_close(SigLipLoss()(eye, eye, one, zero), torch.tensor(expected, dtype=torch.float64))

    # Self-check: the same reference with the positive label flipped (a sign error) is told apart.
    problem = _problem(5)
    image = F.normalize(problem["image_in"] @ problem["image_proj"], dim=-1)
    text = F.normalize(problem["text_in"] @ problem["text_proj"], dim=-1)
    scale, bias = problem["log_scale"].exp(), problem["bias"]
    flipped = _reference_loss(image, text, scale, bias, positive_label=-1.0)
    assert not torch.allclose(SigLipLoss()(image, text, scale, bias), flipped)


def test_bad_inputs_are_refused() -> None:
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    with pytest.raises(ValueError, match="differ in shape"):
        SigLipLoss()(torch.randn(4, 3), torch.randn(5, 3), scale, bias)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        SigLipLoss()(torch.randn(4), torch.randn(4), scale, bias)
    with pytest.raises(ValueError, match="init_logit_bias"):
        SigLipLoss()(torch.randn(4, 3), torch.randn(4, 3), scale, None)
    with pytest.raises(ValueError, match="0 rows"):
        SigLipLoss()(torch.randn(0, 3), torch.randn(0, 3), scale, bias)


class _HostSyncs(TorchFunctionMode):
    """Records tensor-to-host reads (.item(), .tolist(), .cpu(), float(), bool()) made under it."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__int__}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in self.READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_forward_and_backward_read_nothing_back_to_the_host() -> None:
    image = F.normalize(torch.randn(6, 4), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(6, 4), dim=-1).requires_grad_(True)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    with _HostSyncs() as planted:
        scale.item()  # self-check: a planted read is caught
    assert planted.calls == ["item"]
    with _HostSyncs() as syncs:
        SigLipLoss()(image, text, scale, bias).backward()
    assert syncs.calls == []


# ----------------------------------------------------------------------------------------------------------
# distributed: real gloo process groups, the text blocks passed around the ring

PARAM_GRADS = ("image_proj_grad", "text_proj_grad", "log_scale_grad", "bias_grad")


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        problem = _problem(LOCAL_BATCH * world_size)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        # Real DDP (its gradient all-reduce hooks fire during the backward, next to the ring's messages);
        # a second step on the same group checks that the ring's messages stay paired.
        results = [_forward_backward(problem, rows, SigLipLoss(), wrap=DistributedDataParallel) for _ in range(2)]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])  # 4: the ring's two directions are different ranks
def test_distributed_matches_single_process(world_size: int, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    want = _forward_backward(_problem(LOCAL_BATCH * world_size), slice(None), _reference_loss)

    for step in range(2):
        outs = [results[step] for results in per_rank]
        # The mean of the rank values is the global loss (each rank alone is not).
        losses = torch.stack([o["loss"] for o in outs])
        torch.testing.assert_close(losses.mean(), want["loss"])
        assert not torch.allclose(losses[0], want["loss"])
        # Rank-local feature gradients are W x the single-process ones (ClipLoss's gather_with_grad convention) ...
        for key in ("image_grad", "text_grad"):
            torch.testing.assert_close(torch.cat([o[key] for o in outs]) / world_size, want[key], msg=key)
        # ... and after DDP's averaging every parameter gradient, t and b included, is the single-process one.
        for key in PARAM_GRADS:
            for o in outs:
                torch.testing.assert_close(o[key], want[key], msg=key)


# ----------------------------------------------------------------------------------------------------------
# the model's learned bias


def test_model_with_bias_has_the_parameter_and_the_paper_init() -> None:
    plain = create_model("tiny-vit")
    model = create_model("tiny-vit", **SIGLIP_INIT)
    assert plain.logit_bias is None
    assert set(model.state_dict()) == set(plain.state_dict()) | {"logit_bias"}
    assert "logit_bias" not in plain.state_dict()
    assert model.logit_bias.item() == -10.0 and math.isclose(model.logit_scale.exp().item(), 10.0, rel_tol=1e-6)
    assert math.isclose(plain.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)  # CLIP's init unchanged

    images = torch.randn(2, 3, model.image_size, model.image_size)
    tokens = torch.randint(1, 100, (2, 8))
    tokens[:, -1] = model.vocab_size - 1  # end-of-text
    out = model(images, tokens)
    assert isinstance(out, CLIPOutput) and out.logit_bias is model.logit_bias
    assert plain(images, tokens).logit_bias is None
    SigLipLoss()(out.image_features, out.text_features, out.logit_scale, out.logit_bias).backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs() > 0


def test_bias_config_round_trips_and_old_configs_load() -> None:
    model = create_model("tiny-vit", **SIGLIP_INIT)
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)
    rebuilt = create_model_from_config(model.config.to_dict())
    rebuilt.load_state_dict(model.state_dict())  # strict: the key sets agree
    assert rebuilt.logit_bias.item() == -3.0 and rebuilt.config.init_logit_bias == -10.0

    old = create_model("tiny-vit").config.to_dict()  # a checkpoint written before these fields existed
    del old["init_logit_scale"], old["init_logit_bias"]
    assert create_model_from_config(old).logit_bias is None
    with pytest.raises(ModelConfigError, match="init_logit_bias"):
        create_model("tiny-vit", init_logit_bias=float("nan"))
    with pytest.raises(ModelConfigError, match="init_logit_scale"):
        create_model("tiny-vit", init_logit_scale="ln 10")


# ----------------------------------------------------------------------------------------------------------
# the trainer with train.loss: siglip


def test_siglip_run_trains_the_bias_resumes_and_refuses_another_loss(tmp_path: Path, monkeypatch) -> None:
    """train.loss=siglip end to end through clip.train.stage: the model gets the paper's start (t = 10, b = -10),
    the bias is learned (it moves), the default run folder is the siglip one, a rerun is a finished run, and a
    clip-loss run pointed at its folder is refused (the model would lack the bias)."""
    from clip.config import load_config
    from clip.formats.checkpoint import default_run_location
    from clip.formats.manifest import read_manifest
    from clip.train import stage
    from tests.support.shards import make_shards
    from tests.support.train_config import tiny_overrides

    make_shards(tmp_path / "shards", n=64, per_shard=32)
    monkeypatch.chdir(tmp_path)  # the default run folder is relative (models/runs/...)
    cfg = load_config(None, tiny_overrides(str(tmp_path / "shards"), "null", **{"train.loss": "siglip"}))
    assert cfg.train.output is None
    version = read_manifest(str(tmp_path / "shards")).data_version
    where = default_run_location(cfg.train.model, version, loss="siglip")
    assert "-siglip-" in where and where != default_run_location(cfg.train.model, version)

    result = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)
    assert math.isfinite(result.metrics["final_loss"]) and result.metrics["trained_steps_this_run"] > 0
    final = torch.load(tmp_path / where / "final.pt", weights_only=True)
    assert final["model_config"]["init_logit_bias"] == -10.0
    assert final["model_config"]["init_logit_scale"] == pytest.approx(math.log(10))
    assert float(final["model"]["logit_bias"]) != -10.0  # learned
    written = (tmp_path / where / "final.pt").stat().st_mtime_ns
    again = stage.run(cfg.train, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)
    assert again.metrics == result.metrics  # the finished run, reported as it was written
    assert (tmp_path / where / "final.pt").stat().st_mtime_ns == written
    as_clip = cfg.train.model_copy(update={"loss": "clip", "output": where})
    with pytest.raises(ValueError, match="train.loss"):
        stage.run(as_clip, storage=cfg.storage, compute=cfg.compute, tracking=cfg.tracking)
