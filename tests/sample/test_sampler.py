"""Sampler: ComfyUI's sigma table and schedule, exact Euler integration, CFG, and the `sample` command."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from anima_trainer.cli import _build_parser, main
from anima_trainer.demo import write_demo_models
from anima_trainer.evaluation.eval_results import EvalResults
from anima_trainer.sample.generate import read_png_parameters
from anima_trainer.sample.sampler import cfg_velocity, initial_noise, sample_euler, sigma_table, simple_schedule


def test_sigma_table_is_comfyuis(dit_io):
    assert torch.equal(sigma_table(3.0), dit_io["model_sampling_sigmas"])


def test_simple_schedule_picks_comfyui_entries():
    table = sigma_table(3.0)
    s = simple_schedule(4, 3.0)
    assert torch.equal(s, torch.stack([table[-1], table[-251], table[-501], table[-751], torch.zeros(())]))
    assert s[0] == 1.0 and s[-1] == 0.0 and len(simple_schedule(30)) == 31
    assert torch.all(simple_schedule(30)[:-1] > simple_schedule(30)[1:])
    with pytest.raises(ValueError, match="steps"):
        simple_schedule(0)


def test_euler_follows_a_straight_flow_exactly():
    """With the true velocity of one data point, (x − x0)/σ, Euler lands on x0 for any schedule."""
    x0 = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(1))
    noise = initial_noise(x0.shape, seed=7)
    out = sample_euler(lambda x, s: (x - x0) / s, noise, simple_schedule(5), progress=False)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_cfg_mixes_velocities_like_comfyui_mixes_denoised():
    def model(x, sigma, ctx):  # a toy "DiT": depends on the context row sum
        return x * ctx.sum(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    x, sigma = torch.randn(1, 16, 1, 2, 2), torch.tensor([0.6])
    cond, uncond = torch.full((1, 512, 4), 0.01), torch.full((1, 512, 4), 0.002)
    v = cfg_velocity(model, cond, uncond, 4.0)(x, sigma)
    den_c, den_u = x - sigma * model(x, sigma, cond), x - sigma * model(x, sigma, uncond)
    den = den_u + 4.0 * (den_c - den_u)
    torch.testing.assert_close(x - sigma * v, den)
    torch.testing.assert_close(cfg_velocity(model, cond, uncond, 1.0)(x, sigma), model(x, sigma, cond))


def test_noise_is_seeded_on_cpu():
    assert torch.equal(initial_noise((1, 16, 1, 4, 4), 5), initial_noise((1, 16, 1, 4, 4), 5))
    assert not torch.equal(initial_noise((1, 16, 1, 4, 4), 5), initial_noise((1, 16, 1, 4, 4), 6))


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("models"))


def _sample(models, out, *extra):
    return main(["sample", "--dit", str(models["dit"]), "--qwen3", str(models["qwen3"]), "--vae", str(models["vae"]),
                 "--qwen3_tokenizer_path", str(models["tokenizers"]), "--prompt", "1girl, (smile:1.2)",
                 "--negative_prompt", "worst quality", "--steps", "3", "--cfg", "3.5", "--width", "64",
                 "--height", "48", "--seed", "11", "--no_progress", "--out", str(out), *extra])


@pytest.mark.parametrize("flags", [("--qwen3_tokenizer_path", "--t5_tokenizer_path"),
                                   ("--qwen3_tokenizer", "--t5_tokenizer")])
def test_sample_tokenizer_flags_take_the_config_names_and_the_old_ones(flags):
    """The tokenizer folders are spelled as in the config (qwen3_tokenizer_path / t5_tokenizer_path); the flags'
    names before issue 16 stay accepted and land in the same place."""
    args = _build_parser().parse_args(["sample", "--dit", "d", "--qwen3", "q", "--vae", "v", "--prompt", "x",
                                       "--out", "o.png", flags[0], "tok/qwen", flags[1], "tok/t5"])
    assert (args.qwen3_tokenizer_path, args.t5_tokenizer_path) == ("tok/qwen", "tok/t5")


def test_sample_command_writes_reproducible_png_with_parameters(demo_models, tmp_path):
    assert _sample(demo_models, tmp_path / "a.png") == 0
    assert _sample(demo_models, tmp_path / "b.png") == 0
    params = read_png_parameters(tmp_path / "a.png")
    assert params == {"prompt": "1girl, (smile:1.2)", "negative_prompt": "worst quality", "steps": 3, "cfg": 3.5,
                      "width": 64, "height": 48, "seed": 11, "shift": 3.0, "sampler": "euler", "scheduler": "simple",
                      "models": {"dit": demo_models["dit"].name, "qwen3": demo_models["qwen3"].name,
                                 "vae": demo_models["vae"].name}, "networks": {}}
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == (64, 48) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()  # same seed, same image
    assert _sample(demo_models, tmp_path / "c.png", "--seed", "12") == 0
    assert Image.open(tmp_path / "c.png").tobytes() != a.tobytes()


def test_sample_refuses_to_overwrite_and_bad_sizes(demo_models, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"user's file")
    assert _sample(demo_models, out) == 2
    assert out.read_bytes() == b"user's file"
    assert "already exists" in capsys.readouterr().err
    assert _sample(demo_models, out, "--overwrite") == 0 and out.read_bytes() != b"user's file"
    assert _sample(demo_models, tmp_path / "x.png", "--width", "60") == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_sample_with_network_files(demo_models, tmp_path, capsys):
    """--network applies a LoRA with ComfyUI's rules; strength 0 is the base model, and it is recorded."""
    from anima_trainer.models import load_dit
    from anima_trainer.networks import create_network

    dit = load_dit(demo_models["dit"], dtype=torch.float32)
    net = create_network(dit, algo="lora", dim=4, alpha=4.0)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.normal_(0, 0.2)
    lora = tmp_path / "style.safetensors"
    net.save(lora)
    assert _sample(demo_models, tmp_path / "base.png") == 0
    assert _sample(demo_models, tmp_path / "zero.png", "--network", str(lora), "--network_mul", "0") == 0
    assert _sample(demo_models, tmp_path / "full.png", "--network", str(lora)) == 0
    base, zero, full = (Image.open(tmp_path / f).tobytes() for f in ("base.png", "zero.png", "full.png"))
    assert zero == base and full != base
    assert read_png_parameters(tmp_path / "full.png")["networks"] == {"style.safetensors": 1.0}
    assert _sample(demo_models, tmp_path / "bad.png", "--network", str(demo_models["vae"])) == 2
    assert "--network expects a LoRA/LoKr/LoHa network file" in capsys.readouterr().err
    assert _sample(demo_models, tmp_path / "bad.png", "--network_mul", "0.5") == 2
    assert "more --network_mul values" in capsys.readouterr().err


