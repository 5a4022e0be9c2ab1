"""VAE and whole-model compile options of `TrainConfig` (kohya's --qwen_image_vae_2d, --vae_chunk_size,
--vae_disable_cache, --masked_loss, --torch_compile/--dynamo_backend)."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, Field, model_validator


KOHYA_COMPILE_OFF_NOTICE = (
    "torch_compile/compile = false (kohya's default, which GUIs and kohya's --output_config write into every config) "
    "keeps compile_blocks = \"auto\": the DiT blocks are compiled on CUDA cards of compute capability 8.0+ with "
    "triton and run eager elsewhere; compile_blocks = false runs eager everywhere")


class VaeSettings(BaseModel):
    """Fields, the torch_compile mapping and the start-up notices of the VAE/compile options (a mixin of
    TrainConfig)."""

    qwen_image_vae_2d: bool = Field(True, description="encode/decode single images with the 2-D form of the "
                                    "Qwen-Image VAE (kohya's --qwen_image_vae_2d: the last temporal slice of each "
                                    "causal conv; equal to the 3-D model up to rounding, faster, less memory); on "
                                    "by default here, false = diffusers' 3-D model")
    vae_chunk_size: int | None = Field(None, ge=1, description="VAE convolutions computed this many rows at a "
                                       "time (kohya's --vae_chunk_size: less peak memory, same result; 2-D path)")
    vae_disable_cache: bool = Field(False, description="kohya's switch for the 3-D VAE's feature cache between "
                                    "video chunks; single images never use it, so it changes nothing (a notice)")
    masked_loss: bool = Field(False, description="kohya's --masked_loss: the loss is multiplied by a mask image "
                              "of each subset's conditioning_data_dir (same file stem, red channel, 0..255 -> "
                              "0..1, resized like the image), or by the alpha mask of alpha_mask subsets")
    torch_compile: bool = Field(False, description="kohya's legacy whole-model compile; here true turns on "
                                "compile_blocks (the same math, compiled per DiT block) with a notice; false (kohya's "
                                "default, written by GUIs) keeps compile_blocks = auto with a notice")
    dynamo_backend: str = Field("inductor", description="kohya's backend of torch_compile: inductor, aot_eager and "
                                "eager map onto compile_backend; others compile with inductor (a notice)")

    @model_validator(mode="after")
    def _compile_options_from_torch_compile(self) -> Self:
        """torch_compile/dynamo_backend -> compile_blocks/compile_backend (kohya's --compile is the same idea)."""
        backend = self.dynamo_backend.strip().lower()
        if self.torch_compile and backend != "no":
            self.compile_blocks = True
            if backend in ("inductor", "aot_eager", "eager"):
                self.compile_backend = backend
        return self

    @property
    def kohya_compile_off_kept_auto(self) -> bool:
        """kohya's `torch_compile = false` (or `compile = false` in a TOML, config/loader.py) was given, yet the
        blocks follow compile_blocks = "auto": kohya's default written out by GUIs and --output_config is not a
        request for eager here, compile_blocks = false is."""
        return "torch_compile" in self.model_fields_set and not self.torch_compile and self.compile_blocks == "auto"

    def vae_compile_notices(self) -> list[str]:
        """One start-up notice per kohya VAE/compile option that is accepted with a different effect."""
        notes = []
        if self.vae_disable_cache:
            notes.append("vae_disable_cache = true: the VAE's feature cache only carries frames between video "
                         "chunks and a single image never uses it (the 2-D path has none); latents are the same "
                         "either way; nothing to change")
        if self.vae_chunk_size and not self.qwen_image_vae_2d:
            notes.append(f"vae_chunk_size = {self.vae_chunk_size}: chunked convolutions run on the 2-D VAE path; "
                         "with qwen_image_vae_2d = false the 3-D model runs unchunked (same latents, more memory)")
        backend = self.dynamo_backend.strip().lower()
        if self.torch_compile:
            if backend == "no" and self.compile_blocks == "auto":
                notes.append("torch_compile = true with dynamo_backend = 'no' compiles nothing in kohya; here "
                             "compile_blocks = \"auto\" decides (compiled on CUDA cards of compute capability 8.0+ "
                             "with triton); compile_blocks = false runs eager")
            elif backend == "no":
                notes.append(f"torch_compile = true with dynamo_backend = 'no' compiles nothing in kohya; here "
                             f"compile_blocks = {str(self.compile_blocks).lower()} decides")
            else:
                shown = backend if backend in ("inductor", "aot_eager", "eager") else "inductor"
                extra = "" if shown == backend else f" (dynamo_backend '{self.dynamo_backend}' is not available here)"
                notes.append(f"torch_compile = true: compiled per DiT block (compile_blocks, as kohya's --compile) "
                             f"with backend {shown}{extra} instead of the whole model; the same math, faster to "
                             "compile")
        elif backend not in ("inductor", "no"):  # kohya_ss writes "no": nothing compiled, as asked
            notes.append(f"dynamo_backend = '{self.dynamo_backend}' has no effect without torch_compile (as in kohya)")
        if self.kohya_compile_off_kept_auto:
            notes.append(KOHYA_COMPILE_OFF_NOTICE)
        return notes
