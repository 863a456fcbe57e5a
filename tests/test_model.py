"""clip.model and clip.optim: presets and parameter counts, parity with open_clip (the reference
implementation of OpenAI's CLIP) on outputs and gradients, strict weight loading, the speed options being
exact, input errors, the weight-decay grouping, and a smoke run of benchmarks/train_step.py.

    .venv/bin/pytest tests/test_model.py -x -q
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip.model import (
    CLIP,
    CLIPOutput,
    ModelConfigError,
    StateDictMismatchError,
    build_from_checkpoint,
    config_from_state_dict,
    create_model,
    create_model_from_config,
    list_models,
    load_openai_state_dict,
)
from clip.model.loading import read_weights
from clip.model.transformer import Transformer
from clip.optim import build_optimizer, param_groups
from clip.tokenizer import Tokenizer
from clip.tokenizer.bpe import MIN_VOCAB_SIZE
from tests.support.openclip_twin import open_clip_from_config

open_clip = pytest.importorskip("open_clip")
logging.getLogger("root").setLevel(logging.ERROR)  # open_clip warns when no pretrained weights are loaded

REPO = Path(__file__).resolve().parents[1]

# Published parameter counts of OpenAI's CLIP models (sum of numel over parameters).
OPENAI_PARAM_COUNTS = {
    "ViT-B-32": 151_277_313,
    "RN50": 102_007_137,
    "ViT-B-16": 149_620_737,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "ViT-L-14": 427_616_513,
}


def open_clip_twin(model: CLIP) -> nn.Module:
    """open_clip's model for the same architecture, built from an equivalent model-config dict."""
    return open_clip_from_config(model.config)


