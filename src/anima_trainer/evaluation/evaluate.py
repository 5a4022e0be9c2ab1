"""`anima-trainer eval` without the command line: measure saved networks against their frozen base and write the
numbers to `<out>/results.json` (`EvalResults`).

    spec = EvalSpec(inputs=[run_output_dir])        # what the user asked for (None / defaults: see the fields)
    plan = plan_evaluation(spec)                     # every default resolved: plan.spec is fully explicit
    results = evaluate(plan.spec, plan=plan)         # base models loaded once, each network in turn
    write_outputs(results, plan.spec.out)

The base models are loaded once.  The probe (its prompts without / with the trigger, seeds, σ) is encoded once
by the base text encoder; the held-out batches are encoded once by the VAE.  Then the base's held-out loss
(strength 0), and for each checkpoint in training order: inject it, its held-out loss at strength 1 and the
light metrics (probe.measure_at_strength: drift, response, leak) at each strength (at strength 0 their exact
values without the forwards: `at_zero_strength`), its weight analysis, its image-grid cells (grids.render_cells),
then `after_checkpoint` (extra work by the caller), and remove it.  At the end the grids are assembled and
`write_outputs` writes results.json and report.html.  The numbers are those of evaluation/heldout.py and
evaluation/probe.py, the functions training's validation and in-training evaluation call, and the probe's prompts
and trigger follow the run's rules (`eval_prompts` else the built-in bank; `eval_trigger` else
`metadata_trigger_phrase`): the same weights, settings and device give the numbers the run logged.

Two prompt lists, for two purposes:
  * the probe (drift, response, leak): `--prompts FILE`, else the run's `eval_prompts`, else the built-in bank
    (`prompt_bank.probe_bank`) — never the sample prompts, which mention the trigger;
  * the grids: the run's sample prompts (what the user wanted to see), then the probe prompts — each with the
    trigger put in and as written, side by side, when there is a trigger — the first `grid_prompts` of them.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from anima_trainer.config import ConfigError, TrainConfig
from anima_trainer.dtypes import PRECISION_DTYPES
from anima_trainer.evaluation.checkpoints import Checkpoint, find_checkpoints, network_metadata
from anima_trainer.evaluation.drift import PROBE_LATENT_SIZE, leak_score
from anima_trainer.evaluation.eval_results import RESULTS_NAME, CheckpointResult, EvalResults
from anima_trainer.evaluation.heldout import heldout_batches, heldout_loss
from anima_trainer.evaluation.probe import PROBE_SEEDS, ProbeSet, StrengthMetrics, measure_at_strength
from anima_trainer.evaluation.grids import CELLS_FOLDER, GRIDS_FOLDER, assemble_grids, render_cells
from anima_trainer.evaluation.prompt_bank import BankPrompt, grid_bank, probe_bank
from anima_trainer.evaluation.recommend import DEFAULT_DRIFT_THRESHOLD
from anima_trainer.evaluation.report import REPORT_NAME, write_report
from anima_trainer.evaluation.results import SigmaMetric
from anima_trainer.evaluation.run_folder import (
    Heldout,
    find_run_config,
    folder_heldout,
    load_run_config,
    run_heldout,
)
from anima_trainer.fileio import check_writable
from anima_trainer.models.base_models import load_base_models
from anima_trainer.models.attention_backend import configure_attention
from anima_trainer.models.block_runner import setup_memory
from anima_trainer.models.layers import set_fused_qkv
from anima_trainer.models.safetensors_file import read_header
from anima_trainer.networks import NetworkError, create_network_from_weights
from anima_trainer.networks.analysis import analyse_network
from anima_trainer.networks.formats import is_text_encoder_key
from anima_trainer.sample.generate import encode_prompts

DEFAULT_STRENGTHS: tuple[float, ...] = (0.0, 0.5, 0.8, 1.0)
# the files and folders an evaluation writes into its folder (checked before any work: never replaced without
# --overwrite)
OUTPUT_FILES: tuple[str, ...] = (RESULTS_NAME, REPORT_NAME, GRIDS_FOLDER, CELLS_FOLDER)
DEFAULT_GRID_PROMPTS = 8  # rows of the prompts grid: enough to see the concept and its leaks, cheap to draw
TRIGGER_KEY = "modelspec.trigger_phrase"


@dataclass
class EvalSpec:
    """What to evaluate and how.  None means "the default", which `plan_evaluation` fills in: models, sample
    prompts and held-out split from the run's settings (`run_config`, found in a run folder), the trigger from
    the networks' `modelspec.trigger_phrase`, `out` = `<run folder>/eval` (else `eval` next to the first file),
    device cuda when available, dtype bf16 on GPU / fp32 on CPU."""

    inputs: list[Path]                       # network files and run output folders
    out: Path | None = None
    dit: Path | None = None
    qwen3: Path | None = None
    vae: Path | None = None
    llm_adapter_path: Path | None = None
    qwen3_tokenizer_path: Path | None = None
    t5_tokenizer_path: Path | None = None
    run_config: Path | None = None           # a train_config.toml or a run's .events.jsonl
    sample_prompts: Path | None = None       # grids first; kohya prompt file; default the run's sample_prompts
    prompt_file: Path | None = None          # probe prompts (kohya syntax); default the run's eval_prompts / bank
    trigger: str | None = None
    use_trigger: bool = True                 # False: no trigger (drift only), whatever the metadata says
    seeds: tuple[int, ...] = PROBE_SEEDS
    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    probe_resolution: int = PROBE_LATENT_SIZE[0] * 8  # probe images: square, in pixels (latents: / 8)
    probe_batch_size: int = 8
    heldout_images: Path | None = None       # a folder of images + caption files instead of the run's split
    use_heldout: bool = True                 # False: no held-out loss
    heldout_resolution: int = 1024           # --heldout_images: bucket resolution, batch size, captions, seed, loss
    heldout_batch_size: int = 1
    caption_extension: str = ".txt"
    heldout_seed: int = 0
    loss_type: str = "l2"
    huber_c: float = 0.1
    device: str | None = None
    dtype: str | None = None                 # "bf16" | "fp16" | "fp32"
    analysis: bool = True
    grid_prompts: int = DEFAULT_GRID_PROMPTS  # 0: no grids
    grid_size: int | None = None             # every grid image this many pixels square (default: the prompt's)
    grid_steps: int | None = None            # sampler steps of every grid image (default: the prompt's)
    drift_threshold: float = DEFAULT_DRIFT_THRESHOLD  # the report's recommended strength range
    overwrite: bool = False
    command: str = ""                        # the command line that reproduces the evaluation (results.command)


@dataclass
class EvalPlan:
    """A spec with every default resolved (`spec`), the checkpoints in training order, the run's settings when
    known, the held-out images, and notes on every choice made for the user (printed and kept in results)."""

    spec: EvalSpec
    checkpoints: list[Checkpoint]
    run_cfg: TrainConfig | None = None
    heldout: Heldout | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class EvalModels:
    """The base models, loaded once for the whole evaluation."""

    dit: torch.nn.Module
    text_encoder: Any
    vae: Any
    device: torch.device
    dtype: torch.dtype

    def context(self, texts: list[str]) -> torch.Tensor:
        """Prompts → DiT context through the (possibly adapted) text encoder, as sampling encodes them."""
        with torch.no_grad():
            return encode_prompts(self.dit, self.text_encoder, list(texts))


@dataclass
class CheckpointContext:
    """What `after_checkpoint` gets, while the checkpoint's network is injected (at multiplier 1)."""

    models: EvalModels
    network: Any
    checkpoint: Checkpoint
    result: CheckpointResult
    probe: ProbeSet
    plan: EvalPlan


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).expanduser().resolve()


