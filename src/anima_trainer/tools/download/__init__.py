"""Downloading the models and tokenizers (Hugging Face first, ModelScope as fallback), verified and resumable.

    command.py    `anima-trainer download` (`download_models`, `cmd_download`)
    errors.py     DownloadError and its kinds, importable without the rest
    fetch.py      providers and fallback: a file or a tokenizer folder from Hugging Face, else ModelScope
    sources.py    the one table of where things come from: repo ids, file names, hashes, fallbacks
    startup.py    training start-up: complete the configured tokenizer folders (`ensure_tokenizers`)
    t5.py         the T5 tokenizer folder: completeness, `spiece.model` → `tokenizer.json`, strict checks
    transfer.py   one file over HTTP(S): resumable `.part` download, size and hash checks, atomic rename
    urls.py       repo ids and Hugging Face / ModelScope URLs → `SourceRef`

Nothing is imported here: `config/model_files.py` reads the source table and must not load the rest.
"""
