"""`anima-trainer download`: fetch the Anima DiT, Qwen3-0.6B, the Qwen-Image VAE and both tokenizers.

Layout under `--dest` (ComfyUI's `models/` layout, so `--dest ComfyUI/models` works for both programs):
`diffusion_models/`, `text_encoders/`, `vae/`, `tokenizers/qwen/`, `tokenizers/t5/`.  A file already there is
kept when it matches (its SHA-256 is remembered in `.anima-trainer-downloads.json`, so a re-run does not re-hash
4 GB); `--force` downloads again.  The end of the output is the `[model]` table to paste into train.toml.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from anima_trainer.config.tomlw import toml_value
from anima_trainer.fileio import atomic_write_bytes
from anima_trainer.models.safetensors_file import ModelFileError, read_header
from anima_trainer.tools.download import sources, t5
from anima_trainer.tools.download.errors import DownloadError, VerificationError
from anima_trainer.tools.download.fetch import Context, Fetched, fetch_file, fetch_folder, source_chain
from anima_trainer.tools.download.sources import FileEntry, FolderEntry
from anima_trainer.tools.download.transfer import Options, sha256_file
from anima_trainer.tools.download.urls import SourceRef

log = logging.getLogger(__name__)
RECORD = ".anima-trainer-downloads.json"
ORDER = ("dit", "qwen3", "vae", "qwen_tokenizer", "t5_tokenizer")


@dataclass
class Outcome:
    """What one entry ended up as: its file/folder, and per file where it came from."""

    entry: FileEntry | FolderEntry
    path: Path
    status: str  # "downloaded" | "present"
    files: list[Fetched] = field(default_factory=list)


def add_download_parser(sub) -> None:  # sub: argparse's private subparsers type
    p = sub.add_parser(
        "download", help="download the Anima DiT, Qwen3-0.6B, the Qwen-Image VAE and the tokenizers",
        description="Download the models from Hugging Face (ModelScope as fallback), verify their size and "
        "SHA-256, and print the train.toml lines that use them.  Interrupted downloads resume.  See "
        "docs/models.md, 'Downloading the models'.")
    p.add_argument("--dest", default="models", help="target folder (default: ./models)")
    p.add_argument("--only", nargs="+", action="extend", metavar="PART",
                   help=f"some of: {', '.join([*ORDER, *sources.GROUPS])} (default: all)")
    p.add_argument("--source", action="append", default=[], metavar="NAME=SPEC",
                   help="where NAME comes from: a repo id or a huggingface.co / modelscope.cn URL (repeatable)")
    p.add_argument("--modelscope-source", action="append", default=[], metavar="NAME=SPEC",
                   help="ModelScope fallback for NAME (repo id or modelscope.cn URL)")
    p.add_argument("--no-modelscope-fallback", action="store_true", help="use Hugging Face only")
    p.add_argument("--hf-endpoint", default=None, help="Hugging Face endpoint (default: $HF_ENDPOINT or "
                   "https://huggingface.co)")
    p.add_argument("--modelscope-endpoint", default=None, help="ModelScope endpoint (default: "
                   f"${sources.MODELSCOPE_ENDPOINT_ENV} or {sources.MODELSCOPE_ENDPOINT})")
    p.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN / `hf auth login`)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry")
    p.add_argument("--force", action="store_true", help="download again even when the files are present")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or name.strip() not in sources.ENTRIES:
            raise ValueError(f"{flag} {item!r}: expected NAME=SPEC with NAME one of {', '.join(ORDER)}")
        out[name.strip()] = spec.strip()
    return out


def selected(only: list[str] | None) -> list[str]:
    if not only:
        return list(ORDER)
    names: set[str] = set()
    for item in (x for part in only for x in part.split(",") if x.strip()):
        item = item.strip()
        if item not in sources.ENTRIES and item not in sources.GROUPS:
            raise ValueError(f"--only {item!r}: expected some of {', '.join([*ORDER, *sources.GROUPS])}")
        names.update(sources.GROUPS.get(item, (item,)))
    return [n for n in ORDER if n in names]


# ---------------------------------------------------------------------------------------------- files

def _record(dest: Path) -> dict:
    try:
        data = json.loads((dest / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # a damaged record only costs a re-hash
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _remember(dest: Path, path: Path, sha: str, source: str) -> None:
    rec = _record(dest)
    st = path.stat()
    rec[path.relative_to(dest).as_posix()] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha,
                                              "source": source}
    atomic_write_bytes(json.dumps(rec, indent=1).encode("utf-8"), dest / RECORD)


def _present(dest: Path, path: Path, pin: str | None, progress: bool) -> bool:
    """True when `path` exists and is the expected file (a mismatch is an error: never silently replaced)."""
    if not path.is_file():
        return False
    st = path.stat()
    known = _record(dest).get(path.relative_to(dest).as_posix(), {})
    if known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        if not pin or known.get("sha256") == pin:
            return True  # verified when it was downloaded
        raise DownloadError(f"{path} exists but its SHA-256 (recorded when it was downloaded from "
                            f"{known.get('source')}) is {known.get('sha256')}, while anima-trainer pins {pin} for "
                            "it; delete it or pass --force to download the pinned file")
    if not pin:
        log.warning("%s exists; no known SHA-256 to check it against (pass --force to download it again)", path)
        return True
    log.info("checking the SHA-256 of %s", path)
    sha = sha256_file(path, progress)
    if sha != pin:
        raise DownloadError(f"{path} exists but its SHA-256 is {sha}, expected {pin}; delete it or pass --force")
    _remember(dest, path, sha, "found on disk")
    return True


def _file_chain(entry: FileEntry, primary: SourceRef, fallback: SourceRef | None):
    """[(source, file path, pinned SHA-256 or None)]: a fallback stands in for the primary's file, so when the
    primary is pinned the fallback must deliver the very same bytes (the pin applies whatever it is named)."""
    name = entry.path.rsplit("/", 1)[-1]
    chain = []
    for ref in source_chain(primary, fallback):
        path = ref.path if ref.is_file else (f"{ref.path}/{name}" if ref.path else name)
        pinned = sources.is_default_file(entry, SourceRef(ref.provider, ref.repo_id, ref.revision, path, True))
        chain.append((ref, path, entry.sha256 if pinned or chain and chain[0][2] else None))
    return chain


def _safetensors_check(part: Path) -> None:
    """What an unpinned model file must pass before it is installed: a safetensors header (known dtypes, tensors
    filling the file exactly).  Catches an HTML error page, a truncated file, a pickle or another format."""
    try:
        read_header(part)
    except ModelFileError as e:
        raise VerificationError(f"the downloaded file is not a usable model: {e}") from None


def _get_file(entry: FileEntry, dest: Path, ctx: Context, primary: SourceRef, fallback: SourceRef | None,
              force: bool) -> Outcome:
    chain = _file_chain(entry, primary, fallback)
    target = dest / entry.dest_subdir / chain[0][1].rsplit("/", 1)[-1]
    if not force and _present(dest, target, chain[0][2], ctx.opts.progress):
        return Outcome(entry, target, "present")
    note = "" if len(chain) > 1 or primary.provider != "hf" else (
        "(no ModelScope fallback: pass --modelscope-source "
        f"{entry.name}=<repo or URL> to add one)" if fallback is None else "")
    fetched = fetch_file(f"the {entry.title} ({target.name})", chain, target, ctx, note, check=_safetensors_check)
    _remember(dest, target, fetched.sha256, fetched.source)
    return Outcome(entry, target, "downloaded", [fetched])


def _get_folder(entry: FolderEntry, dest: Path, ctx: Context, primary: SourceRef, fallback: SourceRef | None,
                force: bool) -> Outcome:
    target = dest / entry.dest_subdir
    complete = all(any((target / n).is_file() for n in group) for group in entry.required)
    if complete and not force:
        if entry is sources.T5_TOKENIZER:
            t5.make_loadable(target)
        return Outcome(entry, target, "present")
    if force and target.is_dir():
        for n in {n for g in entry.required for n in g} | set(entry.optional):
            (target / n).unlink(missing_ok=True)
    check = t5.check_downloaded if entry is sources.T5_TOKENIZER else None
    fetched = fetch_folder(f"the {entry.title} into {target}", source_chain(primary, fallback), target, ctx,
                           required=entry.required, optional=entry.optional, root_fallback=entry.root_fallback,
                           check=check)
    return Outcome(entry, target, "downloaded", fetched)


def download_models(names: list[str], dest: Path, ctx: Context, *, overrides: dict[str, str] | None = None,
                    modelscope_overrides: dict[str, str] | None = None, fallback: bool = True,
                    force: bool = False) -> tuple[list[Outcome], list[DownloadError]]:
    """Download the entries `names` (see sources.ENTRIES) under `dest`.  A part that fails does not stop the
    others: returns what was obtained and one DownloadError per failed part (each naming every source tried)."""
    overrides, modelscope_overrides = overrides or {}, modelscope_overrides or {}
    dest = dest.expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    plan = []
    for name in names:  # parse every source before the first byte moves
        entry = sources.ENTRIES[name]
        primary = sources.primary_source(entry, overrides.get(name))
        ms = sources.fallback_source(entry, modelscope_overrides.get(name)) if fallback else None
        plan.append((entry, primary, ms))
    out, errors = [], []
    for entry, primary, ms in plan:
        get = _get_file if isinstance(entry, FileEntry) else _get_folder
        try:
            out.append(get(entry, dest, ctx, primary, ms, force))  # type: ignore[arg-type]
        except DownloadError as e:
            errors.append(e)
    return out, errors


def toml_lines(outcomes: list[Outcome]) -> list[str]:
    return ["[model]"] + [f"{o.entry.train_key} = {toml_value(o.path)}" for o in outcomes]


def cmd_download(args: argparse.Namespace) -> int:
    names = selected(args.only)
    ctx = Context(hf_endpoint=(args.hf_endpoint or sources.hf_endpoint()).rstrip("/"),
                  modelscope_endpoint=(args.modelscope_endpoint or sources.modelscope_endpoint()).rstrip("/"),
                  token=args.token, opts=Options(timeout=args.timeout, progress=not args.no_progress))
    outcomes, errors = download_models(names, Path(args.dest), ctx, overrides=_pairs(args.source, "--source"),
                                       modelscope_overrides=_pairs(args.modelscope_source, "--modelscope-source"),
                                       fallback=not args.no_modelscope_fallback, force=args.force)
    for o in outcomes:
        print(f"{o.entry.title}: {o.path} ({o.status})")
        for f in o.files:
            check = f", SHA-256 {f.sha256}" if f.sha256 else ""
            print(f"    {f.path.name} <- {f.source}{check}")
    if outcomes:
        print("\ntrain.toml:")
        print("\n".join(toml_lines(outcomes)))
    if errors:
        raise DownloadError("\n".join(str(e) for e in errors))
    return 0
