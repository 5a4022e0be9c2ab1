"""File tools beside training: they read and write model and adapter files, and fetch them.

    convert.py          `anima-trainer convert-network`: adapter keys renamed (ComfyUI / kohya / diffusers)
    download/           `anima-trainer download` and the tokenizer check at training start-up
    extract.py          `anima-trainer extract`: a fine-tuned DiT turned into a LoRA (truncated SVD per module,
                        the reconstruction error per module); extract_command.py: its command line
    inspect.py          `anima-trainer inspect NETWORK_FILE`: what an adapter file holds, would ComfyUI load it;
                        `--analysis`: the weight analysis table (networks/analysis.py)
    merge.py            `anima-trainer merge`: adapter files baked into a DiT (and a Qwen3) checkpoint;
                        `--average`: the checkpoint soup of networks of one structure; merge_command.py: its
                        command line
    metadata_report.py  the metadata part of `inspect` (kohya's ss_* summary, hashes, modelspec)

Layer: above models and networks, below train (training start-up uses download/startup.py) and cli.
"""
