"""Old spellings of the models' public keyword arguments, still accepted (docs/DESIGN.md "Names").

Issue 16 gave every model/tokenizer path one spelling across the API, the CLI and the config
(`llm_adapter_path`, `qwen3_tokenizer_path`, `t5_tokenizer_path`); scripts written against the old keyword
names keep working, with a DeprecationWarning naming the new one.
"""

from __future__ import annotations

import warnings
from typing import Any


def renamed_argument(function: str, new: str, new_value: Any, old: str, old_value: Any) -> Any:
    """The value of keyword `new`, also accepted under its old name `old` (warned); both given is a TypeError."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{function}() got {new}= and its old name {old}=; pass {new}= only")
    warnings.warn(f"{function}({old}=...) is now spelled {function}({new}=...)", DeprecationWarning, stacklevel=3)
    return old_value
