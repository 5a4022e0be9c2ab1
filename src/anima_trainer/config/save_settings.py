"""Saving and resume options of `TrainConfig`: the output folder and file name, when network files and training
states are saved and kept, and how a run resumes; the file-name limit that output_name is checked against."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

# File names are limited to 255 bytes (ext4, XFS, btrfs, APFS, NTFS).  The longest name derived from
# output_name is a preview's temporary file, `.<name>_e<epoch>_<NN>_<seed>.png.<8 random>.tmp` (up to ~55 bytes
# more); the others are `<name>-step<NNNNNNNN>.safetensors` and its `.….tmp`, `.<name>-step<NNNNNNNN>-state.tmp-
# <pid>`, `<name>.events.jsonl`, `.<name>.lock`, `<name>.dataset_report.txt`, `<name>_config/`, the TensorBoard
# run folder `<name>_<timestamp>`.  75 bytes are kept free for them (tests/badinput/test_hardening_limits.py
# checks the real names).
FILE_NAME_MAX_BYTES = 255
OUTPUT_NAME_MAX_BYTES = FILE_NAME_MAX_BYTES - 75


class SaveSettings(BaseModel):
    """Fields, validators and the resume rule of saving and resuming (a mixin of TrainConfig).  vram_budget_gb
    is declared among them only to keep the order of `--help` (it belongs to "speed and memory",
    config/sections.py)."""

    # output
    output_dir: Path = Field(description="folder for the saved LoRA files")
    output_name: str = Field("last", min_length=1, description="file name stem (default: last): a plain file name "
                                                               "(no / \\ .. or control characters), at most 180 "
                                                               "bytes")
    save_precision: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="dtype of saved weights (fp32/float, fp16, bf16; default: as trained)")
    save_every_n_steps: int | None = Field(None, ge=1, description="save an intermediate network file every N "
        "optimizer steps")
    save_every_n_epochs: int | None = Field(None, ge=1, description="save an intermediate network file every N epochs")
    save_last_n_steps: int | None = Field(None, ge=1, description="keep step saves of the last N steps only")
    save_last_n_epochs: int | None = Field(None, ge=1, description="keep the last N epoch saves only")
    overwrite: bool = Field(False, description="replace existing output files (anima-trainer option)")
    # training states (exact resume)
    save_state: bool = Field(False, description="also save a training state folder with every network save")
    save_state_on_train_end: bool = Field(False, description="save a training state when training ends")
    save_last_n_steps_state: int | None = Field(None, ge=1, description="keep step states of the last N steps")
    save_last_n_epochs_state: int | None = Field(None, ge=1, description="keep the last N epoch states")
    resume: str | None = Field(None, description="a state folder, or 'latest' (newest state of output_name)")
    vram_budget_gb: float | Literal["auto"] | None = Field(
        None, description="fit the run into this much GPU memory (GiB) or 'auto' (92 % of the card): picks "
                          "checkpointing depth, offload, block swap and adapter-output caching, printed at start")
    resume_snapshot_strict: bool = Field(True, description="changed critical settings on resume: error (true) "
                                                           "or warning (false)")

    @field_validator("output_dir")
    @classmethod
    def _output_dir_can_be_a_folder(cls, v: Path) -> Path:
        # checked here, before minutes of model loading; a file in its place failed later with "[Errno 17]"
        for p in (v, *v.parents):
            if p.exists():
                if not p.is_dir():
                    what = "is" if p == v else f"is inside '{p}', which is"
                    raise ValueError(f"'{v}' {what} a file, not a folder; remove that file or choose another "
                                     "output_dir")
                break
        return v

    @field_validator("output_name", mode="before")
    @classmethod
    def _output_name(cls, v: Any) -> Any:
        return check_output_name(v) if isinstance(v, str) else v

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, v: Any) -> Any:
        return str(v) if isinstance(v, Path) else v

    @field_validator("save_precision", mode="before")
    @classmethod
    def _save_precision(cls, v: Any) -> Any:
        return "fp32" if v == "float" else v

    def optimizer_mismatch_ignored(self) -> bool:
        """Whether a resume continues with a fresh optimizer state when the optimizer changed or its state does
        not fit (resume_ignore_optimizer_mismatch; by default what resume_snapshot_strict = false allows)."""
        if self.resume_ignore_optimizer_mismatch is not None:
            return self.resume_ignore_optimizer_mismatch
        return not self.resume_snapshot_strict


def _shorten(v: str, keep: int = 40) -> str:
    return repr(v) if len(v) <= keep else f"{v[:keep]!r}… ({len(v)} characters)"


def check_output_name(name: str) -> str:
    """`name` when it is a plain file name stem that every derived file name can use; else ValueError.

    Why: output_name is joined to output_dir, so a path in it ("../../x", "/abs") would write outside
    output_dir, and a long one trains for hours and then fails at the first save ("File name too long")."""
    fix = "use a plain file name such as \"my_lora\" (output_dir chooses the folder)"
    bad = None
    if not name.strip():
        bad = "is empty"
    elif "/" in name or "\\" in name:
        bad = "contains a path separator (/ or \\)"
    elif ".." in name or name == ".":
        bad = "contains '..' (or is '.')"
    elif Path(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        bad = "is an absolute path"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        bad = "contains a control character"
    else:
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > OUTPUT_NAME_MAX_BYTES:
            bad = (f"is {size} bytes long (UTF-8); at most {OUTPUT_NAME_MAX_BYTES} bytes fit, since the names derived "
                   f"from it (`.<name>_e000001_00_<seed>.png.<tmp>`, `<name>-step00000100.safetensors`, ...) must "
                   f"stay within the {FILE_NAME_MAX_BYTES}-byte file name limit")
            fix = "use a shorter name"
    if bad:
        raise ValueError(f"{_shorten(name)} {bad}; {fix}")
    return name
