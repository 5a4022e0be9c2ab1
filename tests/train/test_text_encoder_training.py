"""Issue 15 item 1, training side: a kohya config without network_train_unet_only trains a Qwen3 text-encoder
LoRA next to the DiT's (kohya's default), through Qwen3 with autograd; the file reloaded onto fresh models gives
the trained DiT and the adapted encoder exactly; previews use the adapted encoder; the unet-only / text-encoder-
only / cached variants train what kohya trains; text_encoder_lr reaches the optimizer; checkpointing the encoder
changes no gradient; a resume with text-encoder modules is exact."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import anima_trainer.train.loop as loop
from anima_trainer.config import parse_train_args
from anima_trainer.demo import write_demo_configs, write_demo_dataset_toml
from anima_trainer.models import load_dit, load_text_encoder
from anima_trainer.models.text import AnimaTextEncoder
from anima_trainer.networks import create_network, create_network_from_weights
from anima_trainer.train.inputs import TextConditioner
from anima_trainer.train.loop import run_training
from anima_trainer.train.model_setup import prepare_text_encoder
from tests.support.killed_run import killed_after

TE_PREFIX = "text_encoders.qwen3_06b.transformer.model."
TE_MODULES = 2 * 7  # the tiny Qwen3: 2 layers × q/k/v/o + gate/up/down
DIT_MODULES = 2 * 10  # the tiny DiT: 2 blocks × kohya's default targets
CAPTIONS = ["a red circle", "a blue square on a white background"]


def _toml(setup: dict, out: Path, steps: int) -> Path:
    """The demo's configs without their `network_train_unet_only = true` line: a kohya config that does not set
    it."""
    toml = write_demo_configs(out, setup["models"], setup["images"], steps, seed=5)
    text = toml.read_text()
    assert "network_train_unet_only = true\n" in text
    toml.write_text(text.replace("network_train_unet_only = true\n", ""))
    return toml


def _config(setup: dict, out: Path, *extra: str, steps: int = 3):
    return parse_train_args(["--config_file", str(_toml(setup, out, steps)), "--learning_rate", "1e-2", "--log_with",
                             "none", *extra])


def _fresh(setup: dict) -> tuple[torch.nn.Module, AnimaTextEncoder]:
    m = setup["models"]
    return (load_dit(m["dit"], dtype=torch.float32),
            load_text_encoder(m["qwen3"], qwen3_tokenizer_path=m["tokenizers"], dtype=torch.float32))


def _modules(keys) -> tuple[set[str], set[str]]:
    """(DiT module names, text-encoder module names) of a saved file's keys."""
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    return ({n for n in names if n.startswith("diffusion_model.")}, {n for n in names if n.startswith(TE_PREFIX)})


def test_kohya_default_trains_text_encoder_and_dit_and_the_file_reproduces_both(setup, tmp_path, monkeypatch,
                                                                                  caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2\n")
    seen = {}

    def previews(dit, text_encoder, *args, **kwargs):  # what the loop hands the preview renderer
        seen["training"] = text_encoder.model.training
        with torch.no_grad():
            seen["hidden"] = text_encoder.encode(CAPTIONS).qwen_hidden.clone()
        return []

    monkeypatch.setattr(loop, "render_previews", previews)
    with caplog.at_level(logging.INFO):
        run = run_training(_config(setup, tmp_path, "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
                                   "--validation_split", "0.25"))
    assert f"training {DIT_MODULES} DiT + {TE_MODULES} text-encoder lora modules" in caplog.text
    saved = load_file(run.final_path)
    dit_mods, te_mods = _modules(saved)
    assert (len(dit_mods), len(te_mods)) == (DIT_MODULES, TE_MODULES)
    assert f"{TE_PREFIX}layers.1.mlp.down_proj" in te_mods and f"{TE_PREFIX}layers.0.self_attn.q_proj" in te_mods
    # both parts learned: every up factor starts at zero
    assert all(saved[f"{n}.lora_up.weight"].abs().max() > 0 for n in dit_mods | te_mods)
    hidden = _check_reload(setup, run)
    # the preview after the last step got the adapted encoder (the same as the file's), in eval mode
    assert seen["training"] is False and torch.equal(seen["hidden"], hidden)
    assert run.network.trains_text_encoder and run.network.trains_dit


@torch.no_grad()
def _check_reload(setup: dict, run) -> torch.Tensor:
    """The file onto fresh models gives the trained DiT and the adapted encoder exactly; returns the hidden
    states of CAPTIONS."""
    dit, te = _fresh(setup)
    plain = te.encode(CAPTIONS).qwen_hidden.clone()
    net = create_network_from_weights(dit, run.final_path, text_encoder=te.model)
    net.eval()
    run.network.eval()
    run.network.text_encoder.eval()
    trained_te = AnimaTextEncoder(run.network.text_encoder, te.tokenizer)
    hidden = te.encode(CAPTIONS).qwen_hidden
    assert torch.equal(trained_te.encode(CAPTIONS).qwen_hidden, hidden)
    assert not torch.allclose(hidden, plain, atol=1e-4)  # the text-encoder LoRA changes the encoder
    x = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 512, 64, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.3, 0.7])
    assert torch.equal(dit(x, s, ctx), run.dit(x, s, ctx))
    return hidden