def randomise_(model: nn.Module, seed: int = 0) -> None:
    """Perturb every weight and BN statistic so that no zero-initialised part (BN gains of the last
    conv of each block, biases) hides a difference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen) * 0.02
            if name.endswith("running_var"):
                tensor.copy_(1.0 + noise.abs() * 10)
            elif name.endswith("logit_scale"):
                continue
            else:
                tensor.add_(noise)


def make_tokens(model: CLIP, batch: int, seed: int = 0) -> torch.Tensor:
    """Rows of [sot, words..., eot, 0...] of different lengths; eot is the highest id (vocab - 1)."""
    ctx, vocab = model.context_length, model.vocab_size
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    lengths = [3, ctx, 12, 30, 5, 20, 9, 40][:batch] + [7] * max(0, batch - 8)
    for row, length in enumerate(lengths):
        tokens[row, : length - 1] = torch.randint(1, vocab - 2, (length - 1,), generator=gen)
        tokens[row, 0] = vocab - 2
        tokens[row, length - 1] = vocab - 1
    return tokens


def make_images(model: CLIP, batch: int, seed: int = 0) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def symmetric_ce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * image @ text.T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ------------------------------------------------------------------------------------------------------
# presets


def test_presets_are_listed_and_unknown_names_list_them() -> None:
    names = list_models()
    assert {"RN50", "RN101", "RN50x4", "ViT-B-32", "ViT-B-16", "ViT-L-14", "tiny-vit", "tiny-rn"} <= set(
        names
    )
    with pytest.raises(ModelConfigError) as err:
        create_model("ViT-Z-99")
    assert "ViT-Z-99" in str(err.value) and "tiny-vit" in str(err.value) and "RN50x4" in str(err.value)


@pytest.mark.parametrize("name", list(OPENAI_PARAM_COUNTS))
def test_parameter_counts_equal_openai(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OPENAI_PARAM_COUNTS[name]
    assert model.config.quick_gelu  # what OpenAI released


def test_config_round_trip_and_overrides() -> None:
    model = create_model("tiny-vit", vocab_size=1000, quick_gelu=True, image_size=96)
    cfg = model.config
    assert (cfg.text.vocab_size, cfg.quick_gelu, cfg.vision.image_size) == (1000, True, 96)
    assert model.token_embedding.weight.shape[0] == 1000
    assert model.visual.positional_embedding.shape[0] == (96 // 8) ** 2 + 1
    data = json.loads(json.dumps(cfg.to_dict()))  # plain data, as stored in a checkpoint
    rebuilt = create_model_from_config(data)
    assert rebuilt.config == cfg
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    rn = create_model("tiny-rn", vision_layers=[1, 2, 1, 1])
    assert rn.config.to_dict()["vision"]["layers"] == [1, 2, 1, 1] and len(rn.visual.layer2) == 2
    with pytest.raises(ModelConfigError, match="ambiguous"):
        create_model("tiny-vit", width=64)
    with pytest.raises(ModelConfigError, match="unknown model override 'depth'"):
        create_model("tiny-vit", depth=3)
    with pytest.raises(ModelConfigError, match="patch_size"):
        create_model("tiny-vit", image_size=60)
    with pytest.raises(ModelConfigError, match=r"vision\.colour"):
        create_model_from_config({**data, "vision": {**data["vision"], "colour": 1}})


# ------------------------------------------------------------------------------------------------------
# parity with open_clip


def assert_same_embeddings(ours: CLIP, peer: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> None:
    """Both encoders match open_clip's: the default calls (raw projections in both, OpenAI's convention)
    within float tolerance relative to their size, and `normalize=True` (unit vectors) within 1e-5."""
    for method, inputs in (("encode_image", images), ("encode_text", tokens)):
        raw, peer_raw = getattr(ours, method)(inputs), getattr(peer, method)(inputs)
        assert (raw - peer_raw).abs().max() < 1e-5 * max(1.0, peer_raw.abs().max().item()), method
        unit, peer_unit = getattr(ours, method)(inputs, normalize=True), getattr(peer, method)(inputs, normalize=True)
        assert (unit - peer_unit).abs().max() < 1e-5, method


@pytest.mark.parametrize("name,quick_gelu", [("tiny-vit", False), ("tiny-vit", True), ("tiny-rn", False)])
def test_tiny_parity_with_open_clip_outputs_and_gradients(name: str, quick_gelu: bool) -> None:
    torch.manual_seed(0)
    ours = create_model(name, quick_gelu=quick_gelu)
    randomise_(ours)
    peer = open_clip_twin(ours)
    peer.load_state_dict(ours.state_dict(), strict=True)
    images, tokens = make_images(ours, 8), make_tokens(ours, 8)

    # eval mode: embeddings, raw (both defaults) and normalised
    ours.eval(), peer.eval()
    with torch.no_grad():
        assert_same_embeddings(ours, peer, images, tokens)

    # train mode: loss and every parameter's gradient (batch-statistics BN, backward through all tricks)
    ours.train(), peer.train()
    out = ours(images, tokens)
    loss_ours = symmetric_ce(out.image_features, out.text_features, out.logit_scale)
    peer_image, peer_text, peer_scale = peer(images, tokens)
    loss_peer = symmetric_ce(peer_image, peer_text, peer_scale)
    loss_ours.backward(), loss_peer.backward()
    assert abs(loss_ours.item() - loss_peer.item()) < 1e-5
    peer_params = dict(peer.named_parameters())
    for pname, param in ours.named_parameters():
        ref = peer_params[pname].grad
        assert ref is not None and param.grad is not None, pname
        scale = ref.abs().max().item() + 1e-12
        assert (param.grad - ref).abs().max().item() <= 1e-4 * scale + 1e-7, pname
    # BN running statistics moved identically
    peer_buffers = dict(peer.named_buffers())
    for bname, buf in ours.named_buffers():
        if "running" in bname:
            assert torch.allclose(buf, peer_buffers[bname], atol=1e-6), bname


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_full_size_parity_with_open_clip_quickgelu(name: str) -> None:
    torch.manual_seed(0)
    peer = open_clip.create_model(f"{name}-quickgelu", pretrained=None).eval()
    randomise_(peer)
    ours = load_openai_state_dict(create_model(name), peer.state_dict()).eval()
    images, tokens = make_images(ours, 2), make_tokens(ours, 2)
    with torch.no_grad():
        assert_same_embeddings(ours, peer, images, tokens)


# ------------------------------------------------------------------------------------------------------
# forward contract, exactness of the speed options


def test_forward_returns_normalised_features_and_clamped_scale() -> None:
    model = create_model("tiny-vit").eval()
    images, tokens = make_images(model, 4), make_tokens(model, 4)
    with torch.no_grad():
        out = model(images, tokens)
    assert isinstance(out, CLIPOutput)
    assert out.image_features.shape == out.text_features.shape == (4, model.config.embed_dim)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out.text_features.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)
    raw = model.encode_image(images, normalize=False)
    assert torch.allclose(F.normalize(raw, dim=-1), out.image_features, atol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert model(images, tokens).logit_scale.item() == pytest.approx(100.0)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_encoders_return_raw_features_by_default_and_unit_vectors_on_request(name: str) -> None:
    """OpenAI's CLIP and open_clip convention: encode_image / encode_text give the raw projections unless
    normalize=True; forward() normalises (what the loss needs)."""
    model = create_model(name).eval()
    images, tokens = make_images(model, 4), make_tokens(model, 4)
    ones = torch.ones(4)
    with torch.no_grad():
        for method, inputs in (("encode_image", images), ("encode_text", tokens)):
            raw = getattr(model, method)(inputs)
            assert torch.equal(raw, getattr(model, method)(inputs, normalize=False)), method
            assert not torch.allclose(raw.norm(dim=-1), ones, atol=1e-2), method  # not unit norm
            unit = getattr(model, method)(inputs, normalize=True)
            assert torch.allclose(unit.norm(dim=-1), ones, atol=1e-5), method
            assert torch.allclose(unit, F.normalize(raw, dim=-1), atol=1e-6), method
        out = model(images, tokens)
        assert torch.equal(out.image_features, model.encode_image(images, normalize=True))
        assert torch.equal(out.text_features, model.encode_text(tokens, normalize=True))


@pytest.mark.parametrize("causal", [False, True])
def test_pooled_last_block_equals_full_forward(causal: bool) -> None:
    torch.manual_seed(0)
    transformer = Transformer(width=64, layers=3, heads=4)
    transformer.init_weights()
    x = torch.randn(5, 11, 64)
    index = torch.tensor([0, 10, 3, 7, 3])
    full = transformer(x, causal=causal)
    pooled = transformer.forward_pooled(x, index if causal else None, causal=causal)
    expected = full[torch.arange(5), index] if causal else full[:, 0]
    assert (pooled - expected).abs().max() < 1e-5


def test_packed_pooled_equals_full_forward_and_skips_the_padding() -> None:
    torch.manual_seed(0)
    transformer = Transformer(width=64, layers=3, heads=4)
    transformer.init_weights()
    x = torch.randn(5, 11, 64)
    index = torch.tensor([0, 10, 3, 7, 3])
    rows_seen = []
    hook = transformer.resblocks[0].mlp.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    packed = transformer.forward_pooled_packed(x, index)
    hook.remove()
    expected = transformer(x, causal=True)[torch.arange(5), index]
    assert (packed - expected).abs().max() < 1e-5
    assert rows_seen == [int((index + 1).sum())]  # 26 of the 55 positions, not the whole padded batch


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_packed_text_encoding_equals_eager(name: str) -> None:
    model = create_model(name).eval()
    randomise_(model)
    tokens = make_tokens(model, 8)
    noisy = tokens.clone()
    for row in range(len(noisy)):  # what follows a row's end-of-text token is never read
        end = int(noisy[row].argmax())
        noisy[row, end + 1 :] = torch.randint(1, model.vocab_size - 2, (noisy.shape[1] - end - 1,))
    with torch.no_grad():
        eager = model.encode_text(tokens)
        for batch, expected in ((tokens, eager), (noisy, eager), (tokens[:1], eager[:1]), (tokens[2:5], eager[2:5])):
            assert (model.encode_text(batch, packed=True) - expected).abs().max() < 1e-4


def test_text_padding_trim_is_exact_and_padding_is_ignored() -> None:
    model = create_model("tiny-vit").eval()
    tokens = make_tokens(model, 8)
    tokens[1] = tokens[2]  # no row reaches the end: the batch's text is trimmed
    with torch.no_grad():
        trimmed = model.encode_text(tokens, normalize=True)
        model.trim_text_padding = False
        untrimmed = model.encode_text(tokens, normalize=True)
        noisy = tokens.clone()
        for row in range(len(noisy)):  # garbage after the end-of-text token must not matter (causal)
            end = int(noisy[row].argmax())
            noisy[row, end + 1 :] = torch.randint(1, model.vocab_size - 2, (noisy.shape[1] - end - 1,))
        assert (model.encode_text(noisy, normalize=True) - untrimmed).abs().max() < 1e-5
    assert (trimmed - untrimmed).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens.int(), normalize=True), untrimmed)  # int32 ids work too


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_and_channels_last_are_exact(name: str) -> None:
    torch.manual_seed(0)
    reference = create_model(name)
    randomise_(reference)
    other = create_model_from_config(reference.config.to_dict())
    other.load_state_dict(reference.state_dict())
    other.set_grad_checkpointing(True)
    other.set_channels_last(True)
    images, tokens = make_images(reference, 4), make_tokens(reference, 4)
    losses = []
    for model in (reference, other):
        out = model(images, tokens)
        loss = symmetric_ce(out.image_features, out.text_features, out.logit_scale)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    other_params = dict(other.named_parameters())
    for pname, param in reference.named_parameters():
        assert torch.allclose(param.grad, other_params[pname].grad, atol=1e-5, rtol=1e-4), pname
    other_buffers = dict(other.named_buffers())
    for bname, buf in reference.named_buffers():  # BN statistics updated once, not again in recomputation
        assert torch.allclose(buf.float(), other_buffers[bname].float(), atol=1e-6), bname


def test_a_few_steps_fit_a_small_batch() -> None:
    torch.manual_seed(0)
    model = create_model("tiny-vit", vision_layers=2, text_layers=2, vocab_size=512)
    optimizer = build_optimizer(model, lr=5e-4)
    images, tokens = make_images(model, 8), make_tokens(model, 8)
    losses = []
    for _ in range(15):
        out = model(images, tokens)
        loss = symmetric_ce(out.image_features, out.text_features, out.logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------------
# bad input


def test_wrong_inputs_get_clear_errors() -> None:
    model = create_model("tiny-vit")
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 3, 64, 64\], got \[2, 3, 32, 32\]"):
        model.encode_image(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 3, 64, 64\], got \[2, 1, 64, 64\]"):
        model.encode_image(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"got \[3, 64, 64\]"):
        model.encode_image(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="floating-point"):
        model.encode_image(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"1 <= L <= 77, got \[2, 78\]"):
        model.encode_text(torch.zeros(2, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 5000 out of range for vocab_size 4096"):
        model.encode_text(torch.tensor([[1, 5000, 0]]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": -32}, "vision.image_size must be a positive integer, got -32"),
        ({"image_size": "abc"}, "vision.image_size must be a positive integer, got 'abc'"),
        ({"text_width": 0}, "text.width must be a positive integer, got 0"),
        ({"vision_mlp_ratio": -1.0}, "vision.mlp_ratio must be a positive number, got -1.0"),
        ({"vision_layers": 2.5}, "vision.layers must be an int"),
        ({"image_size": 100}, r"vision.image_size \(100\) must be a multiple of vision.patch_size \(8\)"),
    ],
)
def test_bad_model_overrides_name_the_key_and_value(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        create_model("tiny-vit", **overrides)


# ------------------------------------------------------------------------------------------------------
# loading weights


def _torchscript_archive(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive holding `state_dict` under the same names plus OpenAI's extra attributes,
    the way OpenAI's released .pt files are stored."""

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for name, tensor in state_dict.items():
        *path_parts, leaf = name.split(".")
        module = root
        for part in path_parts:
            if part not in module._modules:
                module.add_module(part, Holder())
            module = module._modules[part]
        if tensor.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, tensor.clone())
    for extra in ("input_resolution", "context_length", "vocab_size"):
        root.register_buffer(extra, torch.tensor(1))
    with pytest.warns(FutureWarning):
        scripted = torch.jit.script(root)
    scripted.save(str(path))


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_load_from_files_torchscript_and_checkpoints(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_model(name).eval()
    randomise_(source)
    images, tokens = make_images(source, 2), make_tokens(source, 2)
    with torch.no_grad():
        expected = (source.encode_image(images), source.encode_text(tokens))

    def check(model: CLIP) -> None:
        model.eval()
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), expected[0])
            assert torch.equal(model.encode_text(tokens), expected[1])

    plain = tmp_path / "weights.pt"
    torch.save(source.state_dict(), plain)
    check(load_openai_state_dict(create_model(name), plain))

    archive = tmp_path / "openai-style.pt"
    _torchscript_archive(source.state_dict(), archive)
    inferred = config_from_state_dict(read_weights(archive), quick_gelu=False)
    assert inferred.to_dict() | {"name": ""} == source.config.to_dict() | {"name": ""}
    check(load_openai_state_dict(create_model(name), archive))

    checkpoint = {"model": source.state_dict(), "model_config": source.config.to_dict(), "step": 3,  # docs/formats.md
                  "tokenizer": Tokenizer.train(["a photo of a cat"], vocab_size=MIN_VOCAB_SIZE).to_json()}
    model, tokenizer = build_from_checkpoint(checkpoint, "final.pt")  # the model rebuilds from its own config
    check(model)
    assert not model.training and tokenizer.vocab_size == MIN_VOCAB_SIZE


