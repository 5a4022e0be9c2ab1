"""Speed and memory options of `TrainConfig`: gradient checkpointing and its levers, block swap, fp8 storage
(models/block_runner.py, models/fp8.py) and the speed levers (attention kernel, fused q/k/v, per-block compile;
fp8 compute, models/fp8_compute.py, whose error is measured, not zero); each gives the same result within a
stated tolerance (docs/performance.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from anima_trainer.config.rules import check_backend_name, check_compile_mode


_BOOL_WORDS = ("0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes")  # what pydantic reads as bool


class SpeedMemorySettings(BaseModel):
    """Fields, checks and the keyword arguments of the memory levers (a mixin of TrainConfig).
    max_data_loader_n_workers is declared among them only to keep the order of `--help` (it belongs to "data and
    caching", config/sections.py)."""

    gradient_checkpointing: bool = Field(False, description="recompute each DiT block in backward: much less "
        "activation memory, slower")
    # memory levers (models/block_runner.py, models/fp8.py, docs/performance.md); all give the same gradients as without
    checkpoint_blocks: int | None = Field(None, ge=0, description="with gradient_checkpointing: checkpoint only the "
                                          "first N DiT blocks (default: all); the rest keep activations (faster)")
    checkpoint_mode: Literal["full", "selective"] = Field(
        "full", description="full: recompute whole blocks; selective: keep matmul/attention outputs, recompute the "
                            "cheap ops (norms, modulation, GELU, RoPE)")
    cpu_offload_checkpointing: bool = Field(False, description="the residual each checkpointed block keeps goes to "
                                                               "pinned CPU memory (needs gradient_checkpointing)")
    blocks_to_swap: int = Field(0, ge=0, description="keep the weights of the last N DiT blocks in CPU memory, "
                                                     "streamed to the GPU when used (0 = off)")
    fp8_base: bool = Field(False, description="store the DiT blocks' attention/MLP weights in fp8 with a per-tensor "
                                             "scale (half their memory)")
    fp8_format: Literal["e4m3fn", "e5m2"] = Field("e4m3fn", description="fp8 storage format of fp8_base")
    fp8_compute: bool = Field(False, description="run the forward GEMMs of the DiT blocks' attention/MLP Linears in "
        "fp8 (e4m3fn, torch._scaled_mm; CUDA sm89+): inputs quantised per token, weights stored in fp8 (fp8_base's "
        "when on); LoRA branch and backward stay bf16. Off by default: it becomes the default only if a GPU "
        "measurement shows it faster with its error within the bf16-vs-fp32 error (docs/performance.md)")
    max_data_loader_n_workers: int = Field(8, ge=0, description="image-decoding worker processes (0 = in the training "
        "process)")
    # speed levers (docs/performance.md); each is exact within a stated tolerance
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = Field(
        "auto", description="SDPA kernel of the DiT attention; auto = fastest measured at start-up on CUDA >= 8.0")
    fuse_qkv: bool = Field(True, description="one GEMM for self-attention q/k/v (weights packed, keys unchanged)")
    compile_blocks: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each DiT block, static shapes (alias compile); auto = on for CUDA >= 8.0 "
                            "with triton where measured (not with selective checkpointing, block swap or fp8_base), "
                            "else eager")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode of the blocks (CUDA-graph modes are not supported)")
    compile_backend: Literal["inductor", "aot_eager", "eager"] = Field(
        "inductor", description="torch.compile backend (aot_eager/eager: debugging)")
    compile_fullgraph: bool = Field(False, description="fail on a graph break inside a block instead of splitting")
    compile_cache_size_limit: int | None = Field(
        None, ge=1, description="dynamo cache entries per block (default: from the bucket count)")
    compile_cache_dir: str = Field(
        "auto", description="persistent torch.compile cache (inductor FX graph + AOTAutograd caches), so later runs "
                            "start fast; auto = <user cache>/anima-trainer/torch-compile, \"\" = torch's own "
                            "settings; TORCHINDUCTOR_CACHE_DIR wins")
    ddp_bucket_cap_mb: float = Field(25.0, ge=0, description="data parallel: all-reduce the gradients in buckets "
        "of about this many MB, started during the backward of each step's last micro-batch (0 = one flat "
        "all-reduce after the backward; the same result either way)")

    @field_validator("attention_backend", mode="before")
    @classmethod
    def _attention_backend(cls, v: Any) -> Any:
        return check_backend_name(v) if isinstance(v, str) else v  # says why xformers is not one

    @field_validator("compile_blocks", mode="before")
    @classmethod
    def _compile_blocks(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, str) and v.lower() not in _BOOL_WORDS:  # pydantic would only say "true or false"
            raise ValueError(f"expected true, false or 'auto', got {v!r}")
        return v

    @field_validator("compile_mode", mode="before")
    @classmethod
    def _compile_mode(cls, v: Any) -> Any:
        return check_compile_mode(v) if isinstance(v, str) else v  # explains the CUDA-graph modes

    def _check_memory_options(self) -> None:
        """Options that only act together with another one; fp8 storage/compute and DoRA (models/fp8.py,
        models/fp8_compute.py)."""
        if not self.gradient_checkpointing:
            needs = ["cpu_offload_checkpointing"] if self.cpu_offload_checkpointing else []
            needs += ["checkpoint_blocks"] if self.checkpoint_blocks is not None else []
            needs += ["checkpoint_mode"] if self.checkpoint_mode != "full" else []
            if needs:
                raise ValueError(f"{', '.join(needs)}: needs gradient_checkpointing = true")
        if self.checkpoint_mode == "selective" and self.compile_blocks is True:  # "auto" resolves to eager then
            # measured on an H200 (torch 2.11): torch raises "Tensor cached during selective activation checkpoint
            # has been mutated" in the first backward of a compiled block
            raise ValueError("checkpoint_mode: 'selective' does not work with compile_blocks (torch fails in the "
                             "backward); use checkpoint_mode = \"full\" with compile_blocks (faster anyway: "
                             "bench/README.md), or turn compile_blocks off")
        dora = str(self.network_args.get("dora_wd", "false")).strip().lower() in ("true", "1", "yes", "on")
        for fp8 in ("fp8_base", "fp8_compute"):
            if getattr(self, fp8) and dora:
                raise ValueError(f"{fp8}: DoRA (network_args dora_wd) needs the full-precision base weights; turn "
                                 "one of them off")
        if self.fp8_compute and self.fp8_base and self.fp8_format != "e4m3fn":
            raise ValueError(f"fp8_compute: its GEMM takes e4m3fn weights, and fp8_base stores fp8_format = "
                             f"\"{self.fp8_format}\"; set fp8_format = \"e4m3fn\" (or turn fp8_compute off)")

    def memory_options(self) -> dict[str, Any]:
        """Keyword arguments of models.block_runner.setup_memory / train.memory_estimate.estimate_training_memory."""
        return {"gradient_checkpointing": self.gradient_checkpointing, "checkpoint_blocks": self.checkpoint_blocks,
                "checkpoint_mode": self.checkpoint_mode,
                "cpu_offload_checkpointing": self.cpu_offload_checkpointing, "blocks_to_swap": self.blocks_to_swap,
                "fp8_base": self.fp8_base, "fp8_format": self.fp8_format}

    @property
    def fp8_base_unet(self) -> bool:
        """kohya's fp8_base_unet as the file metadata records it (ss_fp8_base_unet): fp8 for the DiT alone, the text
        encoder in the mixed precision, which is what fp8_base does here.  The option itself is a switch of the
        alias table (kohya_options.SWITCHES) that turns fp8_base on."""
        return self.fp8_base
