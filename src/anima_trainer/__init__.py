"""anima-trainer: LoRA/LoKr/LoHa training for the Anima text-to-image model.

The package, lowest layer first (imports point down only; tests/test_layers.py, docs/DESIGN.md "Layers"):

    fileio.py        the one atomic, fsync'd byte write path (torch-free); console.py: logging beside tqdm
    config/          TrainConfig and the kohya option tables (no torch)
    dtypes.py        dtype names; tensor_files.py: safetensors writing and finiteness checks
    data/            dataset.toml, images, captions, buckets, batches
    compat/          other tools' command lines, TOMLs and folder layouts translated
    cache/           the frozen encoders' outputs, in RAM or on disk
    models/          the DiT, the LLM adapter, the Qwen3 text encoder, the VAE, model files
    networks/        LoRA / LoKr / LoHa injected into the models, and their files
    sample/          the flow sampler and the previews
    evaluation/      held-out loss, preservation drift, trigger response; the prompt bank; `eval`'s work
    tools/           download, inspect, convert, merge
    train/           the objective, the loop, the optimizer, saving and resuming
    cli.py           `anima-trainer` and its commands (__main__.py: `python -m anima_trainer`; eval_command.py:
                     `eval`); demo.py: the tiny end-to-end demo
"""

__version__ = "0.1.0"
