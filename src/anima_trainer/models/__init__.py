"""What Anima is: the DiT with its LLM adapter, the Qwen3 text encoder with both tokenizers, and the VAE.

    attention_backend.py  which SDPA kernel the attention runs, measured once at start-up or named
    base_models.py        the frozen DiT, text encoder and VAE loaded together (training and evaluation)
    block_runner.py       the loop over the DiT blocks that AnimaDiT holds as `runner`: gradient-checkpointing
                          depth and mode, block swap, activation offload (`setup_memory`)
    compile.py            torch.compile of the DiT blocks
    dit_checkpoint.py     a whole DiT written in its base file's key layout (merge, fine-tune saves)
    diffusers_layout.py   diffusers' folder layout of the Anima pipeline (names, configs, tokenizer folders)
    dit.py                AnimaDiT and `load_dit`
    flow_maths.py         rectified flow: x_σ = (1−σ)·x0 + σ·ε, target v = ε − x0, the flow loss (training and
                          evaluation share it)
    fp8.py                float8 storage of frozen weights (per-tensor scaled), computed in the compute dtype
    fp8_compute.py        the frozen blocks' forward GEMMs in float8 (`fp8_compute`, torch._scaled_mm)
    layers.py             RMSNorm, rotary embedding, q/k-normed attention shared by the DiT and the LLM adapter
    llm_adapter.py        the LLM adapter (Qwen3 states → T5-token context of the DiT)
    model_files.py        reading model files: kinds, DiT config from shapes, quantised storage, state dicts
    offload.py            block weights (a fine-tune's trained ones copied back) and saved activations moved off
                          the accelerator while a step runs
    prompt_syntax.py      ComfyUI's prompt-weight syntax, so captions tokenize as ComfyUI's do
    renamed_arguments.py  old keyword spellings of the public loaders, still accepted (with a warning)
    safetensors_file.py   safetensors headers read without loading tensors
    text.py               AnimaTextEncoder (Qwen3 + Qwen/T5 tokenizers) and `load_text_encoder`
    vae.py                the Wan 2.1 VAE and `load_vae`
"""

from anima_trainer.models.dit import load_dit
from anima_trainer.models.model_files import DitConfig, inspect_file
from anima_trainer.models.text import load_text_encoder
from anima_trainer.models.vae import load_vae

__all__ = ["DitConfig", "inspect_file", "load_dit", "load_text_encoder", "load_vae"]
