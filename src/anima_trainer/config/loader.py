"""Command line + `--config_file` TOML → `TrainConfig`, with kohya's precedence: command line > TOML > defaults.

TOML semantics follow kohya's `read_config_from_file` (kohya_anima.md §1.5): `.toml` is appended to the path when
the path as given does not exist; every top-level table is flattened (table names are cosmetic, top-level keys are
allowed too), list options are TOML arrays.  Stricter than kohya: a key in two tables, an unknown key and a value
of the wrong type are errors (kohya silently overwrites / accepts them), and so is any kohya or sd-scripts-anima
option that anima-trainer does not implement, unless its value asks for nothing (e.g. `fp8_base = false`).
Relative paths in the TOML are relative to the current working directory, as in kohya (not to the TOML's folder).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any, get_args

from pydantic_core import PydanticUndefined

from anima_trainer.config import kohya_options as ko
from anima_trainer.config.errors import ConfigError, did_you_mean
from anima_trainer.config.root_schema import root_style_evidence
from anima_trainer.config.train import TrainConfig, make_train_config

_LIST_FIELDS = ("network_args", "optimizer_args", "lr_scheduler_args")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"command line: {message}")


def _field_names() -> list[str]:
    return list(TrainConfig.model_fields)


def help_escape(text: str) -> str:
    """argparse %-formats every help string (for `%(default)s`): text taken from elsewhere (Field descriptions,
    kohya's option tables) must have its `%` doubled, or `--help` crashes on e.g. "92 % of the card"."""
    return text.replace("%", "%%")


def _add(parser: argparse.ArgumentParser, flag: str, field: str, help_text: str) -> None:
    info = TrainConfig.model_fields[field]
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_escape(help_text), "dest": flag}
    if info.annotation is bool:  # `--flag` is true; `--flag=false`, `--flag false` or `--no-flag` is false
        kw.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(f"--no-{flag}", dest=flag, action="store_const", const="false", default=argparse.SUPPRESS,
                            help=f"same as --{flag}=false")
    elif field in _LIST_FIELDS:
        kw.update(nargs="*", metavar="KEY=VALUE")
    else:
        choices = [c for a in get_args(info.annotation) for c in (get_args(a) if not isinstance(a, str) else (a,))
                   if isinstance(c, str)]
        kw.update(metavar="{" + ",".join(choices) + "}" if choices else field.upper())
    parser.add_argument(f"--{flag}", **kw)


TRAIN_DESCRIPTION = ("Train an Anima LoRA. Options use kohya-ss/sd-scripts names; all of them can also be set in "
                     "a --config_file TOML (the command line wins).")


def build_train_parser(prog: str = "anima-trainer train", description: str = TRAIN_DESCRIPTION,
                       epilog: str | None = None) -> argparse.ArgumentParser:
    """The `anima-trainer train` parser (kohya flag names, `allow_abbrev=False`).  Every option defaults to
    "absent" (argparse.SUPPRESS) so that a TOML value is only overridden by an option actually given; values stay
    strings here and are typed by `TrainConfig`.  Mistakes raise ConfigError instead of exiting; `--help` prints
    the help and exits 0 (SystemExit).  `prog`/`description`/`epilog`: the same options under `cache` and the
    drop-in script."""
    parser = _Parser(prog=prog, allow_abbrev=False, description=help_escape(description),
                     epilog=help_escape(epilog) if epilog else None,
                     formatter_class=argparse.RawDescriptionHelpFormatter if epilog else argparse.HelpFormatter)
    parser.add_argument("--config_file", default=argparse.SUPPRESS, metavar="TOML",
                        help="training TOML (kohya format; '.toml' may be omitted; tables are flattened)")
    for name, info in TrainConfig.model_fields.items():
        req = info.is_required()
        shown = not req and info.default not in (None, False, PydanticUndefined)
        default = f" (default: {info.default})" if shown and "default" not in (info.description or "") else ""
        text = (info.description or "") + (" [required]" if req else default)
        _add(parser, name, name, text.strip())
    for alias, canonical in ko.ALIASES.items():
        _add(parser, alias, canonical, f"sd-scripts-anima name of --{canonical}")
    return parser


def _cli_names() -> list[str]:
    return ["config_file", *_field_names(), *ko.ALIASES]