def test_sample_wrong_model_file_is_one_line_error(demo_models, tmp_path, capsys):
    code = main(["sample", "--dit", str(demo_models["vae"]), "--qwen3", str(demo_models["qwen3"]),
                 "--vae", str(demo_models["vae"]), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--pretrained_model_name_or_path expects" in err and "VAE" in err
    assert not (tmp_path / "o.png").exists()


def test_inspect_prints_every_fixture_file(fixture_dir, tiny_dit_path, capsys):
    files = sorted(p for p in (fixture_dir / "lora_examples").glob("*.safetensors")
                   if not p.name.endswith("comfy_out.safetensors"))
    assert main(["inspect", "--json", str(tiny_dit_path), *map(str, files)]) == 0
    out = capsys.readouterr().out
    docs = json.loads("[" + out.replace("}\n{", "},\n{") + "]")
    assert docs[0]["kind"] == "anima_dit" and docs[0]["dit_config"]["num_blocks"] == 10
    assert docs[0]["parameters"] == 157_439_360 and docs[0]["dtypes"] == {"F32": 325}
    assert [d["kind"] for d in docs[1:]] == ["network"] * len(files)


def test_demo_command(tmp_path, capsys):
    """The README's demo: tiny models + synthetic shapes → LoRA file + samples before and after training + the
    evaluation of its checkpoints (report.html)."""
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "10"]) == 0
    printed = capsys.readouterr().out
    lora = tmp_path / "d" / "output" / "demo_lora.safetensors"
    assert str(lora) in printed and lora.exists()
    before, after = tmp_path / "d" / "sample_before.png", tmp_path / "d" / "sample_after.png"
    assert Image.open(before).size == (64, 64) and Image.open(after).size == (64, 64)
    assert Image.open(before).tobytes() != Image.open(after).tobytes()  # the LoRA changed the model
    assert read_png_parameters(after)["networks"] == {"demo_lora.safetensors": 1.0}
    assert (tmp_path / "d" / "train.toml").exists() and (tmp_path / "d" / "dataset.toml").exists()
    # it ends by evaluating every checkpoint it saved (every 2 of its 10 steps) into report.html
    report = tmp_path / "d" / "output" / "eval" / "report.html"
    assert f"report: {report}" in printed and "recommendation:\n  Recommended: demo_lora" in printed
    results = EvalResults.load(report.parent)
    assert [c.step for c in results.checkpoints] == [2, 4, 6, 8, 10]
    assert results.base_heldout is not None and results.settings["probe"]["trigger"] == "shapez"
    assert all(c.at_strength(1.0).trigger_response.overall > 0 for c in results.checkpoints)
    assert results.grids and all((report.parent / g.path).is_file() for g in results.grids)
    assert main(["demo", "--out", str(tmp_path / "d")]) == 2  # never overwrites unasked
    assert "already exists" in capsys.readouterr().err


def test_sample_with_fixture_models_and_real_tokenizers(tiny_dit_path, qwen3_path, vae_path, tokenizers_dir,
                                                         tmp_path):
    """The full-format path: `net.` DiT, ComfyUI Qwen3-0.6B (`model.*`, BF16), ComfyUI VAE, real vocabularies."""
    out = tmp_path / "real.png"
    code = main(["sample", "--pretrained_model_name_or_path", str(tiny_dit_path), "--qwen3", str(qwen3_path),
                 "--vae", str(vae_path), "--qwen3_tokenizer_path", str(tokenizers_dir / "qwen"),
                 "--t5_tokenizer_path", str(tokenizers_dir / "t5"), "--prompt", "1girl, solo", "--steps", "2",
                 "--width", "32", "--height", "32", "--no_progress", "--out", str(out)])
    assert code == 0 and Image.open(out).size == (32, 32)
    assert read_png_parameters(out)["models"]["qwen3"] == qwen3_path.name
