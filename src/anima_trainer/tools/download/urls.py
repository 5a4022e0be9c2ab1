"""The source-spec parser lives in config/source_urls.py (config validates the tokenizer sources at start-up and
is the lowest layer); the downloader's modules and tests import it from here."""

from anima_trainer.config.source_urls import (
    DEFAULT_REVISIONS,
    PROVIDER_NAMES,
    Provider,
    SourceRef,
    parse_source,
)

__all__ = ["DEFAULT_REVISIONS", "PROVIDER_NAMES", "Provider", "SourceRef", "parse_source"]