def test_unet_only_and_text_encoder_only(setup, tmp_path):
    dit_only = run_training(_config(setup, tmp_path / "u", "--network_train_unet_only", steps=1))
    dit_mods, te_mods = _modules(load_file(dit_only.final_path))
    assert (len(dit_mods), te_mods) == (DIT_MODULES, set())
    te_only = run_training(_config(setup, tmp_path / "t", "--network_train_text_encoder_only", steps=2))
    saved = load_file(te_only.final_path)
    dit_mods, te_mods = _modules(saved)
    assert (dit_mods, len(te_mods)) == (set(), TE_MODULES)
    assert all(saved[f"{n}.lora_up.weight"].abs().max() > 0 for n in te_mods)
    # the DiT is left as it was: no module on it, the same output as a fresh one
    fresh, _ = _fresh(setup)
    x = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 512, 64, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(te_only.dit(x, s, ctx), fresh(x, s, ctx))


def test_network_weights_without_text_encoder_modules_start_them_fresh(setup, tmp_path, caplog):
    """kohya's network_weights load is non-strict: a DiT-only file continued by a config that also trains the
    text encoder loads its DiT modules exactly and the text-encoder modules start as initialised (one notice)."""
    from anima_trainer.networks.files import state_tensors
    from anima_trainer.train.model_setup import build_network

    dit_only = run_training(_config(setup, tmp_path / "u", "--network_train_unet_only", steps=1))
    start = load_file(dit_only.final_path)
    cfg = _config(setup, tmp_path / "c", "--network_weights", str(dit_only.final_path))
    dit, te = _fresh(setup)
    with caplog.at_level(logging.WARNING):
        net = build_network(cfg, dit, te.model)
    assert caplog.text.count("has no text-encoder module, so its 14 text-encoder modules start fresh") == 1
    now = state_tensors(net)
    dit_mods, te_mods = _modules(now)
    assert (len(dit_mods), len(te_mods)) == (DIT_MODULES, TE_MODULES)
    assert all(torch.equal(now[k], v.float()) for k, v in start.items())  # every DiT tensor as in the file
    assert all(not now[f"{n}.lora_up.weight"].any() for n in te_mods)  # LoRA's fresh up factor is zero
    run = run_training(cfg)  # and it trains on
    assert len(_modules(load_file(run.final_path))[1]) == TE_MODULES
    # the strict load (a file for the same network) still names a missing side as an error
    dit, te = _fresh(setup)
    with pytest.raises(Exception, match="the file has no text-encoder modules"):
        create_network(dit, text_encoder=te.model).load_weights(dit_only.final_path)