def test_mismatched_weights_name_the_first_offending_keys() -> None:
    model = create_model("tiny-vit")
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k != "ln_final.weight"}
    with pytest.raises(StateDictMismatchError, match=r"missing \(1\): ln_final\.weight"):
        load_openai_state_dict(model, missing)
    with pytest.raises(StateDictMismatchError, match=r"unexpected \(1\): visual\.extra"):
        load_openai_state_dict(model, {**state, "visual.extra": torch.zeros(1)})
    wrong = {**state, "text_projection": torch.zeros(128, 64)}
    with pytest.raises(
        StateDictMismatchError, match=r"text_projection: checkpoint \[128, 64\] vs model \[128, 128\]"
    ):
        load_openai_state_dict(model, wrong)
    with pytest.raises(StateDictMismatchError, match=r"missing \(\d+\): visual\.class_embedding.*unexpected"):
        load_openai_state_dict(model, create_model("tiny-rn").state_dict())  # another architecture entirely
    with pytest.raises(FileNotFoundError):
        load_openai_state_dict(model, "/nonexistent/ViT-B-32.pt")


# ------------------------------------------------------------------------------------------------------
# optimizer


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_param_groups_exclude_gains_biases_embeddings_and_scale(name: str) -> None:
    model = create_model(name)
    groups = param_groups(model, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.2, 0.0)
    assert decayed | plain == set(names.values()) and not decayed & plain
    for n in plain:
        p = dict(model.named_parameters())[n]
        assert p.ndim < 2 or "embedding" in n, n
    for n in (
        "token_embedding.weight",
        "positional_embedding",
        "logit_scale",
        "ln_final.weight",
        "transformer.resblocks.0.attn.in_proj_bias",
        "transformer.resblocks.0.mlp.c_fc.bias",
    ):
        assert n in plain, n
    for n in (
        "text_projection",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.attn.out_proj.weight",
        "visual.conv1.weight",
    ):
        assert n in decayed, n
    if name == "tiny-vit":
        assert {"visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight"} <= plain
        assert "visual.proj" in decayed
    else:
        assert {
            "visual.attnpool.positional_embedding",
            "visual.bn1.weight",
            "visual.layer1.0.bn3.bias",
        } <= plain
        assert {"visual.attnpool.q_proj.weight", "visual.layer1.0.downsample.0.weight"} <= decayed