def _check_extras(extras: list[str]) -> None:
    """Errors for everything argparse did not recognise (unknown or unimplemented flags, stray words)."""
    lines: list[str] = []
    after_flag = False
    for tok in extras:
        if tok.startswith("-") and not _is_number(tok):
            name = tok.lstrip("-").split("=", 1)[0]
            base = name[3:] if name[:3] in ("no-", "no_") and name[3:] in ko.UNIMPLEMENTED else name
            if base in ko.UNIMPLEMENTED:
                lines.append(ko.unimplemented_message(base, shown=f"--{name}"))
            else:
                lines.append(f"unknown option '--{name}'{did_you_mean(name, _cli_names(), '--')}")
            after_flag = True
        elif not after_flag:
            lines.append(f"unexpected argument {tok!r} on the command line")
    if lines:
        raise ConfigError("\n".join(lines))


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def read_train_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    """The flattened contents of a training TOML and the file name used in messages."""
    p = Path(path).expanduser()
    if not p.is_file() and p.suffix.lower() != ".toml" and p.name:  # "" and "." have no name to extend
        alt = p.with_name(p.name + ".toml")
        if alt.is_file():
            p = alt
        else:
            raise ConfigError(f"config_file: '{p}' not found (also tried '{alt}')")
    if not p.is_file():
        what = "is a folder, not a TOML file" if p.is_dir() else "is not a regular file" if p.exists() else "not found"
        raise ConfigError(f"config_file: '{p}' {what}")
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config_file: '{p}' is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config_file: '{p}' is not valid TOML: {e} (TOML files are UTF-8; save it as UTF-8)") \
            from None
    except OSError as e:
        raise ConfigError(f"config_file: '{p}' cannot be read: {e.strerror or e}") from None
    except RecursionError:  # tomllib recurses per nesting level: thousands of `[[[...` exhaust the stack
        raise ConfigError(f"config_file: '{p}' is nested too deeply to be read (a hostile or broken TOML; kohya's "
                          "training TOMLs use one level of tables)") from None
    if evidence := root_style_evidence(data):  # its tables are not cosmetic: flattening would mangle it
        raise ConfigError(
            f"config_file: '{p}' is a root-style Anima_Trainer config (it has {', '.join(evidence[:3])}), not a "
            f"kohya training TOML; convert it once with `anima-trainer convert-config {p} --out DIR` and train "
            "with `--config_file DIR/train.toml` (or run it through `anima_train_network.py`, which converts it "
            "on the fly)")
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    for top, value in data.items():
        items = value.items() if isinstance(value, dict) else [(top, value)]
        table = f"[{top}]" if isinstance(value, dict) else "the top level"
        for k, v in items:
            if isinstance(v, dict):
                raise ConfigError(f"'{k}' in {table} of {p.name} is a table; only one level of tables is allowed "
                                  "(table names are cosmetic, the keys inside are the options)")
            if k in flat:
                raise ConfigError(f"key '{k}' appears in both {where[k]} and {table} of {p.name}")
            flat[k], where[k] = v, table
    if "config_file" in flat:
        raise ConfigError(f"config_file: cannot be set inside a config file ({p.name})")
    return flat, p.name


def _canonical(values: dict[str, Any], source: str, from_cli: bool) -> tuple[dict[str, Any], set[str]]:
    """Aliases → canonical names (conflicts are errors); unknown and unimplemented names are errors.
    Returns the canonical values and the canonical names that were set through an alias."""
    fields = set(_field_names())
    out: dict[str, Any] = {}
    via_alias: set[str] = set()
    lines: list[str] = []
    for key, value in values.items():
        if key in ko.UNIMPLEMENTED and key not in fields:  # a TrainConfig field is implemented
            if from_cli or not ko.is_inert(key, value):
                lines.append(ko.unimplemented_message(key, shown=f"--{key}" if from_cli else key))
        elif key in ko.ALIASES:
            canonical = ko.ALIASES[key]
            if value == "":  # sd-scripts-anima's "unset"
                continue
            if key == "anima_timestep_sampling":
                if value not in ko.ANIMA_TIMESTEP_SAMPLING_VALUES:
                    lines.append(f"anima_timestep_sampling: expected one of "
                                 f"{', '.join(map(repr, ko.ANIMA_TIMESTEP_SAMPLING_VALUES))}, got {value!r}")
                    continue
                value = ko.ANIMA_TIMESTEP_SAMPLING_VALUES[value]
            if canonical in values and values[canonical] != value:
                lines.append(f"'{key}' (sd-scripts-anima name of '{canonical}') and '{canonical}' are both set "
                             f"{source}, to different values ({values[key]!r} and {values[canonical]!r})")
                continue
            out[canonical] = value
            via_alias.add(canonical)
        elif key in fields:
            out.setdefault(key, value)
        else:
            lines.append(f"unknown key '{key}' {source}{did_you_mean(key, [*fields, *ko.ALIASES])}")
    if lines:
        raise ConfigError("\n".join(lines))
    return out, via_alias