def test_a_text_cache_trains_the_dit_only_with_one_notice(setup, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run = run_training(_config(setup, tmp_path, "--cache_text_encoder_outputs", "--save_format", "kohya",
                                   steps=1))
    assert not run.network.trains_text_encoder
    keys = load_file(run.final_path)
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert caplog.text.count("cache_text_encoder_outputs = true: the text encoder (Qwen3) is not trained") == 1
    assert "save_format = \"kohya\": ComfyUI loads only the DiT part" not in caplog.text  # no TE keys to skip


def test_kohya_names_for_text_encoder_modules_get_a_notice(setup, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run = run_training(_config(setup, tmp_path, "--save_format", "kohya", steps=1))
    keys = load_file(run.final_path)
    assert {k.split(".")[0] for k in keys if k.startswith("lora_te_")} >= {"lora_te_layers_0_self_attn_q_proj"}
    assert caplog.text.count(f"save_format = \"kohya\": ComfyUI loads only the DiT part of the file; its "
                             f"{3 * TE_MODULES} text-encoder keys (lora_te_*)") == 1


@pytest.mark.parametrize(("extra", "te_lr"), [((), 1e-2), (("--text_encoder_lr", "3e-4"), 3e-4),
                                               (("--text_encoder_lr", "5e-4", "1e-3"), 5e-4)],
                         ids=["unset", "number", "list"])
def test_text_encoder_lr_reaches_the_optimizer(setup, tmp_path, extra, te_lr):
    run = run_training(_config(setup, tmp_path, "--unet_lr", "2e-3", *extra, steps=1))
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert lrs == {"base": 2e-3, "text_encoder": te_lr}  # kohya: unset → learning_rate, not unet_lr
    te_params = {id(p) for m in run.network.text_encoder_modules() for p in m.parameters()}
    group = next(g for g in run.optimizer.param_groups if g["name"] == "text_encoder")
    assert {id(p) for p in group["params"]} == te_params and te_params
    steps = [json.loads(line) for line in (tmp_path / "output" / "demo_lora.events.jsonl").read_text().splitlines()]
    logged = next(e for e in steps if e["type"] == "step")
    assert (logged["lr/base"], logged["lr/text_encoder"]) == (2e-3, te_lr)  # logged like every group


def _te_gradients(setup: dict, checkpointing: bool) -> tuple[list[torch.Tensor], int]:
    """Gradients of the text-encoder factors for one fp32 loss through Qwen3 → adapter, and how often the first
    Qwen3 layer's norm ran (2 with checkpointing: forward and recomputation; HF checkpoints the layer's forward
    inside its hooks, so the count is taken on a module within it)."""
    dit, te = _fresh(setup)
    network = create_network(dit, algo="lora", dim=4, alpha=4.0, text_encoder=te.model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in network.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    prepare_text_encoder(SimpleNamespace(gradient_checkpointing=checkpointing), te, network)
    calls = []
    te.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: calls.append(1))
    ctx = TextConditioner(dit, te, train_text_encoder=True).context(CAPTIONS)
    ctx.pow(2).mean().backward()
    grads = [p.grad.clone() for m in network.text_encoder_modules() for p in m.parameters()]
    assert grads and all(g.abs().max() > 0 for g in grads)
    return grads, len(calls)


def test_gradient_checkpointing_of_the_text_encoder_gives_the_same_gradients(setup):
    plain, runs_plain = _te_gradients(setup, checkpointing=False)
    checkpointed, runs_checkpointed = _te_gradients(setup, checkpointing=True)
    assert (runs_plain, runs_checkpointed) == (1, 2)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def _resume_config(setup: dict, out: Path, *extra: str):
    toml = _toml(setup, out, steps=4)
    # 4 images, batch 1: 4 batches per epoch; flips and shuffled captions depend on the epoch
    write_demo_dataset_toml(out / "dataset.toml", setup["images"], batch_size=1,
                            extra="flip_aug = true\nshuffle_caption = true\n")
    return parse_train_args(["--config_file", str(toml), "--learning_rate", "1e-2", "--save_every_n_steps", "2",
                             "--save_state", "--network_dropout", "0.1", "--lr_scheduler", "linear",
                             "--gradient_checkpointing", "--log_with", "none", *extra])


def test_resume_with_text_encoder_modules_is_exact(setup, tmp_path, monkeypatch):
    reference = run_training(_resume_config(setup, tmp_path / "ref"))
    assert reference.network.trains_text_encoder
    with killed_after(monkeypatch, 3):
        run_training(_resume_config(setup, tmp_path / "cut"))
    assert (tmp_path / "cut" / "output" / "demo_lora-step00000002-state").is_dir()
    resumed = run_training(_resume_config(setup, tmp_path / "cut", "--resume", "latest"))
    ref, got = load_file(reference.final_path), load_file(resumed.final_path)
    assert any(k.startswith(TE_PREFIX) for k in ref)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_the_cache_command_says_such_a_run_reads_no_text_cache(setup, tmp_path, capsys):
    from anima_trainer.cli import main
    from anima_trainer.demo import write_shapes_dataset

    images = write_shapes_dataset(tmp_path / "images", count=1, seed=1)  # its cache goes beside these images
    toml = write_demo_configs(tmp_path, setup["models"], images, 1, seed=5)
    toml.write_text(toml.read_text().replace("network_train_unet_only = true\n", ""))
    assert main(["cache", "--config_file", str(toml)]) == 0
    assert capsys.readouterr().err.count("notice: this config trains a text-encoder LoRA (kohya's default), so its "
                                         "training reads no text cache") == 1
    assert main(["cache", "--config_file", str(toml), "--network_train_unet_only"]) == 0
    assert "trains a text-encoder LoRA" not in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "counts"), [((), (280, 196)), (("--network_train_unet_only",), (280, 0)),
                                               (("--network_train_text_encoder_only",), (0, 196)),
                                               (("--cache_text_encoder_outputs",), (280, 0)),
                                               (("--text_encoder_lr", "0"), (280, 0)),
                                               (("--anima_flow_shift", "3"), (340, 0))],
                         ids=["kohya-default", "unet-only", "te-only", "text-cache", "te-lr-0", "sd-scripts-anima"])