def test_build_optimizer_decays_only_the_decayed_group() -> None:
    model = create_model("tiny-vit")
    optimizer = build_optimizer(model, lr=0.1, weight_decay=0.5, betas=(0.8, 0.9), eps=1e-7)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-7
    assert optimizer.defaults.get("fused")  # CPU parameters too: its found_inf skips a step without a host sync
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only decoupled weight decay moves parameters
    optimizer.step()
    params = dict(model.named_parameters())
    assert torch.allclose(params["text_projection"], before["text_projection"] * (1 - 0.1 * 0.5))
    assert torch.equal(params["positional_embedding"], before["positional_embedding"])
    assert torch.equal(params["logit_scale"], before["logit_scale"])
    with pytest.raises(ValueError, match="learning rate"):
        build_optimizer(model, lr=0.0)


# ------------------------------------------------------------------------------------------------------
# benchmark


def test_train_step_benchmark_runs_with_open_clip_peer() -> None:
    """The benchmark runs as people run it (a script from the repo root) and prints one JSON result."""
    args = ["--config", "tiny-rn", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "2",
            "--peer", "open_clip"]
    done = subprocess.run([sys.executable, "benchmarks/train_step.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    for side in ("ours", "open_clip"):
        assert result[side]["samples_per_s"] > 0 and result[side]["flops_per_step"] > 0
    assert result["ours"]["params"] == result["open_clip"]["params"]
    assert result["speed_ratio_ours_over_open_clip"] > 0 and result["peak_rss_mb"] > 0