def _sd_scripts_anima_timesteps(merged: dict[str, Any], via_alias: set[str]) -> None:
    """Using one of sd-scripts-anima's timestep names asks for its sampling: the settings of that trio not given
    by any name take sd-scripts-anima's defaults (logit-normal = kohya's `shift`, shift 3.0)."""
    if not via_alias & {ko.ALIASES[a] for a in ko.SD_SCRIPTS_ANIMA_TIMESTEP_ALIASES}:
        return
    for k, v in ko.SD_SCRIPTS_ANIMA_TIMESTEP_DEFAULTS.items():
        merged.setdefault(k, v)
    shift = merged["discrete_flow_shift"]
    if "timestep_sampling" in via_alias and merged["timestep_sampling"] == "uniform" and not _is_one(shift):
        raise ConfigError(
            f"anima_timestep_sampling: sd-scripts-anima's 'uniform' shifts t by the flow shift ({shift}), "
            "anima-trainer's 'uniform' does not; set anima_flow_shift = 1.0 for unshifted uniform sampling, "
            "or use timestep_sampling = \"shift\" (logit-normal, shifted)")


def _is_one(v: Any) -> bool:
    try:
        return float(v) == 1.0
    except (TypeError, ValueError):
        return False  # a bad value: TrainConfig reports it


def parse_train_args(argv: list[str] | None = None, *, prog: str = "anima-trainer train",
                     description: str = TRAIN_DESCRIPTION, epilog: str | None = None) -> TrainConfig:
    """Build the TrainConfig from `argv` (without the `train` word; None → sys.argv[1:]) and its --config_file.
    `prog`/`description`/`epilog` only change what `--help` prints."""
    parser = build_train_parser(prog, description, epilog)
    ns, extras = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    _check_extras(extras)
    cli_raw = vars(ns)
    config_file = cli_raw.pop("config_file", None)
    cli, cli_alias = _canonical(cli_raw, "on the command line", from_cli=True)
    toml: dict[str, Any] = {}
    toml_alias: set[str] = set()
    output_config = _output_config_asked(cli.pop("output_config", None), config_file)
    if output_config:  # kohya: --config_file is then the file to write, not read
        config_file = None
    if config_file is not None:
        raw, name = read_train_toml(config_file)
        toml, toml_alias = _canonical(raw, f"in {name}", from_cli=False)
    merged = {**toml, **cli}
    # a canonical name counts as "set through an alias" when the layer that won for it used the alias
    via_alias = cli_alias | {k for k in toml_alias if k not in cli}
    _sd_scripts_anima_timesteps(merged, via_alias)
    try:
        for key in ("optimizer_type", "lr_scheduler_type"):  # importlib raises TypeError for relative modules
            v = merged.get(key)
            if isinstance(v, str) and v.strip().rpartition(".")[0].startswith("."):
                raise ConfigError(f"{key}: {v!r} is not a class name or a module.Class path (a module name "
                                  "cannot start with '.')")
        if toml.pop("output_config", None) not in (None, False, "false", "False"):
            import logging

            logging.getLogger(__name__).warning(
                "output_config in %s: no effect there (kohya reads it only on the command line, where it writes "
                "the settings to the --config_file path and exits); training goes on", name)
        merged.pop("output_config", None)
        cfg = make_train_config(merged)
    except ConfigError as e:
        if not toml:
            raise
        raise ConfigError(_name_file(str(e), set(toml) - set(cli), name)) from None
    if output_config:
        from anima_trainer.config.output_config import write_output_config

        write_output_config(cfg, output_config)
        raise SystemExit(0)
    return cfg


def _output_config_asked(value: Any, config_file: str | None) -> str | None:
    """The --config_file path when --output_config asks to write it; None when not asked."""
    if value is None or str(value).strip().lower() in ("false", "0", "no", "off", ""):
        return None
    if str(value).strip().lower() not in ("true", "1", "yes", "on"):
        raise ConfigError(f"output_config: expected true or false, got {value!r}")
    if config_file is None:
        raise ConfigError("output_config: needs --config_file naming the TOML file to write (kohya's "
                          "--output_config writes the settings there and exits)")
    return config_file


def _name_file(message: str, from_toml: set[str], name: str) -> str:
    """Each line of a TrainConfig message that starts with a key the TOML set (and the command line did not)
    gets " (in NAME)": the user learns which file to edit."""
    lines = []
    for line in message.split("\n"):
        key = line.split(":", 1)[0].split(" ", 1)[0]
        lines.append(f"{line} (in {name})" if key in from_toml else line)
    return "\n".join(lines)