def _agreed_trigger(checkpoints: Sequence[Checkpoint]) -> tuple[str | None, str]:
    """The networks' common `modelspec.trigger_phrase`, and a note on how it was chosen."""
    phrases = {(network_metadata(c.path) or {}).get(TRIGGER_KEY, "").strip() for c in checkpoints}
    phrases.discard("")
    if len(phrases) == 1:
        phrase = phrases.pop()
        return phrase, f"trigger {phrase!r} from the networks' {TRIGGER_KEY}"
    if phrases:
        return None, (f"the networks disagree on {TRIGGER_KEY} ({', '.join(sorted(map(repr, phrases)))}): no "
                      "trigger, so only preservation drift is measured (--trigger WORD measures the response)")
    return None, (f"no trigger (--trigger not given, no {TRIGGER_KEY} in the networks): only preservation drift "
                  "is measured; trigger response and leak score need --trigger WORD")


def _models_from_run(spec: EvalSpec, cfg: TrainConfig | None) -> EvalSpec:
    names = ("dit", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path", "t5_tokenizer_path")
    fields = ("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
              "t5_tokenizer_path")
    values = {}
    for name, cfg_field in zip(names, fields, strict=True):
        value = getattr(spec, name)
        if value is None and cfg is not None:
            value = getattr(cfg, cfg_field)
        values[name] = _absolute(value)
    missing = [f"--{n}" for n in ("dit", "qwen3", "vae") if values[n] is None]
    if missing:
        raise ConfigError(f"eval needs the base model files: {', '.join(missing)} (or a run output folder / "
                          "--run_config whose settings name them)")
    return replace(spec, **values)


def command_line(spec: EvalSpec) -> str:
    """`anima-trainer eval ...` for a planned spec: absolute paths, every choice that moves a number explicit."""
    words = ["anima-trainer", "eval", *map(str, spec.inputs), "--out", str(spec.out)]
    for flag, value in (("--dit", spec.dit), ("--qwen3", spec.qwen3), ("--vae", spec.vae),
                        ("--llm_adapter_path", spec.llm_adapter_path),
                        ("--qwen3_tokenizer_path", spec.qwen3_tokenizer_path),
                        ("--t5_tokenizer_path", spec.t5_tokenizer_path), ("--run_config", spec.run_config),
                        ("--sample_prompts", spec.sample_prompts), ("--prompts", spec.prompt_file)):
        if value is not None:
            words += [flag, str(value)]
    words += ["--trigger", spec.trigger] if spec.trigger else ["--no_trigger"]
    words += ["--seeds", *map(str, spec.seeds), "--strengths", *(f"{s:g}" for s in spec.strengths),
              "--probe_resolution", str(spec.probe_resolution), "--probe_batch_size", str(spec.probe_batch_size)]
    if spec.heldout_images is not None:
        words += ["--heldout_images", str(spec.heldout_images), "--heldout_resolution", str(spec.heldout_resolution),
                  "--heldout_batch_size", str(spec.heldout_batch_size), "--caption_extension", spec.caption_extension,
                  "--heldout_seed", str(spec.heldout_seed), "--loss_type", spec.loss_type,
                  "--huber_c", f"{spec.huber_c:g}"]
    elif not spec.use_heldout:
        words.append("--no_heldout")
    if not spec.analysis:
        words.append("--no_analysis")
    words += ["--grid_prompts", str(spec.grid_prompts)]
    if spec.grid_prompts:
        words += [*(["--grid_size", str(spec.grid_size)] if spec.grid_size else []),
                  *(["--grid_steps", str(spec.grid_steps)] if spec.grid_steps else [])]
    words += ["--drift_threshold", f"{spec.drift_threshold:g}"]
    words += ["--device", spec.device, "--dtype", spec.dtype]
    return shlex.join(words)


def plan_evaluation(spec: EvalSpec, *,
                    complete_config: Callable[[TrainConfig], TrainConfig] | None = None) -> EvalPlan:
    """Resolve every default of `spec` (class doc) and check what can be checked before loading a model: the
    inputs, the run's settings, the prompt files, the held-out images and that the results are not there yet.
    `complete_config(cfg)` may fill in what a run resolved at start-up (the CLI: its tokenizer folders).
    `plan.spec.command` is the reproducing command line (`command_line`) unless the spec brings one."""
    if not spec.strengths:
        raise ConfigError("--strengths: give at least one strength")
    if not spec.seeds:
        raise ConfigError("--seeds: give at least one seed")
    if spec.probe_resolution < 16 or spec.probe_resolution % 16:
        raise ConfigError(f"--probe_resolution: a multiple of 16 pixels, got {spec.probe_resolution}")
    if spec.probe_batch_size < 1:
        raise ConfigError(f"--probe_batch_size: at least 1, got {spec.probe_batch_size}")
    if spec.grid_prompts < 0:
        raise ConfigError(f"--grid_prompts: 0 (no grids) or more, got {spec.grid_prompts}")
    if spec.grid_size is not None and (spec.grid_size < 64 or spec.grid_size % 16):
        raise ConfigError(f"--grid_size: a multiple of 16 pixels, at least 64, got {spec.grid_size}")
    if spec.grid_steps is not None and spec.grid_steps < 1:
        raise ConfigError(f"--grid_steps: at least 1, got {spec.grid_steps}")
    if not spec.drift_threshold > 0:
        raise ConfigError(f"--drift_threshold: a number above 0, got {spec.drift_threshold}")
    search = find_checkpoints(spec.inputs)
    notes = list(search.notes)
    run_config = _absolute(spec.run_config)
    if run_config is None and len(search.run_folders) == 1:
        run_config = find_run_config(search.run_folders[0], search.event_logs[0] if search.event_logs else None)
        if run_config is None:
            notes.append(f"{search.run_folders[0]}: no train_config.toml or event log: the run's settings (models, "
                         "sample prompts, validation split) are unknown")
    cfg = load_run_config(run_config) if run_config is not None else None
    if cfg is not None and complete_config is not None:
        cfg = complete_config(cfg)
    spec = _models_from_run(replace(spec, run_config=run_config), cfg)

    sample_prompts = _absolute(spec.sample_prompts)
    if sample_prompts is None and cfg is not None and cfg.sample_prompts is not None:
        if Path(cfg.sample_prompts).is_file():
            sample_prompts = _absolute(cfg.sample_prompts)
        else:
            notes.append(f"the run's sample_prompts {cfg.sample_prompts} is gone: not used")
    prompt_file = _absolute(spec.prompt_file)
    if prompt_file is None and cfg is not None and cfg.eval_prompts is not None:
        if Path(cfg.eval_prompts).is_file():
            prompt_file = _absolute(cfg.eval_prompts)
            notes.append(f"probe prompts: the run's eval_prompts {prompt_file}")
        else:
            notes.append(f"the run's eval_prompts {cfg.eval_prompts} is gone: the built-in bank is the probe")
    trigger, use_trigger = (spec.trigger.strip() if spec.trigger else None), spec.use_trigger
    if not use_trigger:
        trigger = None
        notes.append("--no_trigger: only preservation drift is measured")
    elif trigger is None and cfg is not None and cfg.resolved_eval_trigger() is not None:
        trigger = cfg.resolved_eval_trigger()
        notes.append(f"trigger {trigger!r} from the run's eval_trigger / metadata_trigger_phrase")
    elif trigger is None:
        trigger, note = _agreed_trigger(search.checkpoints)
        notes.append(note)
        use_trigger = trigger is not None
    else:
        notes.append(f"trigger {trigger!r} (--trigger)")

    heldout, heldout_images, use_heldout = None, _absolute(spec.heldout_images), spec.use_heldout
    if use_heldout and heldout_images is not None:
        heldout = folder_heldout(heldout_images, resolution=spec.heldout_resolution,
                                 batch_size=spec.heldout_batch_size, caption_extension=spec.caption_extension,
                                 seed=spec.heldout_seed, loss_type=spec.loss_type, huber_c=spec.huber_c)
    elif use_heldout and cfg is not None:
        heldout = run_heldout(cfg, str(run_config))
        if heldout is None:
            notes.append("the run holds no images out (no validation_split): no held-out loss "
                         "(--heldout_images FOLDER measures one)")
    if heldout is None:
        if use_heldout and cfg is None:
            notes.append("no held-out images (no run settings, no --heldout_images FOLDER): no held-out loss")
        use_heldout, heldout_images = False, None

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = spec.dtype or ("fp32" if torch.device(device).type == "cpu" else "bf16")
    out = _absolute(spec.out)
    if out is None:
        out = (search.run_folders[0] if len(search.run_folders) == 1 else search.checkpoints[0].path.parent) / "eval"
    for name in OUTPUT_FILES:  # before minutes of loading, not after
        check_writable(out / name, spec.overwrite)
    spec = replace(spec, inputs=[_absolute(p) for p in spec.inputs], out=out, sample_prompts=sample_prompts,
                   prompt_file=prompt_file, trigger=trigger, use_trigger=use_trigger,
                   heldout_images=heldout_images, use_heldout=use_heldout, device=device, dtype=dtype,
                   seeds=tuple(int(s) for s in spec.seeds), strengths=tuple(float(s) for s in spec.strengths))
    grid_prompts(spec)  # a bad prompt file fails here, before the models load
    if not spec.command:
        spec.command = command_line(spec)
    return EvalPlan(spec, search.checkpoints, cfg, heldout, notes)


def grid_prompts(spec: EvalSpec) -> list[BankPrompt]:
    """The grids' prompts (`prompt_bank.grid_bank`: the sample prompts, then the probe prompts with the trigger
    and as written), the first `spec.grid_prompts`, with `grid_size` / `grid_steps` applied.  Also reads (and so
    checks) both prompt files."""
    entries = grid_bank(spec.sample_prompts, probe_bank(spec.prompt_file), spec.trigger)
    picked = []
    for entry in entries[:spec.grid_prompts]:
        sample = entry.sample
        if spec.grid_size:
            sample = replace(sample, width=spec.grid_size, height=spec.grid_size)
        if spec.grid_steps:
            sample = replace(sample, steps=spec.grid_steps)
        picked.append(BankPrompt(sample, entry.source))
    return picked


def load_models(spec: EvalSpec, run_cfg: TrainConfig | None = None) -> EvalModels:
    """The base DiT, text encoder and VAE of a planned spec, on its device in its dtype, in eval mode.

    With the run's settings (`run_cfg`) the DiT gets the speed and memory levers the run trained with, in
    training's order (train/model_setup.py `prepare_dit`): fused q/k/v, fp8 storage and block swap (what lets an
    8 GB card hold it), the attention kernel; and the VAE its 2-D / chunked decoding.  Left out: gradient
    checkpointing (nothing runs backward) and torch.compile (every checkpoint's injection would recompile)."""
    device, dtype = torch.device(spec.device), PRECISION_DTYPES[spec.dtype]
    layout = {} if run_cfg is None else {"blocks_to_swap": run_cfg.blocks_to_swap,
                                         "vae_2d": run_cfg.qwen_image_vae_2d, "vae_chunk_rows": run_cfg.vae_chunk_size}
    base = load_base_models(spec.dit, spec.qwen3, spec.vae, device=device, dtype=dtype,
                            llm_adapter_path=spec.llm_adapter_path, qwen3_tokenizer_path=spec.qwen3_tokenizer_path,
                            t5_tokenizer_path=spec.t5_tokenizer_path, **layout)
    dit, te, vae = base.dit, base.text_encoder, base.vae
    if run_cfg is not None:
        set_fused_qkv(dit, run_cfg.fuse_qkv)
        memory = {**run_cfg.memory_options(), "gradient_checkpointing": False, "checkpoint_blocks": None,
                  "cpu_offload_checkpointing": False}
        setup_memory(dit, device=device, **memory)
        side = spec.probe_resolution // 16  # image tokens per side of the probe (VAE / 8, patch / 2)
        configure_attention(dit, run_cfg.attention_backend, device, dtype, tokens=side * side,
                            batch=spec.probe_batch_size)
    dit.eval()
    return EvalModels(dit, te, vae, device, dtype)


def _inject(models: EvalModels, path: Path):
    """The network of `path` injected into the base DiT (and the text encoder when the file has modules there)."""
    keys = read_header(path)[0]
    text_encoder = models.text_encoder.model if any(is_text_encoder_key(k) for k in keys) else None
    try:
        return create_network_from_weights(models.dit, path, text_encoder=text_encoder)
    except NetworkError as e:
        raise NetworkError(f"{e} (is it a network for this base model?)") from None


def at_zero_strength(probe: ProbeSet) -> StrengthMetrics:
    """What `measure_at_strength` gives at strength 0, without the forwards: at multiplier 0 every adapter module
    returns its frozen layer's output unchanged, so the adapted velocity is the base's bit for bit — drift and
    response exactly 0, the leak score 0/0 = undefined (NaN; null in results.json).  tests/evaluation check the
    equality against the measurement."""
    samples = len(probe.texts_without) * len(probe.seeds)
    zeros = tuple(0.0 for _ in probe.sigmas)
    drift = SigmaMetric("preservation_drift", probe.sigmas, zeros, 0.0, samples, 0.0)
    if not probe.has_trigger:
        return StrengthMetrics(0.0, drift)
    response = SigmaMetric("trigger_response", probe.sigmas, zeros, 0.0, samples, 0.0)
    return StrengthMetrics(0.0, drift, response, leak_score(drift, response))


def _settings(plan: EvalPlan, probe: ProbeSet, bank: list) -> dict[str, Any]:
    spec = plan.spec
    text = (lambda p: None if p is None else str(p))  # noqa: E731
    return {"models": {name: text(getattr(spec, name)) for name in
                       ("dit", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path", "t5_tokenizer_path")},
            "device": spec.device, "dtype": spec.dtype, "run_config": text(spec.run_config),
            "run_speed_settings": None if plan.run_cfg is None else {key: getattr(plan.run_cfg, key) for key in (
                "fuse_qkv", "fp8_base", "fp8_format", "blocks_to_swap", "attention_backend", "qwen_image_vae_2d",
                "vae_chunk_size")},
            "strengths": list(spec.strengths), "probe": probe.settings(),
            "prompt_sources": {"sample_prompts": text(spec.sample_prompts), "prompt_file": text(spec.prompt_file),
                               "builtin": spec.prompt_file is None},
            "grid_prompts": [{"text": b.text, "source": b.source} for b in bank],
            "drift_threshold": spec.drift_threshold,
            "heldout": None if plan.heldout is None else plan.heldout.as_dict(), "notes": list(plan.notes)}


def evaluate(spec: EvalSpec, *, plan: EvalPlan | None = None, log: Callable[[str], None] | None = None,
             after_checkpoint: Callable[[CheckpointContext], None] | None = None) -> EvalResults:
    """Measure every checkpoint of `spec` (module doc); `plan` when already planned, `log(line)` for progress,
    `after_checkpoint(context)` for extra work per checkpoint while its network is injected."""
    plan = plan or plan_evaluation(spec)
    spec, say = plan.spec, log or (lambda line: None)
    say(f"loading the base models on {spec.device} ({spec.dtype})")
    models = load_models(spec, plan.run_cfg)
    bank = grid_prompts(spec)
    side = spec.probe_resolution // 8
    probe = ProbeSet.encode([b.text for b in probe_bank(spec.prompt_file)], models.context, trigger=spec.trigger,
                            seeds=spec.seeds, latent_size=(side, side), batch_size=spec.probe_batch_size)
    say(f"probe: {len(probe.texts_without)} prompt(s) without the trigger"
        + (f", the same {len(probe.texts_without)} with {probe.trigger!r}" if probe.has_trigger else "")
        + f", seeds {', '.join(map(str, probe.seeds))}")
    batches, base = [], None
    if plan.heldout is not None:
        hs = plan.heldout.settings
        batches = heldout_batches(plan.heldout.validation, models.vae.encode, device=models.device,
                                  max_batches=hs.max_batches)
        base = heldout_loss(models.dit, batches, models.context, models.device, sigmas=probe.sigmas, seed=hs.seed,
                            loss_type=hs.loss_type, huber_c=hs.huber_c)
        say(f"held-out: {sum(len(b.captions) for b in batches)} image(s) ({plan.heldout.source}); base loss "
            f"{base.overall:.6g}")
    results = []
    for i, checkpoint in enumerate(plan.checkpoints, 1):
        say(f"[{i}/{len(plan.checkpoints)}] {checkpoint.label}")
        network = _inject(models, checkpoint.path)
        try:
            result = CheckpointResult(checkpoint.label, str(checkpoint.path), checkpoint.step, checkpoint.epoch,
                                      checkpoint.ema)
            if batches:
                hs = plan.heldout.settings
                result.heldout_loss = heldout_loss(models.dit, batches, models.context, models.device,
                                                   sigmas=probe.sigmas, seed=hs.seed, loss_type=hs.loss_type,
                                                   huber_c=hs.huber_c, network=network, strength=1.0)
            result.strengths = [at_zero_strength(probe) if s == 0 else
                                measure_at_strength(models.dit, network, probe, s, device=models.device)
                                for s in spec.strengths]
            if spec.analysis:
                result.analysis = analyse_network(network).to_dict()
            if bank:
                render_cells(models.dit, models.text_encoder, models.vae, network, checkpoint.label,
                             checkpoint.path.name, bank, spec.strengths, spec.out / CELLS_FOLDER,
                             models=_model_names(spec))
            if after_checkpoint is not None:  # e.g. the image grids: the network is injected, at multiplier 1
                after_checkpoint(CheckpointContext(models, network, checkpoint, result, probe, plan))
        finally:
            network.remove()
        results.append(result)
    grids = []
    if bank and plan.checkpoints:
        say(f"grids: {len(bank)} prompt(s) × {len(spec.strengths)} strength(s)")
        grids = assemble_grids(spec.out, {c.label: c.path.name for c in plan.checkpoints}, bank, spec.strengths,
                               models=_model_names(spec))
    return EvalResults(spec.command, _settings(plan, probe, bank), results, base, grids,
                       created=datetime.now().astimezone().isoformat(timespec="seconds"))


def _model_names(spec: EvalSpec) -> dict[str, str]:
    """The base model files by part, as the grid PNGs record them (file names, like `anima-trainer sample`)."""
    return {name: Path(path).name for name, path in (("dit", spec.dit), ("qwen3", spec.qwen3), ("vae", spec.vae),
                                                      ("llm_adapter", spec.llm_adapter_path)) if path is not None}


def write_outputs(results: EvalResults, folder: str | Path, *,
                  drift_threshold: float = DEFAULT_DRIFT_THRESHOLD) -> tuple[Path, Path]:
    """Write the evaluation folder's results.json and, from the same results, report.html (after the grids,
    which the page shows).  Returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return results.save(folder), write_report(results, folder, drift_threshold=drift_threshold)