def test_full_size_module_counts_on_meta_are_kohyas(extra, counts):
    """What a config trains on the full-size models (built on meta): kohya's 28 blocks × 10 DiT Linears and 28
    Qwen3 layers × 7 (q/k/v/o, gate/up/down); sd-scripts-anima's flavour adds the LLM adapter, never Qwen3."""
    from anima_trainer.networks.convert import build_meta_dit, build_meta_qwen3
    from anima_trainer.train.model_setup import build_network

    cfg = parse_train_args(["--pretrained_model_name_or_path", "d.safetensors", "--qwen3", "q.safetensors", "--vae",
                            "v.safetensors", "--output_dir", "out", "--dataset_config", "ds.toml", *extra])
    network = build_network(cfg, build_meta_dit(), build_meta_qwen3())
    assert (len(network.dit_modules()), len(network.text_encoder_modules())) == counts


@torch.no_grad()
def test_the_conditioner_follows_a_trained_encoder_and_memoises_a_frozen_one(setup):
    """Validation and the step get their context from TextConditioner.context: with a trained text encoder it is
    the adapted encoder's current output (no per-caption memo, also under no_grad as in validation); a frozen
    encoder's states are memoised (they never change)."""
    dit, te = _fresh(setup)
    network = create_network(dit, algo="lora", dim=4, alpha=4.0, text_encoder=te.model)
    up = network.text_encoder_modules()[0].lora_up.weight
    trained, frozen = TextConditioner(dit, te, train_text_encoder=True), TextConditioner(dit, te)
    before, memo = trained.context(CAPTIONS), frozen.context(CAPTIONS)
    assert torch.equal(before, memo)  # a fresh network leaves the encoder as it is
    up.add_(0.5)  # a training step changes the encoder
    enc = te.encode(CAPTIONS)
    now = dit.encode_context(enc.qwen_hidden, enc.t5_ids, qwen_mask=enc.qwen_mask, t5_mask=enc.t5_mask,
                             t5_weights=enc.t5_weights)
    after = trained.context(CAPTIONS)
    assert torch.equal(after, now) and not torch.allclose(after, before)
    assert torch.equal(frozen.context(CAPTIONS), memo)  # the memo (why it is off while the encoder trains)
    with pytest.raises(ValueError, match="cannot stand in for a text encoder that is trained"):
        trained.prefill({})
